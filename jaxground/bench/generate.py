"""Evaluation throughput, JAX vs the PyTorch reference with the same weights, in the same run.

`generate`: batched greedy decoding, the jitted JAX KV-cache `while_loop` vs HF `generate` (torch eager). Both
decode exactly `--new-tokens` tokens per prompt (eos disabled) from left-padded prompts of mixed lengths, at
each `--batches` size. Compile time is printed separately; tokens/s counts the generated tokens. The greedy
tokens of both are compared as a sanity check.

`rec`: REC evaluation examples/s, the authors' way (teacher-forced "<at> <boxes>", one forward pass, F(t) at the
first trigger): the jitted NextChat step of `jaxground eval` over padded batches of `--rec-batch` vs a batch-1
torch loop (HF CLIP + HF LLaMA + torch projector and F, as `bench train` builds them, converted with
`jaxground.convert.nextchat.build`). The boxes of both are compared (max |diff|).

JAX and torch are timed in alternating rounds (`_common.alternated`, `--rounds`): rates are medians of the rounds,
ratios the median of the per-round ratios with their range.
"""

from __future__ import annotations

import time

from jaxground.bench._common import BenchError, alternated, machine


def add_arguments(parser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt; others are shorter (left-padded)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32005)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per framework, batch and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the frameworks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--what", choices=("generate", "rec", "both"), default="both")
    parser.add_argument("--rec-size", choices=("tiny", "100m"), default="tiny", help="model of `bench train`")
    parser.add_argument("--rec-batch", type=int, default=16, help="JAX evaluation batch")
    parser.add_argument("--rec-samples", type=int, default=64, help="REC examples per framework")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default;"
                        " on a loaded machine 1 avoids spinning threads)")


def _prompts(batch: int, longest: int, vocab: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, longest), np.int32)
    mask = np.zeros((batch, longest), bool)
    for i in range(batch):
        n = longest - (i * 7) % max(longest // 2, 1)
        ids[i, longest - n:] = rng.integers(3, vocab, n)
        mask[i, longest - n:] = True
    return ids, mask


def run(args) -> int:
    print(f"machine: {machine()}", flush=True)
    if args.rec_batch < 1 or args.rec_samples < 1 or args.rounds < 1:
        raise BenchError("--rec-batch, --rec-samples and --rounds must be >= 1")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.what in ("generate", "both"):
        run_generate(args)
    if args.what in ("rec", "both"):
        run_rec(args)
    return 0


def run_rec(args) -> None:
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from jaxground.bench.train import SIZES, make_batch, released_checkpoint, torch_model
    from jaxground.convert.nextchat import build
    from jaxground.eval.steps import rec_teacher_forced_step

    llama_fields, clip_fields, _, seq, _ = SIZES[args.rec_size]
    torch.manual_seed(args.seed)
    parts = torch_model(llama_fields, clip_fields, seq)
    state_dict, hf_config = released_checkpoint(parts, clip_fields["hidden_size"])
    model = build(state_dict, config=hf_config)
    cfg, tokens = model.cfg, model.cfg.tokens
    n, b = args.rec_samples, args.rec_batch
    data = make_batch(tokens, cfg.llm.vocab_size, n, seq, cfg.vision.image_size, cfg.vision.num_patches, args.seed)

    step = nnx.cached_partial(nnx.jit(rec_teacher_forced_step), model)  # as `jaxground eval` runs it
    batches = []
    for start in range(0, n, b):  # the last batch padded with valid=False rows, as the eval pipeline does
        idx = np.arange(start, start + b)
        batch = {k: v[np.minimum(idx, n - 1)] for k, v in data.items()}
        batch["valid"] = idx < n
        batches.append({k: jax.numpy.asarray(v) for k, v in batch.items()})

    def jax_pass():
        return [step(batch)["pred"] for batch in batches]

    start = time.perf_counter()
    jax_boxes = np.concatenate([np.asarray(p) for p in jax.block_until_ready(jax_pass())])[:n]
    first_s = time.perf_counter() - start

    forward = torch_rec_forward(parts, tokens)

    def torch_pass():
        return np.concatenate([forward({k: torch.from_numpy(v[i:i + 1]) for k, v in data.items()})
                               for i in range(n)])

    with torch.no_grad():
        torch_boxes = torch_pass()
        timings = alternated({"jax": lambda: jax.block_until_ready(jax_pass()), "torch": torch_pass},
                               args.rounds, args.repeats)
    jax_s, torch_s = timings.median("jax"), timings.median("torch")
    params = sum(p.numel() for m in parts.values() for p in m.parameters())
    print(f"REC evaluation ({args.rec_size}: {params / 1e6:.1f}M params, {seq} tokens, {n} examples, float32): "
          f"jax jit batch {b} {n / jax_s:8.1f} ex/s ({jax_s:.2f} s; first pass incl. compile {first_s:.1f} s) | "
          f"torch eager batch 1 ({torch.get_num_threads()} threads) {n / torch_s:8.1f} ex/s ({torch_s:.2f} s) | "
          f"ratio {timings.ratio('torch', 'jax')} | "
          f"boxes max |diff| {np.abs(jax_boxes - torch_boxes).max():.1e}")


def torch_rec_forward(parts: dict, tokens):
    """sample (torch tensors, batch 1, `Batch` field names) -> F(t) [1,4] at the first trigger: CLIP layer -2
    without CLS -> projector over `<im_patch>`, G(box) over `<boxes>`, LLaMA, final-norm state at the first
    answer `<at>`."""
    llama, d = parts["llama"], parts["llama"].config.hidden_size

    def forward(s):
        ids = s["input_ids"].long()
        images = s["images"].permute(0, 3, 1, 2)
        feats = parts["clip"](pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
        embeds = llama.model.embed_tokens(ids).clone()
        embeds[ids == tokens.im_patch] = parts["projector"](feats).reshape(-1, d)
        slots = ids == tokens.boxes
        embeds[slots] = parts["loc_encoder"](s["boxes"][:, : int(slots.sum())]).reshape(-1, d)
        hidden = llama.model(inputs_embeds=embeds).last_hidden_state
        trigger = int(((ids == tokens.at) & (s["labels"] == tokens.at)).nonzero()[0, 1])
        return parts["loc_decoder"](hidden[:, trigger]).numpy()

    return forward


def run_generate(args) -> None:
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from jaxground.convert.llama import build
    from jaxground.infer.generate import GenerationConfig, generate_ids

    for name in ("prompt", "new_tokens", "layers", "hidden", "heads", "vocab", "repeats"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        raise BenchError(f"--batches must be >= 1, got {args.batches}")
    torch.manual_seed(args.seed)
    hf_cfg = HFLlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=-(-8 * args.hidden // 3 // 64) * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=2048,
        attn_implementation="eager", pad_token_id=0,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    llm = build(hf.state_dict(), hf_cfg)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_id=-1, pad_id=0)
    params = sum(p.numel() for p in hf.parameters())
    print(f"greedy generation: prompts <= {args.prompt} tokens (left-padded), {args.new_tokens} new tokens, "
          f"LLaMA {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} ({params / 1e6:.1f}M params), "
          f"float32, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")

    for batch in args.batches:
        ids, mask = _prompts(batch, args.prompt, args.vocab, args.seed)
        tokens = batch * args.new_tokens
        start = time.perf_counter()
        out = jax.block_until_ready(generate_ids(llm, ids, mask, cfg).tokens)  # first call: trace + compile + run
        first_s = time.perf_counter() - start

        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids_t, attention_mask=mask_t, **kw)
            timings = alternated(
                {"jax": lambda i=ids, m=mask: jax.block_until_ready(generate_ids(llm, i, m, cfg).tokens),
                 "torch": lambda i=ids_t, m=mask_t, kw=kw: hf.generate(input_ids=i, attention_mask=m, **kw)},
                args.rounds, args.repeats)
        jax_s, torch_s = timings.median("jax"), timings.median("torch")
        same = float(np.mean(np.asarray(out) == ref[:, args.prompt:].numpy()))
        print(f"batch {batch:3d}: jax jit {tokens / jax_s:9,.0f} tok/s ({jax_s * 1e3:7.1f} ms; first call incl. "
              f"compile {first_s:.2f} s) | torch eager generate {tokens / torch_s:9,.0f} tok/s ({torch_s * 1e3:7.1f} ms)"
              f" | ratio {timings.ratio('torch', 'jax')} | same tokens {same:.0%}")
