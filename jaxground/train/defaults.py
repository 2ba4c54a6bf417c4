"""Config sections every training config shares (`configs/*.py` start from these and override)."""

from __future__ import annotations

from ml_collections import ConfigDict

# stages 1 and 2 train everything but the CLIP vision tower; stage 3 trains only the mask head
# (seg_prompt_mlp + SAM mask decoder); patterns are regexes searched in "a/b/c" variable paths
STAGE_TRAINABLE = {
    1: ((".*",), ("^vision/",)),
    2: ((".*",), ("^vision/",)),
    3: (("^mask_head/",), ()),
}


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ConfigDict:
    return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def optim(lr: float, *, warmup_ratio: float = 0.03, weight_decay: float = 0.0, clip_norm: float = 1.0) -> ConfigDict:
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
        }
    )


def train(stage: int, *, steps: int, batch_size: int, micro_steps: int = 1, log_every: int = 10,
          eval_every: int = 0, save_every: int = 1000, keep: int = 3, seed: int = 0) -> ConfigDict:
    trainable, frozen = STAGE_TRAINABLE[stage]
    return ConfigDict(
        {
            "stage": stage,
            "steps": steps,
            "batch_size": batch_size,  # global, over all processes and micro-steps
            "micro_steps": micro_steps,  # gradient accumulation
            "log_every": log_every,
            "eval_every": eval_every,  # 0 = only at the end
            "save_every": save_every,
            "keep": keep,
            "seed": seed,
            "trainable": trainable,
            "frozen": frozen,
        }
    )
