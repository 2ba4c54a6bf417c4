"""NExT-Chat's mask head: trigger hidden state -> 4 SAM prompt tokens, + the predicted box as a SAM box prompt
(2 corner tokens) -> SAM mask decoder (single mask).

Axis legend: B images, Q triggers (boxes) per image, D LLM hidden size, C SAM prompt_dim, g SAM grid side.
Attribute paths: `seg_prompt_mlp.fc1`, `seg_prompt_mlp.fc2` (torch `seg_prompt_mlp.0` / `.2`), `prompt_encoder.*`,
`mask_decoder.*` (torch `sam.model.prompt_encoder.*` / `sam.model.mask_decoder.*`); the image encoder lives in
`Sam(cfg, with_decoder=False)` (torch `sam.model.image_encoder.*`). See `jaxground.convert.sam.mask_head_rules`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.layers import linear
from jaxground.models.sam.config import SamConfig
from jaxground.models.sam.mask_decoder import MaskDecoder
from jaxground.models.sam.prompt_encoder import PromptEncoder

NUM_PROMPT_TOKENS = 4


class SegPromptMLP(nnx.Module):
    """Linear(D -> D), ReLU, Linear(D -> 4 * C)."""

    def __init__(self, hidden_size: int, prompt_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(hidden_size, hidden_size, ("embed", "mlp"), rngs=rngs)
        self.fc2 = linear(hidden_size, NUM_PROMPT_TOKENS * prompt_dim, ("mlp", None), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


class MaskHead(nnx.Module):
    def __init__(self, hidden_size: int, sam_cfg: SamConfig, *, rngs: nnx.Rngs):
        self.sam_cfg = sam_cfg
        self.seg_prompt_mlp = SegPromptMLP(hidden_size, sam_cfg.prompt_dim, rngs=rngs)
        self.prompt_encoder = PromptEncoder(sam_cfg, rngs=rngs)
        self.mask_decoder = MaskDecoder(sam_cfg, rngs=rngs)

    def __call__(self, trigger_states: jax.Array, pred_boxes: jax.Array, image_embeddings: jax.Array):
        """trigger_states [B, Q, D], pred_boxes [B, Q, 4] xyxy in [0, 1] of the padded square,
        image_embeddings [B, g, g, C] -> (mask logits [B, Q, 4g, 4g], iou predictions [B, Q])."""
        cfg = self.sam_cfg
        b, q = trigger_states.shape[:2]
        if pred_boxes.shape != (b, q, 4):
            raise ValueError(
                f"pred_boxes has shape {pred_boxes.shape}; expected {(b, q, 4)} to match trigger_states"
            )
        if image_embeddings.shape != (b, cfg.grid, cfg.grid, cfg.prompt_dim):
            raise ValueError(
                f"image_embeddings has shape {image_embeddings.shape}; "
                f"expected {(b, cfg.grid, cfg.grid, cfg.prompt_dim)}"
            )
        prompts = self.seg_prompt_mlp(trigger_states).reshape(b, q, NUM_PROMPT_TOKENS, cfg.prompt_dim)
        corners, dense = self.prompt_encoder(b, q, boxes=pred_boxes * cfg.img_size)
        sparse = jnp.concatenate(
            [prompts.astype(corners.dtype), corners], axis=2
        )  # NExT-Chat order: prompts, box
        masks, iou = self.mask_decoder(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, False
        )
        return masks[:, :, 0], iou[:, :, 0]
