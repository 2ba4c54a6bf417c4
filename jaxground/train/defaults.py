"""Config sections every training config shares (`configs/*.py` start from these and override)."""

from __future__ import annotations

import json

from ml_collections import ConfigDict

# stages 1 and 2 train everything but the CLIP vision tower; stage 3 trains only the mask head
# (seg_prompt_mlp + SAM mask decoder); patterns are regexes searched in "a/b/c" variable paths
STAGE_TRAINABLE = {
    1: ((".*",), ("^vision/",)),
    2: ((".*",), ("^vision/",)),
    3: (("^mask_head/(seg_prompt_mlp|mask_decoder)/",), ()),
}


def stage_patterns_hint(stage: int) -> str:
    """The overrides that give `stage` its default trainable set, as a command line takes them."""
    trainable, frozen = STAGE_TRAINABLE[stage]
    return f"train.trainable='{json.dumps(trainable)}' train.frozen='{json.dumps(frozen)}'"


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ConfigDict:
    return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def optim(lr: float, *, warmup_ratio: float = 0.03, weight_decay: float = 0.0, clip_norm: float = 1.0,
          decay: str = "hf") -> ConfigDict:
    """`decay`: which arrays weight decay reaches, "hf" (all but biases and norm scales, as HF Trainer) or "all"."""
    return ConfigDict(
        {
            "lr": lr,
            "warmup_ratio": warmup_ratio,
            "min_lr_ratio": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "clip_norm": clip_norm,
            "decay": decay,
        }
    )


def train(stage: int, *, steps: int, batch_size: int, micro_steps: int = 1, log_every: int = 10,
          eval_every: int = 0, save_every: int = 1000, keep: int = 3, seed: int = 0,
          label_tokens: int = 0) -> ConfigDict:
    trainable, frozen = STAGE_TRAINABLE[stage]
    return ConfigDict(
        {
            "stage": stage,
            "steps": steps,
            "batch_size": batch_size,  # global, over all processes and micro-steps
            "micro_steps": micro_steps,  # gradient accumulation
            # > 0: the LM head runs only at this many supervised positions per row (a row with more stops the run)
            "label_tokens": label_tokens,
            "log_every": log_every,
            "eval_every": eval_every,  # 0 = only at the end
            "save_every": save_every,
            "keep": keep,
            "seed": seed,
            "trainable": trainable,
            "frozen": frozen,
            # path prefixes that `--init-from` may lack (initialised fresh instead), e.g. the stage-3 mask head
            "fresh": (),
        }
    )


def loss(det: str = "released", w_cycle: float = 1.0, seg: str = "focal") -> ConfigDict:
    """Loss presets: `det` in ops.losses.DET_PRESETS ("paper" 1:0.4 or "released" 2:0.2 for L1:GIoU),
    `seg` in ops.mask_losses.NAMES (stage 3: "focal" (the official terms, averaged over masks; default), "lisa",
    or "released" (the official forward as written, its scale growing with the batch's mask count))."""
    return ConfigDict({"det": det, "w_cycle": w_cycle, "seg": seg})


def llama(size: str, **overrides) -> ConfigDict:
    """LLaMA-2 / Vicuna shapes; `dtype` bfloat16 compute over float32 master weights, layers scanned and
    rematerialised (the settings that fit 7B on 16 GiB chips with FSDP; README, Performance)."""
    shapes = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32),
        "13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40),
    }[size]
    base = dict(vocab_size=32005, rms_eps=1e-5, rope_theta=10000.0, max_position=4096, dtype="bfloat16",
                param_dtype="float32", scan_layers=True, remat="full", **shapes)
    base.update(overrides)
    return ConfigDict(base)


def clip_vit_l14_336(**overrides) -> ConfigDict:
    base = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                layer_norm_eps=1e-5, select_layer=-2, position_embedding="learned", dtype="bfloat16",
                param_dtype="float32")
    base.update(overrides)
    return ConfigDict(base)


def sam_vit_h() -> ConfigDict:
    return ConfigDict(dict(img_size=1024, patch_size=16, width=1280, depth=32, num_heads=16,
                           global_attn_indexes=(7, 15, 23, 31), prompt_dim=256))


def dataset(kind: str, path: str, split: str = "train", weight: float = 1.0, image_root: str = "") -> dict:
    """One entry of `data.datasets` (kinds: `jaxground.data.sources.READERS`, `shapes`, `records`)."""
    return {"kind": kind, "path": path, "split": split, "image_root": image_root, "weight": weight}


# the grounding / VQA / caption mixture of stages 1 and 2, by name; paths are relative to DATA_ROOT (override
# `data.datasets.<name>.path` per dataset, or edit DATA_ROOT in a copy of the config)
DATA_ROOT = "data"
COCO_IMAGES = f"{DATA_ROOT}/coco/train2014"


def grounding_mixture(*, with_llava: bool) -> dict:
    mix = {
        "refcoco": dataset("refcoco", f"{DATA_ROOT}/refcoco", "train", 1.0, COCO_IMAGES),
        "refcoco+": dataset("refcoco", f"{DATA_ROOT}/refcoco+", "train", 1.0, COCO_IMAGES),
        "refcocog": dataset("refcoco", f"{DATA_ROOT}/refcocog", "train", 1.0, COCO_IMAGES),
        "flickr30k": dataset("flickr", f"{DATA_ROOT}/flickr30k", "train", 1.0, f"{DATA_ROOT}/flickr30k/images"),
        "vg": dataset("vg", f"{DATA_ROOT}/vg/region_descriptions.json", "train", 0.5, f"{DATA_ROOT}/vg/images"),
        "v7w": dataset("v7w", f"{DATA_ROOT}/v7w/dataset_v7w_pointing.json", "train", 0.5, f"{DATA_ROOT}/v7w/images"),
    }
    if with_llava:
        # the json names images `000000033471.jpg`, train2014 holds `COCO_train2014_000000033471.jpg`
        mix["llava"] = dataset("llava", f"{DATA_ROOT}/llava/llava_instruct_150k.json", "train", 1.0, COCO_IMAGES) | {
            "coco_prefix": True}
    return mix
