"""Conversion memory and time: a generated LLaMA checkpoint of several GB (written shard by shard with
safetensors) -> `jaxground convert`, in a child process; against HF `LlamaForCausalLM.from_pretrained` of the
same directory (the torch way of reading it). Prints wall time and peak RSS of each, the largest tensor, and
the converter's target `2 x largest + 1.5 GiB`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxground.bench._common import BenchError, machine

GIB = 2**30
# peak RSS of the command run as a grandchild (RUSAGE_CHILDREN of a middle process that runs only it)
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
_TORCH_LOAD = ("import sys, torch; from transformers import LlamaForCausalLM; "
               "LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)")


def add_arguments(parser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (7B-sized: ~0.8 GB each in float32)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="converted dtype")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--skip-torch", action="store_true", help="do not time the torch reference load")


def _heads(hidden: int) -> int:
    """Attention heads of the generated checkpoint: width 128 as in LLaMA-7B, one head below that."""
    return max(1, hidden // 128)


def write_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> tuple[int, int]:
    """A float32 HF LLaMA directory, one safetensors shard per layer; returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    heads = _heads(hidden)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32", "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    shards = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shards.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    total, largest, weight_map = 0, 0, {}
    gen = torch.Generator().manual_seed(0)
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: torch.empty(shape).uniform_(-0.02, 0.02, generator=gen) for key, shape in shard.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.nbytes
            largest = max(largest, t.nbytes)
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return total, largest


def measure(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `argv` run in a child process."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, *argv], capture_output=True, text=True,
                       check=False)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{r.stderr[-2000:]}")
    kib = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("MAXRSS_KIB")))
    return seconds, kib * 1024


def run(args) -> int:
    print(f"machine: {machine()}", flush=True)
    if min(args.layers, args.hidden, args.intermediate, args.vocab) < 1:
        raise BenchError("--layers, --hidden, --intermediate and --vocab must be >= 1")
    heads = _heads(args.hidden)
    if args.hidden % heads or (args.hidden // heads) % 2:
        raise BenchError(f"--hidden {args.hidden} does not split into {heads} heads of even width (RoPE)")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="jaxground-bench-convert-"))
    src, out = work / "llama", work / "converted"
    try:
        start = time.perf_counter()
        total, largest = write_checkpoint(src, args.layers, args.hidden, args.intermediate, args.vocab)
        print(f"checkpoint: {total / 1e9:.2f} GB ({total / GIB:.2f} GiB) in {args.layers + 2} shards, written in "
              f"{time.perf_counter() - start:.0f} s; largest tensor {largest / GIB:.3f} GiB")
        target = 2 * largest + 1.5 * GIB
        t_jax, rss_jax = measure(["-m", "jaxground.cli", "convert", str(src), "--out", str(out),
                                  "--dtype", args.dtype])
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"jaxground convert ({args.dtype}): {t_jax:.1f} s, peak RSS {rss_jax / GIB:.2f} GiB, "
              f"{written / GIB:.2f} GiB written; target 2 x largest + 1.5 GiB = {target / GIB:.2f} GiB -> "
              f"{'within' if rss_jax <= target else 'ABOVE'} target")
        shutil.rmtree(out)
        if not args.skip_torch:
            t_torch, rss_torch = measure(["-c", _TORCH_LOAD, str(src)])
            print(f"torch LlamaForCausalLM.from_pretrained: {t_torch:.1f} s, peak RSS {rss_torch / GIB:.2f} GiB")
            print(f"ratio jax/torch: time {t_jax / t_torch:.2f}, peak RSS {rss_jax / rss_torch:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return 0
