"""`Batch`: what the pipeline hands to the model, with static shapes (padded, each padded thing masked).

Axes: B batch, T tokens (max_len), Q boxes (max_boxes), Hc/Wc CLIP image size, Hs/Ws SAM image size,
Hm/Wm ground-truth mask size.

Token conventions (the released NExT-Chat's): `labels` are aligned with `input_ids` (HF style: the loss shifts them),
-100 where not a target; `<at>` in an assistant turn is a target, `<boxes>` never is.
Boxes are normalised xyxy in [0, 1] relative to the padded square image.
- `boxes[b, q]` is the q-th `<boxes>` token of sample b (every `<boxes>`, questions and answers): the
  encoder G turns it into that token's embedding.
- `target_boxes[b, k]` is the box the k-th *trigger* (an `<at>` whose label is `<at>`) must decode to,
  in trigger order; `masks[b, k]` the matching ground-truth mask (stage 3).
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class Batch:
    images: jax.Array  # float32[B,Hc,Wc,3], CLIP-normalised
    input_ids: jax.Array  # int32[B,T]
    attention_mask: jax.Array  # bool[B,T]
    labels: jax.Array  # int32[B,T], -100 = ignored
    boxes: jax.Array  # float32[B,Q,4], one per <boxes> token, in order
    box_mask: jax.Array  # bool[B,Q]
    target_boxes: jax.Array  # float32[B,Q,4], one per trigger, in order
    target_mask: jax.Array  # bool[B,Q]
    valid: jax.Array  # bool[B], False for rows that only pad an evaluation batch
    sam_images: jax.Array | None = None  # float32[B,Hs,Ws,3], SAM-normalised (stage 3)
    masks: jax.Array | None = None  # float32[B,Q,Hm,Wm] in {0,1}, per trigger (stage 3)
    mask_valid: jax.Array | None = None  # bool[B,Q]
    mask_region: jax.Array | None = None  # bool[B,Hm,Wm], the image's pixels of the padded square (RES scoring)
    patch_target: jax.Array | None = None  # float32[B,P] share of each patch in the first target's mask, -1 = none
    patch_attr: jax.Array | None = None  # int32[B,P] class of the object on each patch (shapes.patch_class), -1 = none
