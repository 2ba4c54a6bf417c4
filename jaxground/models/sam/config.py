"""SAM configuration: presets `vit_b`, `vit_l`, `vit_h` (the official sizes) and `tiny` (tests, synthetic runs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SamConfig:
    img_size: int = 1024
    patch_size: int = 16
    width: int = 768  # ViT width
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_dim: int = 256  # neck out_chans = prompt encoder / mask decoder width
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.prompt_dim % 8 or (self.prompt_dim // self.attention_downsample_rate) % self.decoder_heads:
            raise ValueError(
                f"prompt_dim {self.prompt_dim} must be a multiple of 8 and of decoder heads x downsample"
            )
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {self.global_attn_indexes} outside 0..{self.depth - 1}")

    @property
    def grid(self) -> int:
        """Side of the image embedding (64 at 1024 / 16)."""
        return self.img_size // self.patch_size

    @property
    def mask_input_size(self) -> int:
        """Side of mask prompts and of low-res mask logits (4 x grid: 256 at 1024)."""
        return 4 * self.grid

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    def replace(self, **kw) -> SamConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def vit_b(cls, **kw) -> SamConfig:
        return cls(**kw)

    @classmethod
    def vit_l(cls, **kw) -> SamConfig:
        return cls(
            **{"width": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23), **kw}
        )

    @classmethod
    def vit_h(cls, **kw) -> SamConfig:
        return cls(
            **{"width": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31), **kw}
        )

    @classmethod
    def tiny(cls, **kw) -> SamConfig:
        base = {
            "img_size": 128,
            "patch_size": 16,
            "width": 64,
            "depth": 2,
            "num_heads": 2,
            "window_size": 4,
            "global_attn_indexes": (1,),
            "prompt_dim": 64,
            "mask_in_chans": 8,
            "decoder_heads": 2,
            "decoder_mlp_dim": 128,
            "iou_head_hidden_dim": 64,
        }
        return cls(**{**base, **kw})


PRESETS = {
    "vit_b": SamConfig.vit_b,
    "vit_l": SamConfig.vit_l,
    "vit_h": SamConfig.vit_h,
    "tiny": SamConfig.tiny,
}
