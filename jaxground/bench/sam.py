"""SAM image-encoder throughput (images/s): jitted JAX vs the official torch module on the same weights, timed in
alternating rounds (`_common.alternated`): rates are medians of the rounds, ratios the median of the per-round
ratios with their range."""

from __future__ import annotations

from jaxground.bench._common import alternated, machine


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--img-size", type=int, default=None, help="override the preset's img_size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3,
                        help="timed calls per variant and round, at least (and at least 2 s of them)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the variants")


def run(args) -> int:
    print(f"machine: {machine()}", flush=True)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from jaxground.convert.sam import image_encoder_rules
    from jaxground.convert.sam_reference import official_sam
    from jaxground.convert.table import load_into
    from jaxground.models.sam import PRESETS, Sam

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = PRESETS[args.preset](**({"img_size": args.img_size} if args.img_size else {}))
    torch_enc = official_sam(cfg).image_encoder.eval()
    state = {f"image_encoder.{k}": v.detach().numpy() for k, v in torch_enc.state_dict().items()}
    model = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0), with_decoder=False))
    load_into(
        model,
        ((k, lambda v=v: v) for k, v in state.items()),
        image_encoder_rules("image_encoder.", "image_encoder."),
    )
    x = (
        np.random.default_rng(0)
        .standard_normal((args.batch, cfg.img_size, cfg.img_size, 3))
        .astype(np.float32)
    )
    xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    # nnx.jit takes the module and walks its graph in Python on every call; jax.jit on the state split once
    # (as the training loop carries it) times the compiled encoder alone
    encode = nnx.jit(lambda m, im: m.image_encoder(im))
    graphdef, params = nnx.split(model)
    encode_split = jax.jit(lambda p, im: nnx.merge(graphdef, p).image_encoder(im))
    with torch.no_grad():
        diff = float(
            np.abs(np.asarray(encode(model, xj)) - torch_enc(xt).numpy().transpose(0, 2, 3, 1)).max()
        )
        timings = alternated({"split": lambda: encode_split(params, xj).block_until_ready(),
                                "nnx": lambda: encode(model, xj).block_until_ready(),
                                "torch": lambda: torch_enc(xt)}, args.rounds, args.iters, min_seconds=2.0 / args.rounds)
    t_jax, t_nnx, t_torch = (timings.median(k) for k in ("split", "nnx", "torch"))
    print(
        f"SAM image encoder {args.preset} img_size {cfg.img_size} batch {args.batch} "
        f"(threads: torch {torch.get_num_threads()}, JAX devices {jax.device_count()} {jax.default_backend()})"
    )
    print(f"  jax, jit on the split state  {args.batch / t_jax:8.3f} images/s  ({t_jax * 1e3:.1f} ms/batch)")
    print(f"  jax, nnx.jit on the module   {args.batch / t_nnx:8.3f} images/s  ({t_nnx * 1e3:.1f} ms/batch)")
    print(f"  torch                        {args.batch / t_torch:8.3f} images/s  ({t_torch * 1e3:.1f} ms/batch)")
    print(f"  ratio jax/torch {timings.ratio('torch', 'split')} (nnx.jit: {timings.ratio('torch', 'nnx')})   "
          f"max |diff| {diff:.2e}")
    return 0
