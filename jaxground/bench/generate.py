"""Batched greedy decoding: jitted JAX KV-cache `while_loop` vs HF `generate` (torch eager), same weights.

Both decode exactly `--new-tokens` tokens per prompt (eos disabled) from left-padded prompts of mixed
lengths, at each `--batches` size, in the same run. Compile time is printed separately; tokens/s counts the
generated tokens. The greedy tokens of both are compared as a sanity check.
"""

from __future__ import annotations

import time


def add_arguments(parser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt; others are shorter (left-padded)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32005)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per framework and batch")
    parser.add_argument("--seed", type=int, default=0)


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
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from jaxground.convert.llama import build
    from jaxground.infer.generate import GenerationConfig, generate_ids

    for name in ("prompt", "new_tokens", "layers", "hidden", "heads", "vocab", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        raise SystemExit(f"--batches must be >= 1, got {args.batches}")
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
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = jax.block_until_ready(generate_ids(llm, ids, mask, cfg).tokens)
        jax_s = (time.perf_counter() - start) / args.repeats

        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            hf.generate(input_ids=ids_t, attention_mask=mask_t, **kw)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                ref = hf.generate(input_ids=ids_t, attention_mask=mask_t, **kw)
            torch_s = (time.perf_counter() - start) / args.repeats
        same = float(np.mean(np.asarray(out) == ref[:, args.prompt:].numpy()))
        print(f"batch {batch:3d}: jax jit {tokens / jax_s:9,.0f} tok/s ({jax_s * 1e3:7.1f} ms; first call incl. "
              f"compile {first_s:.2f} s) | torch eager generate {tokens / torch_s:9,.0f} tok/s ({torch_s * 1e3:7.1f} ms)"
              f" | ratio {torch_s / jax_s:5.2f}x | same tokens {same:.0%}")
    return 0
