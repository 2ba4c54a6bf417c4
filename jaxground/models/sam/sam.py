"""The SAM model: image encoder + prompt encoder + mask decoder.

Axis legend: B images, Q prompts per image, N points per prompt, S input side, g grid side, C prompt_dim.
Attribute paths (what the converter fills): `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`.
`Sam(cfg, rngs=..., with_decoder=False)` holds only `image_encoder` (what NExT-Chat keeps frozen; its
`MaskHead` holds the prompt encoder and mask decoder).
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxground.models.sam.config import SamConfig
from jaxground.models.sam.image_encoder import ImageEncoder
from jaxground.models.sam.mask_decoder import MaskDecoder
from jaxground.models.sam.prompt_encoder import PromptEncoder


class Sam(nnx.Module):
    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs, with_decoder: bool = True):
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg, rngs=rngs)
        if with_decoder:
            self.prompt_encoder = PromptEncoder(cfg, rngs=rngs)
            self.mask_decoder = MaskDecoder(cfg, rngs=rngs)

    def decode(
        self,
        image_embeddings: jax.Array,
        points=None,
        labels=None,
        boxes=None,
        masks=None,
        multimask_output: bool = True,
    ):
        """image_embeddings [B, g, g, C]; prompts [B, Q, ...] (see `PromptEncoder`) ->
        (low-res mask logits [B, Q, M', 4g, 4g], iou predictions [B, Q, M'])."""
        b = image_embeddings.shape[0]
        given = [p for p in (points, boxes, masks) if p is not None]
        if not given:
            raise ValueError("decode needs at least one prompt (points, boxes or masks)")
        q = given[0].shape[1] if given[0].ndim >= 2 else -1
        sparse, dense = self.prompt_encoder(b, q, points, labels, boxes, masks)
        return self.mask_decoder(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
        )

    def __call__(
        self,
        images: jax.Array,
        points=None,
        labels=None,
        boxes=None,
        masks=None,
        multimask_output: bool = True,
    ):
        """images [B, S, S, 3] normalised and padded (see `jaxground.data.sam_transforms`)."""
        return self.decode(self.image_encoder(images), points, labels, boxes, masks, multimask_output)
