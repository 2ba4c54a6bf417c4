"""`jaxground convert SRC [SRC ...] --out DIR [--dtype float32|bfloat16]`: PyTorch checkpoints -> a converted
JAX checkpoint (`load_converted(DIR)`).

Each SRC's kind is detected from its keys: a released NExT-Chat directory (+ a CLIP source when it was saved
without the vision tower), or one HF LLaMA/Vicuna directory, one HF CLIP(-vision) checkpoint, one SAM
checkpoint (official `.pth` or HF), or LLaMA + CLIP [+ official SAM] composed into a fresh NExT-Chat. Every key
is checked against the model from shapes alone before a tensor is read; tensors are then read one at a time
(memory-mapped), cast, and streamed to disk, so the model is never whole in memory.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from flax import nnx

from jaxground.convert import detect_kind
from jaxground.convert import nextchat as nc
from jaxground.convert.store import Part, StoreWriter, model_factory, plan, stored_variables
from jaxground.convert.store import run as stream_into
from jaxground.convert.table import Rule
from jaxground.paths import unwritable_dir


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC", help="checkpoint directories or weight files")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter dtype of the converted LLM, CLIP and heads (SAM stays float32)")
    parser.add_argument("--select-layer", type=int, default=-2, help="CLIP hidden state fed to the projector "
                        "when composing (a released NExT-Chat config's mm_vision_select_layer wins)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh heads and the random `<im_patch>` "
                        "rows when composing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def prepare(sources: list, *, dtype: str = "float32", select_layer: int = -2, seed: int = 0):
    """(kind, jaxground config, parts, fresh arrays {path: (array, layout entry)}) for the given sources."""
    from jaxground.convert import clip as clip_conv
    from jaxground.convert import llama as llama_conv
    from jaxground.convert import sam as sam_conv
    from jaxground.convert.reader import keys_and_shapes
    from jaxground.models.clip import ClipVisionConfig
    from jaxground.models.llama import LlamaConfig

    by_kind: dict[str, list] = {}
    shapes = {}
    for src in sources:
        s = keys_and_shapes(src)
        kind = detect_kind(src)
        by_kind.setdefault(kind, []).append(src)
        shapes[str(src)] = s
    kinds = sorted(by_kind)
    if any(len(v) > 1 for v in by_kind.values()):
        raise ValueError(f"one source per kind, got {by_kind}")

    def hf(src):
        return llama_conv.hf_config(src, None)

    if kinds == ["nextchat"] or kinds == ["clip", "nextchat"]:
        src, clip = by_kind["nextchat"][0], by_kind.get("clip", [None])[0]
        vision = ClipVisionConfig.from_hf(hf(clip)) if clip is not None else None
        cfg = nc.released_config(shapes[str(src)], nc.read_hf_config(src), vision=vision, dtype=dtype)
        return "nextchat", cfg, nc.released_parts(src, shapes[str(src)], cfg, clip), {}
    if kinds in (["clip", "llama"], ["clip", "llama", "sam"]):
        llm, clip, sam = by_kind["llama"][0], by_kind["clip"][0], by_kind.get("sam", [None])[0]
        sam_cfg = sam_conv.config_from_shapes(shapes[str(sam)]) if sam is not None else None
        llm_hf = hf(llm)
        cfg, base = nc.compose_config(llm_hf, ClipVisionConfig.from_hf(hf(clip)), sam_cfg, dtype=dtype,
                                      select_layer=select_layer)
        init_std = getattr(llm_hf, "initializer_range", 0.02)  # the `<im_patch>` rows, as resize_token_embeddings
        parts = [nc.llm_part(llm, cfg, base, seed=seed, init_std=init_std), nc.clip_part(clip, cfg.vision)]
        if sam is not None:
            parts.append(nc.sam_part(sam, shapes[str(sam)], sam_cfg))
        return "nextchat", cfg, parts, nc.fresh_heads(cfg, seed)
    if len(kinds) == 1:
        kind, src = kinds[0], by_kind[kinds[0]][0]
        if kind == "llama":
            cfg = LlamaConfig.from_hf(hf(src), dtype=dtype, param_dtype=dtype)
            rules = llama_conv.llama_rules(tied=cfg.tie_embeddings)
        elif kind == "clip":
            cfg = ClipVisionConfig.from_hf(hf(src), dtype=dtype, param_dtype=dtype)
            rules = clip_conv.clip_rules(learned_positions=cfg.position_embedding == "learned") + clip_conv.TEXT_SIDE
        else:
            cfg = sam_conv.config_from_shapes(shapes[str(src)])
            prefix, is_hf = sam_conv.find_prefix(shapes[str(src)])
            rules = sam_conv.sam_rules(prefix, hf=is_hf, iou_head_depth=cfg.iou_head_depth)
            if is_hf and f"{prefix}prompt_encoder.shared_embedding.positional_embedding" not in shapes[str(src)]:
                # transformers 5 saves the tied Gaussian matrix once, at the top level
                rules.insert(0, Rule(re.escape(prefix) + r"shared_image_embedding\.positional_embedding",
                                     "prompt_encoder.gaussian"))
        return kind, cfg, [Part(src, tuple(rules), label=kind)], {}
    raise ValueError(f"cannot combine sources of kinds {kinds}: give one checkpoint, a NExT-Chat checkpoint "
                     "(+ CLIP), or LLaMA + CLIP [+ SAM]")


def _progress(start: float, every: float = 2.0):
    last = [0.0]

    def report(done: int, total: int, nbytes: int) -> None:
        now = time.time()
        if now - last[0] >= every or done == total:
            last[0] = now
            print(f"  {done}/{total} tensors, {nbytes / 2**30:.2f} GiB, {now - start:.0f} s", file=sys.stderr,
                  flush=True)

    return report


def convert(sources: list, out: str | Path, *, dtype: str = "float32", select_layer: int = -2, seed: int = 0,
            overwrite: bool = False, flush_bytes: int = 256 << 20, quiet: bool = False) -> Path:
    """Converts `sources` into the checkpoint directory `out` (see the module docstring); returns `out`."""
    kind, cfg, parts, fresh = prepare(sources, dtype=dtype, select_layer=select_layer, seed=seed)
    variables = stored_variables(nnx.eval_shape(model_factory(kind, cfg)))
    assignments = plan(variables, parts, fresh=fresh.keys(), context=kind)
    if not quiet:
        print(f"converting {kind}: {len(assignments)} tensors from {', '.join(map(str, sources))}"
              f"{f' + {len(fresh)} fresh head arrays' if fresh else ''}", file=sys.stderr)
    with StoreWriter(out, flush_bytes=flush_bytes, overwrite=overwrite) as writer:
        for path, (array, _) in fresh.items():
            writer.add(path, array.astype(variables[path].get_value().dtype))
        stream_into(variables, parts, assignments, writer.add, None if quiet else _progress(time.time()))
        layout = [entry for _, entry in fresh.values()] + [a.entry for a in assignments]
        return writer.commit(kind, cfg, layout)


def run(args) -> int:
    if problem := unwritable_dir(args.out):
        print(f"jaxground convert: --out: {problem}", file=sys.stderr)
        return 2
    try:
        out = convert(args.sources, args.out, dtype=args.dtype, select_layer=args.select_layer, seed=args.seed,
                      overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConversionError is a ValueError
        print(f"jaxground convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
