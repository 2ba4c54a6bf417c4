"""Test helper: the official torch SAM (`jaxground.convert.sam_reference`) and perturbed random weights.
Load this file by path (tests run with --import-mode=importlib).
"""

from __future__ import annotations

from jaxground.convert.sam_reference import official_sam, segment_anything  # noqa: F401  (re-exported)


def perturb(module, seed: int = 0, scale: float = 0.02) -> None:
    """Adds noise to every parameter and buffer (so LayerNorm ones / zero biases cannot hide a mapping bug)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen) * scale
            if "rel_pos" in name or "pos_embed" in name or name.endswith("_embed.weight") or "tokens" in name:
                noise = noise * 10  # zero-initialised tables: give them real content
            t.add_(noise)
