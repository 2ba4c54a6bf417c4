"""LLaMA forward throughput: jit-compiled JAX vs HF torch eager, same weights (converted) and same input.

The two are timed in alternating rounds (`_common.alternated`). Prints compile time separately, tokens/s of both
(medians of the rounds), their ratio (the median of the per-round ratios and their range), and the max |logit
diff| as a sanity check.
"""

from __future__ import annotations

import time

from jaxground.bench._common import BenchError, alternated, machine


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no grouping)")
    parser.add_argument("--intermediate", type=int, default=None, help="default: 8/3 x hidden, rounded to 64")
    parser.add_argument("--vocab", type=int, default=32005)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per framework and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the frameworks")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    print(f"machine: {machine()}", flush=True)
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from jaxground.convert.llama import build

    for name in ("batch", "seq", "layers", "hidden", "heads", "vocab", "repeats", "rounds"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    intermediate = args.intermediate or -(-8 * args.hidden // 3 // 64) * 64
    torch.manual_seed(args.seed)
    hf_cfg = HFLlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(args.seq, 128),
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    model = build(hf.state_dict(), hf_cfg)
    ids = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq

    forward = jax.jit(lambda m, x: m(x))
    x = jax.numpy.asarray(ids)
    start = time.perf_counter()
    compiled = forward.lower(model, x).compile()
    compile_s = time.perf_counter() - start
    ids_t = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        timings = alternated({"jax": lambda: jax.block_until_ready(compiled(model, x)),
                                "torch": lambda: hf(input_ids=ids_t)}, args.rounds, args.repeats)
        diff = np.abs(np.asarray(compiled(model, x)) - hf(input_ids=ids_t).logits.numpy()).max()
    jax_s, torch_s = timings.median("jax"), timings.median("torch")

    params = sum(p.numel() for p in hf.parameters())
    print(
        f"LLaMA forward: batch {args.batch} x seq {args.seq}, {args.layers} layers, hidden {args.hidden}, "
        f"heads {args.heads}/{args.kv_heads or args.heads} kv, mlp {intermediate}, vocab {args.vocab} "
        f"({params / 1e6:.1f}M params), float32, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"jax  jit   : compile {compile_s:.2f} s, {jax_s * 1e3:.1f} ms/forward, {tokens / jax_s:,.0f} tokens/s"
    )
    print(f"torch eager: {torch_s * 1e3:.1f} ms/forward, {tokens / torch_s:,.0f} tokens/s")
    print(f"ratio jax/torch: {timings.ratio('torch', 'jax')}   (max |logit diff| {diff:.2e})")
    return 0
