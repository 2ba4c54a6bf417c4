"""NExT-Chat train step: jit-compiled JAX vs a PyTorch reference of the same architecture, same weights, same batch.

The reference is HF `LlamaForCausalLM` + HF `CLIPVisionModel` (layer -2, CLS dropped) + the mlp2x_gelu projector
+ the box encoder G and decoder F as torch `Sequential`s, with the same loss (CE + 2 L1 + 0.2 (1 - GIoU) +
cycle) and AdamW after clipping the gradient norm to 1, in torch eager and, when it works here, with the
loss function under `torch.compile`. Its weights are converted to the JAX model by `jaxground.convert`
(the released NExT-Chat layout). The JAX step is the project's own (`train.step.make_train_step`).

The frameworks' steps are timed in alternating rounds (`_common.alternated`), so a shared host's load falls on
both alike. Prints per config: samples/s of both (medians of the rounds), their ratio (the median of the
per-round ratios, and their range), the first-step loss of both (same computation check) and the JAX step's
model-FLOP utilisation (`_common.step_flops` / step time) against this machine's float32 matmul peak: the faster
of a large jitted JAX matmul and the same matmul in torch, each the best of three rounds, measured in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from jaxground.bench._common import BenchError
from jaxground.paths import unwritable_dir

# name -> (HF LLaMA fields, HF CLIP fields, batch, tokens, vision frozen)
SIZES = {
    # the embedded default's model (configs/tiny_shapes.py) with learned CLIP positions, as HF CLIP has
    "tiny": ({"vocab_size": 512, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4},
             {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2},
             32, 96, False),
    # ~100M parameters: a 6-layer LLaMA at width 768 with the full 32005 vocabulary, a 4-layer CLIP at 512;
    # vision frozen as in stage 1
    "100m": ({"vocab_size": 32005, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6,
                  "num_attention_heads": 12},
             {"image_size": 112, "patch_size": 14, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4},
             8, 128, True),
}
BOXES = 4  # per sample: one in the question, three answered by triggers
W_L1, W_GIOU, LR = 2.0, 0.2, 1e-4  # the released detection weights; constant learning rate


def add_arguments(parser) -> None:
    parser.add_argument("--size", action="append", choices=sorted(SIZES), default=None,
                        help="model size; repeat for several (default: tiny and 100m)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 (tiny), 8 (100m)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample; default 96 (tiny), 128 (100m)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per framework and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds alternating the frameworks; step times are medians of the rounds, ratios the "
                             "median (and range) of the per-round ratios")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="also trace the JAX step with jax.profiler into DIR and print its time per XLA op kind")
    parser.add_argument("--label-tokens", type=int, default=-1,
                        help="JAX's train.label_tokens: the LM head only at this many supervised positions per row; "
                             "-1 (default) = the batch's most, rounded up to 8; 0 = every position, like the reference")


def _seq(*dims, act):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(dims[0], dims[1]), act(), torch.nn.Linear(dims[1], dims[2]))


def torch_model(llama_fields: dict, clip_fields: dict, seq: int) -> dict:
    """The PyTorch reference's modules, randomly initialised (HF zero biases / unit norms perturbed)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    d, dv = llama_fields["hidden_size"], clip_fields["hidden_size"]
    parts = {
        "llama": LlamaForCausalLM(HFLlamaConfig(**llama_fields, max_position_embeddings=max(seq, 128),
                                             attn_implementation="eager")),
        # OpenAI CLIP head width 64: the converter reads the tower's config off its weights with it
        "clip": CLIPVisionModel(CLIPVisionConfig(**clip_fields, num_attention_heads=dv // 64,
                                              attn_implementation="eager")),
        "projector": _seq(dv, d, d, act=torch.nn.GELU),
        "loc_encoder": _seq(4, d // 2, d, act=torch.nn.ReLU),
        "loc_decoder": _seq(d, d // 2, 4, act=torch.nn.ReLU),
    }
    with torch.no_grad():
        for name in ("llama", "clip"):
            for p in parts[name].parameters():
                p.add_(torch.randn(p.shape) * 0.02)
    return parts


def released_checkpoint(parts: dict, vision_width: int) -> tuple[dict, dict]:
    """(state dict in the released NExT-Chat layout, its config.json dict)."""
    state = dict(parts["llama"].state_dict())
    state |= {f"model.vision_tower.{k if k.startswith('vision_model.') else 'vision_model.' + k}": v
              for k, v in parts["clip"].state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in parts["projector"].state_dict().items()}
    for name in ("loc_encoder", "loc_decoder"):
        state |= {f"{name}.{k}": v for k, v in parts[name].state_dict().items()}
    config = parts["llama"].config.to_dict() | {"model_type": "nextchat", "mm_depth": 2, "mm_hidden_size": vision_width,
                                                    "mm_vision_select_layer": -2, "use_mm_proj": True}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, config


def check_text_room(seq: int, patches: int) -> None:
    """Refuses a sequence too short for the benchmark batch's question and answer after the image block."""
    if seq - patches - 3 < 24:
        raise BenchError(f"--seq {seq} leaves {seq - patches - 3} text tokens after {patches} image tokens; need >= 24")


def make_batch(tokens, vocab: int, batch: int, seq: int, image_size: int, patches: int, seed: int) -> dict:
    """A training batch (numpy, `Batch` field names): image block, a question with one box, an answer with
    three triggers; every row is full length (no padding)."""
    import numpy as np

    check_text_room(seq, patches)
    text = seq - patches - 3
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab - 5, (batch, seq)).astype(np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2 + patches] = tokens.bos, tokens.im_start, tokens.im_end
    ids[:, 2:2 + patches] = tokens.im_patch
    t0 = patches + 3  # first text position
    answer = t0 + text // 3
    slots = [t0 + 1] + [answer + 2 + 4 * k for k in range(BOXES - 1)]
    for s in slots:
        ids[:, s], ids[:, s + 1] = tokens.at, tokens.boxes
    ids[:, -1] = tokens.eos
    labels = np.where(np.arange(seq) >= answer, ids, -100).astype(np.int32)
    labels[ids == tokens.boxes] = -100
    lo = rng.uniform(0.0, 0.5, (batch, BOXES, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (batch, BOXES, 2))], -1).astype(np.float32)
    targets = np.zeros_like(boxes)
    targets[:, :BOXES - 1] = boxes[:, 1:]
    return {
        "images": rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), bool),
        "labels": labels,
        "boxes": boxes,
        "box_mask": np.ones((batch, BOXES), bool),
        "target_boxes": targets,
        "target_mask": np.arange(BOXES)[None].repeat(batch, 0) < BOXES - 1,
        "valid": np.ones((batch,), bool),
    }


def _giou(a, b):
    import torch

    def area(x):
        return (x[..., 2] - x[..., 0]).clamp(min=0) * (x[..., 3] - x[..., 1]).clamp(min=0)

    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area(a) + area(b) - inter
    lt, rb = torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return inter / union.clamp(min=1e-6) - (enclosing - union) / enclosing.clamp(min=1e-6)


def torch_loss_fn(parts: dict, tokens, frozen_vision: bool):
    """loss(batch of torch tensors) -> scalar: the NExT-Chat stage-1 loss, computed the reference way."""
    import torch
    import torch.nn.functional as F

    llama, d = parts["llama"], parts["llama"].config.hidden_size

    def loss(b):
        ids, labels = b["input_ids"], b["labels"]
        with torch.no_grad() if frozen_vision else contextlib.nullcontext():
            feats = parts["clip"](pixel_values=b["images"], output_hidden_states=True).hidden_states[-2][:, 1:]
        embeds = llama.model.embed_tokens(ids).clone()
        embeds[ids == tokens.im_patch] = parts["projector"](feats).reshape(-1, d)
        box_embeds = parts["loc_encoder"](b["boxes"])  # [B,Q,D]; row r's q-th <boxes> takes box q
        embeds[ids == tokens.boxes] = box_embeds.reshape(-1, d)
        out = llama(inputs_embeds=embeds, attention_mask=b["attention_mask"], output_hidden_states=True)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        trigger = (ids == tokens.at) & (labels == tokens.at)
        states = out.hidden_states[-1][trigger].view(ids.shape[0], BOXES - 1, d)
        pred = parts["loc_decoder"](states)
        target = b["target_boxes"][:, :BOXES - 1]
        det = W_L1 * (pred - target).abs().mean() + W_GIOU * (1 - _giou(pred, target)).mean()
        cyc = (parts["loc_decoder"](box_embeds) - b["boxes"]).abs().mean()
        cyc = cyc + (parts["loc_encoder"](pred) - states).square().mean()
        return ce + det + cyc

    return loss


def torch_step_fn(parts: dict, loss_fn, frozen_vision: bool):
    import torch

    params = [p for name, m in parts.items() if not (frozen_vision and name == "clip") for p in m.parameters()]
    for p in parts["clip"].parameters():
        p.requires_grad_(not frozen_vision)
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step


def jax_step_fn(model, frozen_vision: bool, label_tokens: int):
    """(jitted step(state, batch) -> (state, metrics), initial TrainState): the project's train step, its LM head
    at `label_tokens` supervised positions per row (0 = all, as the reference)."""
    import jax
    import optax
    from flax import nnx

    from jaxground.data.batch import Batch
    from jaxground.models.nextchat import nextchat_loss
    from jaxground.train.state import PathFilter, init_state
    from jaxground.train.step import make_train_step

    trainable = PathFilter((".*",), ("^vision/",) if frozen_vision else ())
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))

    def loss_fn(m, b):
        b = Batch(**b)
        return nextchat_loss(m(b, label_tokens), b, w_l1=W_L1, w_giou=W_GIOU, w_cycle=1.0)[0], {}

    graphdef, model_state = nnx.split(model)
    step = jax.jit(make_train_step(graphdef, loss_fn, tx, trainable), donate_argnums=0)
    return step, init_state(model_state, tx, trainable)


def bench_size(name: str, args, peak: float) -> dict:
    import jax
    import torch
    from flax import nnx

    from jaxground.bench._common import alternated, param_count, step_flops
    from jaxground.convert.nextchat import build
    from jaxground.ops.losses import count_supervised

    llama_fields, clip_fields, batch, seq, frozen = SIZES[name]
    batch, seq = args.batch or batch, args.seq or seq
    torch.manual_seed(args.seed)
    parts = torch_model(llama_fields, clip_fields, seq)
    state_dict, hf_config = released_checkpoint(parts, clip_fields["hidden_size"])
    model = build(state_dict, config=hf_config)
    model.cfg = dataclasses.replace(model.cfg, freeze_vision=frozen)
    cfg, tokens = model.cfg, model.cfg.tokens
    data = make_batch(tokens, cfg.llm.vocab_size, batch, seq, cfg.vision.image_size, cfg.vision.num_patches,
                      args.seed)
    label_tokens = args.label_tokens
    if label_tokens < 0:
        label_tokens = -(-count_supervised(data["labels"]) // 8) * 8
    elif label_tokens and label_tokens < count_supervised(data["labels"]):
        raise BenchError(f"--label-tokens {label_tokens} is fewer than the {count_supervised(data['labels'])} "
                         "supervised tokens per row of the benchmark batch")
    head_rows = min(label_tokens, seq) if label_tokens else seq
    flops = step_flops(cfg, nnx.state(model), batch, seq, llm_trained=True, vision_trained=not frozen,
                       triggers=BOXES, head_tokens=head_rows)
    torch_flops = step_flops(cfg, nnx.state(model), batch, seq, llm_trained=True, vision_trained=not frozen,
                             triggers=BOXES)
    n_params = param_count(nnx.state(model, nnx.Param))

    step, state = jax_step_fn(model, frozen, label_tokens)
    del model
    batch_j = {k: jax.numpy.asarray(v) for k, v in data.items()}
    start = time.perf_counter()
    state, metrics = step(state, batch_j)
    jax_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - start

    def jax_once():
        nonlocal state
        state, m = step(state, batch_j)
        jax.block_until_ready(m)

    profile = None
    if args.profile:
        from jaxground.bench._profile import op_breakdown

        jax_once()  # warm-up
        hlo = step.lower(state, batch_j).compile().as_text()
        profile = op_breakdown(jax_once, args.repeats, f"{args.profile}/{name}", hlo)

    batch_t = {k: torch.from_numpy(v) for k, v in data.items()}
    batch_t["images"] = batch_t["images"].permute(0, 3, 1, 2).contiguous()
    batch_t["input_ids"], batch_t["labels"] = batch_t["input_ids"].long(), batch_t["labels"].long()
    batch_t["attention_mask"] = batch_t["attention_mask"].long()
    loss_fn = torch_loss_fn(parts, tokens, frozen)
    eager = torch_step_fn(parts, loss_fn, frozen)
    torch_loss = eager(batch_t)  # the first step: same weights, same batch as JAX's first step
    steps = {"jax": jax_once, "eager": lambda: eager(batch_t)}

    compile_t = compile_error = None
    if not args.no_torch_compile:
        try:
            compiled = torch_step_fn(parts, torch.compile(loss_fn), frozen)
            start = time.perf_counter()
            compiled(batch_t)
            compile_t = time.perf_counter() - start
            steps["compiled"] = lambda: compiled(batch_t)
        except Exception as e:  # noqa: BLE001 - any failure of torch.compile here is reported, not fatal
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    timings = alternated(steps, args.rounds, args.repeats)
    return {"name": name, "params": n_params, "batch": batch, "seq": seq, "frozen": frozen, "flops": flops,
            "torch_flops": torch_flops, "head_rows": head_rows, "timings": timings,
            "compile_s": compile_s, "compile_t": compile_t, "compile_error": compile_error,
            "mfu": flops / timings.median("jax") / peak, "loss_diff": abs(jax_loss - torch_loss), "jax_loss": jax_loss,
            "torch_loss": torch_loss, "profile": profile}


def run(args) -> int:
    for name in ("repeats", "rounds") + (("batch",) if args.batch is not None else ()) + (("seq",) if args.seq is not None else ()):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.label_tokens < -1:
        raise BenchError(f"--label-tokens must be -1 (auto), 0 (every position) or a count, got {args.label_tokens}")
    for name in args.size or ["tiny", "100m"]:  # before the minutes of measuring
        _, clip, _, seq, _ = SIZES[name]
        check_text_room(args.seq or seq, (clip["image_size"] // clip["patch_size"]) ** 2)
    if args.profile and (problem := unwritable_dir(args.profile)):
        raise BenchError(f"--profile: {problem}")
    import jax
    import torch

    from jaxground.bench._common import jax_matmul_rate, machine, torch_matmul_rate

    # the machine's peak is what its faster GEMM library reaches: on some hosts torch's is well ahead of JAX's
    rates = {"JAX": jax_matmul_rate(), "torch": torch_matmul_rate()}
    best = max(rates, key=rates.get)
    peak = rates[best]
    print(f"machine: {machine()}; JAX {jax.devices()[0].platform} x{jax.device_count()}, torch threads {torch.get_num_threads()}; "
          f"float32 2048^3 matmul: JAX (jitted) {rates['JAX'] / 1e9:.1f} GFLOP/s, torch {rates['torch'] / 1e9:.1f} GFLOP/s; "
          f"peak, the MFU denominator: {peak / 1e9:.1f} GFLOP/s ({best}'s)")
    print("| model | params | batch x T | JAX step s | JAX samples/s | MFU | torch eager s | torch samples/s | "
          "torch.compile s | JAX / eager | JAX / compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name in args.size or ["tiny", "100m"]:
        r = bench_size(name, args, peak)
        t = r["timings"]
        sec = {k: t.median(k) for k in t.seconds}
        comp = f"{sec['compiled']:.3f}" if "compiled" in sec else "failed" if r["compile_error"] else "skipped"
        print(f"| {name}{' (vision frozen)' if r['frozen'] else ''} | {r['params'] / 1e6:.1f}M | "
              f"{r['batch']} x {r['seq']} | {sec['jax']:.3f} | {r['batch'] / sec['jax']:.1f} | {100 * r['mfu']:.1f}% | "
              f"{sec['eager']:.3f} | {r['batch'] / sec['eager']:.1f} | {comp} | {t.ratio('eager', 'jax')} | "
              f"{t.ratio('compiled', 'jax') if 'compiled' in sec else '-'} |", flush=True)
        notes.append(f"{name}: JAX {r['flops'] / 1e9:.1f} GFLOP/step (analytic; LM head at {r['head_rows']} of "
                     f"{r['seq']} positions), the reference {r['torch_flops'] / 1e9:.1f}; "
                     f"JAX compile {r['compile_s']:.1f} s"
                     + (f", torch.compile first step {r['compile_t']:.1f} s" if r["compile_t"] else "")
                     + (f", torch.compile failed: {r['compile_error']}" if r["compile_error"] else "")
                     + f"; first-step loss JAX {r['jax_loss']:.5f} vs torch {r['torch_loss']:.5f} "
                       f"(|diff| {r['loss_diff']:.1e}); minor page faults per step JAX {t.faults['jax']:,.0f}, "
                       f"torch {t.faults['eager']:,.0f}")
        if r["profile"]:
            busy, rows = r["profile"]
            notes.append(f"{name} JAX step profile (under the tracer, summed over threads): ops {busy:.1f} ms per "
                         f"step; longest kinds: "
                         + ", ".join(f"{kind} {ms:.1f} ms ({n:.0f}x)" for kind, ms, n in rows[:8]))
    print("\n".join(notes))
    return 0
