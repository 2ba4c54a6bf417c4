"""Ahead-of-time plan of a training step on a simulated mesh: per-device memory and FLOPs per step.

`jaxground bench plan --model 7b --stage 1 --mesh fsdp=8 --mesh fsdp=64` lowers and compiles the real train
step (`train.step.make_train_step` on the NExT-Chat loss of the stage) with abstract inputs only: the model
and optimizer state come from `nnx.eval_shape` / `jax.eval_shape` (no weight is ever allocated) and the batch
is `jax.ShapeDtypeStruct`s with their shardings. The CPU simulates the devices
(`--xla_force_host_platform_device_count`, set by this command, which re-executes itself when jax already
runs with fewer devices). Meshes are compiled one at a time, on the first N simulated devices.

Memory per device comes from `compiled.memory_analysis()`: arguments (parameters + optimizer state + batch),
temporaries, and outputs not aliased to donated arguments; parameters and optimizer state are split by
their sharded sizes. FLOPs per step are analytic matmul FLOPs (`step_flops`), because `cost_analysis()`
counts a scanned layer's body once.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

from jaxground.bench._common import BenchError

GIB = 1 << 30
CHIPS = (("TPU v5e", 16), ("TPU v4", 32), ("H100", 80), ("TPU v5p", 95))  # HBM GiB per chip
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser) -> None:
    parser.add_argument("--model", choices=("7b", "13b"), default="7b")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--mesh", action="append", default=None,
                        help="data=D,fsdp=F,tensor=T (missing axes = 1); repeat for several meshes "
                             "(default fsdp=8,tensor=1)")
    parser.add_argument("--batch-per-device", type=int, default=1, help="sequences per data shard")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's "
                        "max_len, 1024 with 576 image tokens)")
    parser.add_argument("--remat", choices=("full", "dots", "none"), default=None, help="default: the config's")
    parser.add_argument("--mu-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of AdamW's first moment")
    parser.add_argument("--micro-steps", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--configs", default="configs", help="the repository's configs directory")


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=8,tensor=2' -> {'data': 1, 'fsdp': 8, 'tensor': 2}; a clear error for anything else."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(data|fsdp|tensor)\s*=\s*(\d+)\s*", part)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"--mesh {text!r}: expected data=D,fsdp=F,tensor=T with positive sizes")
        sizes[m.group(1)] = int(m.group(2))
    return sizes


def _simulated_devices() -> int:
    m = re.search(_DEVICE_FLAG + r"=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def _ensure_devices(n: int) -> None:
    """Makes sure this process simulates >= n CPU devices: sets the flag and re-executes itself when jax has
    already been started with fewer (XLA reads the flag once, when its CPU backend starts)."""
    if _simulated_devices() >= n:
        return
    flags = re.sub(_DEVICE_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def run_config(size: str, stage: int, configs: str | Path):
    """The paper-scale run config (`configs/_nextchat.py`) for a model size and stage."""
    import importlib.util

    if stage not in (1, 2, 3):
        raise BenchError(f"stage {stage}: expected 1, 2 or 3")
    path = Path(configs) / "_nextchat.py"
    if not path.is_file():
        raise BenchError(f"--configs {configs}: no _nextchat.py there (run from the repository root)")
    spec = importlib.util.spec_from_file_location("_jaxground_nextchat_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config(size, stage)


def model_config(config, *, remat: str | None = None):
    """`config.model` -> NextChatConfig with LLaMA's special token ids (32000..32004), SAM when configured."""
    from jaxground.models.clip import ClipVisionConfig
    from jaxground.models.llama import LlamaConfig
    from jaxground.models.nextchat import NextChatConfig
    from jaxground.models.sam.config import SamConfig
    from jaxground.tokens import TokenIds

    m = config.model.to_dict()
    llm = {k: tuple(v) if isinstance(v, list) else v for k, v in m["llm"].items()}
    if llm.get("vocab_size", -1) == -1:
        llm["vocab_size"] = 32005
    if remat is not None:
        llm["remat"] = remat
    sam = m.get("sam")
    sam_cfg = None if sam is None else SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sam.items()})
    return NextChatConfig(llm=LlamaConfig(**llm), vision=ClipVisionConfig(**m["vision"]), projector=m["projector"],
                          freeze_vision=m["freeze_vision"], box_prior=m["box_prior"], tokens=TokenIds(), sam=sam_cfg)


def abstract_batch(config, cfg, batch: int, seq: int, mesh):
    """The training batch as ShapeDtypeStructs split over (data, fsdp)."""
    import jax
    import jax.numpy as jnp

    from jaxground.parallel import batch_sharding

    q, size = config.data.max_boxes, cfg.vision.image_size
    shapes = {
        "images": ((batch, size, size, 3), jnp.float32),
        "input_ids": ((batch, seq), jnp.int32),
        "attention_mask": ((batch, seq), jnp.bool_),
        "labels": ((batch, seq), jnp.int32),
        "boxes": ((batch, q, 4), jnp.float32),
        "box_mask": ((batch, q), jnp.bool_),
        "target_boxes": ((batch, q, 4), jnp.float32),
        "target_mask": ((batch, q), jnp.bool_),
        "valid": ((batch,), jnp.bool_),
    }
    if cfg.sam is not None:
        s, hm = config.data.sam_size, config.data.mask_size
        shapes |= {"sam_images": ((batch, s, s, 3), jnp.float32), "masks": ((batch, q, hm, hm), jnp.float32),
                   "mask_valid": ((batch, q), jnp.bool_), "mask_region": ((batch, hm, hm), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def _sharded_bytes(tree, shardings) -> int:
    import jax

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def plan_step(config, mesh_sizes: dict[str, int], *, batch_per_device: int = 1, seq: int | None = None,
              remat: str | None = None, mu_dtype: str = "float32", micro_steps: int = 1, devices=None) -> dict:
    """Compiles the train step of `config` for a mesh of `mesh_sizes` on the first devices -> figures
    (bytes per device, FLOPs per step, compile seconds). Nothing is allocated."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxground.bench._common import param_count, step_flops
    from jaxground.data.batch import Batch
    from jaxground.models.nextchat import NextChat, nextchat_loss
    from jaxground.ops.losses import DET_PRESETS
    from jaxground.parallel import make_mesh
    from jaxground.train.state import PathFilter, make_optimizer, plan
    from jaxground.train.step import jit_train_step, make_train_step

    n = math.prod(mesh_sizes.values())
    devices = (devices or jax.devices())
    if len(devices) < n:
        raise ValueError(f"mesh {mesh_sizes} needs {n} devices, this process has {len(devices)}")
    mesh = make_mesh(mesh_sizes, devices=devices[:n])
    cfg = model_config(config, remat=remat)
    seq = seq or config.data.max_len
    if seq < cfg.vision.num_patches + 2:
        raise ValueError(f"seq {seq} is shorter than the {cfg.vision.num_patches} image tokens + 2")
    shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
    batch = batch_per_device * shards * micro_steps
    trainable = PathFilter(config.train.trainable, config.train.frozen)
    if mu_dtype == "float32":
        tx = make_optimizer(config.optim, config.train.steps)
    else:  # the same chain with a bfloat16 first moment
        o = config.optim
        from jaxground.train.state import make_schedule

        chain = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
        chain.append(optax.adamw(make_schedule(o, config.train.steps), b1=o.b1, b2=o.b2, eps=o.eps,
                                 weight_decay=o.weight_decay, mu_dtype=jnp.dtype(mu_dtype)))
        tx = optax.chain(*chain)
    w_l1, w_giou = DET_PRESETS[config.loss.det]

    def loss_fn(model, b):
        b = Batch(**b)
        total, parts = nextchat_loss(model(b), b, w_l1=w_l1, w_giou=w_giou, w_cycle=config.loss.w_cycle)
        return total, {"ce": parts["ce"]}

    graphdef, abstract, shardings = plan(lambda: NextChat(cfg, rngs=nnx.Rngs(0)), tx, trainable, mesh)
    step = jit_train_step(make_train_step(graphdef, loss_fn, tx, trainable, micro_steps=micro_steps),
                          shardings, mesh)
    batch_specs = abstract_batch(config, cfg, batch, seq, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(abstract, batch_specs).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    params, _ = nnx.split_state(abstract.model, trainable, ...)
    return {
        "mesh": mesh_sizes,
        "devices": n,
        "batch": batch,
        "seq": seq,
        "params_total": param_count(abstract.model),
        "params_trainable": param_count(params),
        "param_bytes": _sharded_bytes(abstract.model, shardings.model),
        "opt_bytes": _sharded_bytes(abstract.opt, shardings.opt),
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes - mem.alias_size_in_bytes,
        "flops": step_flops(cfg, abstract.model, batch, seq, llm_trained=config.train.stage in (1, 2),
                            vision_trained=not config.model.freeze_vision, triggers=config.data.max_boxes),
        "compile_s": compile_s,
    }


def peak_bytes(figures: dict) -> int:
    """Arguments + temporaries + outputs that do not reuse a donated argument."""
    return figures["argument_bytes"] + figures["temp_bytes"] + figures["output_bytes"]


def fits(figures: dict) -> str:
    peak = peak_bytes(figures) / GIB
    return ", ".join(name for name, hbm in CHIPS if peak <= hbm) or "none"


def run(args) -> int:
    if args.batch_per_device < 1 or args.micro_steps < 1 or (args.seq is not None and args.seq < 1):
        raise BenchError("--batch-per-device, --micro-steps and --seq must be >= 1")
    try:
        meshes = [parse_mesh(m) for m in (args.mesh or ["fsdp=8,tensor=1"])]
    except ValueError as e:
        raise BenchError(str(e)) from None

    _ensure_devices(max(math.prod(m.values()) for m in meshes))
    config = run_config(args.model, args.stage, args.configs)
    print(f"NExT-Chat {args.model} stage {args.stage}: remat {args.remat or config.model.llm.remat}, "
          f"LLM {config.model.llm.dtype} compute on {config.model.llm.param_dtype} weights, AdamW mu "
          f"{args.mu_dtype}, {args.batch_per_device} sequence(s) per data shard x {args.micro_steps} micro-step(s)")
    print("| mesh (data,fsdp,tensor) | T | params GiB | optimizer GiB | arguments GiB | temporaries GiB | "
          "peak GiB/device | fits (HBM) | TFLOP/step | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sizes in meshes:
        f = plan_step(config, sizes, batch_per_device=args.batch_per_device, seq=args.seq, remat=args.remat,
                      mu_dtype=args.mu_dtype, micro_steps=args.micro_steps)
        mesh = ",".join(str(sizes[a]) for a in ("data", "fsdp", "tensor"))
        print(f"| {mesh} ({f['devices']} dev, batch {f['batch']}) | {f['seq']} | {f['param_bytes'] / GIB:.2f} | "
              f"{f['opt_bytes'] / GIB:.2f} | {f['argument_bytes'] / GIB:.2f} | {f['temp_bytes'] / GIB:.2f} | "
              f"{peak_bytes(f) / GIB:.2f} | {fits(f)} | {f['flops'] / 1e12:.1f} | {f['compile_s']:.1f} |",
              flush=True)
    print(f"params: {f['params_total'] / 1e9:.2f}B total, {f['params_trainable'] / 1e9:.3f}B trained; "
          f"HBM per chip: " + ", ".join(f"{n} {h} GiB" for n, h in CHIPS))
    return 0
