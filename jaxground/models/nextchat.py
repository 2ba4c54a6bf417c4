"""NExT-Chat: CLIP vision tower -> projector -> LLaMA, with the pixel2emb box encoder G and decoder F.

Axes: B batch, T tokens, P image patches, Dv vision width, D LLM width, V vocabulary, Q boxes (max_boxes).

Flow of `NextChat.__call__(batch)`:
1. image features: vision tower (stop_gradient when frozen) -> projector -> [B,P,D], written over the run of
   `<im_patch>` tokens (the p-th `<im_patch>` of a row takes feature p);
2. box inputs: G(boxes) [B,Q,D] written over the `<boxes>` tokens, the q-th `<boxes>` of a row takes
   G(boxes[:, q]);
3. LLaMA on these embeddings -> last hidden states (after the final norm) and logits;
4. triggers: the hidden states at each `<at>` whose label is `<at>` (assistant triggers), in order, gathered
   into [B,Q,D] with a mask, decoded by F into boxes [B,Q,4] (Q = target_boxes.shape[1]);
5. cycle terms F(G(boxes)) and G(F(t)) so that `nextchat_loss` needs no model call;
6. with a SAM config and `batch.sam_images`: the frozen SAM image encoder, then the mask head on each trigger
   (4 prompt tokens from the trigger state + F(t) as a box prompt -> one mask and one IoU prediction).
Training aids of the tiny default (not in the release): `patch_head` (a logit per image token from its last hidden
state) and `attr_classes` (class logits per CLIP patch from the tower's features), each only with its labels.
All placement is gather/where over static shapes: jittable, no data-dependent Python.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxground.data.batch import Batch
from jaxground.models.clip import ClipVision, ClipVisionConfig
from jaxground.models.layers import linear
from jaxground.models.llama import Llama, LlamaConfig
from jaxground.models.locator import BoxDecoder, BoxEncoder
from jaxground.models.mask_head import MaskHead
from jaxground.models.projector import Projector
from jaxground.models.sam.config import SamConfig
from jaxground.models.sam.sam import Sam
from jaxground.ops.losses import (
    IGNORE,
    cycle_loss,
    detection_loss,
    supervised_positions,
    target_cross_entropy,
    token_cross_entropy,
)
from jaxground.ops.mask_losses import seg_loss
from jaxground.tokens import TokenIds


@dataclasses.dataclass(frozen=True)
class NextChatConfig:
    llm: LlamaConfig
    vision: ClipVisionConfig
    projector: str = "mlp2x_gelu"
    freeze_vision: bool = True
    box_prior: bool = False
    locator_init_std: float | None = 0.02  # G and F kernels: N(0, std) as released; None = LeCun normal
    tokens: TokenIds = dataclasses.field(default_factory=TokenIds)
    sam: SamConfig | None = None  # SAM image encoder + mask head (stage 3); None = boxes only
    freeze_sam: bool = True  # the released model keeps SAM's image encoder frozen (stop_gradient)
    patch_head: bool = False  # a training aid (not in the release): per image token, "in the first target?"
    attr_classes: int = 0  # > 0: the attribute aid (not in the release): classify each CLIP patch's object

    def __post_init__(self):
        ids = dataclasses.asdict(self.tokens)
        bad = {k: v for k, v in ids.items() if not 0 <= v < self.llm.vocab_size}
        if bad:
            raise ValueError(f"token ids {bad} are outside the LLM vocabulary [0, {self.llm.vocab_size})")


@struct.dataclass
class NextChatOutput:
    logits: jax.Array  # float32[B,T,V]; with `label_tokens` k, float32[B,k,V] at the supervised positions only
    hidden: jax.Array  # [B,T,D], last layer after the final norm
    pred_boxes: jax.Array  # float32[B,Q,4] = F(trigger_states)
    trigger_states: jax.Array  # [B,Q,D], zeros where trigger_mask is False
    trigger_mask: jax.Array  # bool[B,Q]
    decode_of_encode: jax.Array  # float32[B,Q,4] = F(G(batch.boxes))
    encode_of_decode: jax.Array  # [B,Q,D] = G(pred_boxes)
    mask_logits: jax.Array | None = None  # float32[B,Q,4g,4g] low-res SAM logits over the padded square
    iou_pred: jax.Array | None = None  # float32[B,Q]
    logit_targets: jax.Array | None = None  # int32[B,k] next-token labels aligned with logits (with `label_tokens`)
    patch_logits: jax.Array | None = None  # float32[B,P] with `patch_head` and `batch.patch_target`: image token p
    # lies in the first target
    attr_logits: jax.Array | None = None  # float32[B,P,C] with `attr_classes` and `batch.patch_attr`


def place_rows(embeds: jax.Array, is_slot: jax.Array, rows: jax.Array, row_mask: jax.Array | None = None):
    """Writes rows [B,K,D] over the slots bool[B,T] of embeds [B,T,D]: the k-th slot of a row takes rows[:, k].

    Slots beyond K, or whose row is masked out by row_mask bool[B,K], keep their token embedding.
    """
    k = jnp.cumsum(is_slot, axis=1, dtype=jnp.int32) - 1  # [B,T]: index of each slot among its row's slots
    kc = jnp.clip(k, 0, rows.shape[1] - 1)
    take = is_slot & (k < rows.shape[1])
    if row_mask is not None:
        take &= jnp.take_along_axis(row_mask, kc, axis=1)
    gathered = jnp.take_along_axis(rows, kc[..., None], axis=1)  # [B,T,D]
    return jnp.where(take[..., None], gathered.astype(embeds.dtype), embeds)


def gather_slots(hidden: jax.Array, is_slot: jax.Array, q: int) -> tuple[jax.Array, jax.Array]:
    """States [B,T,D] at the first q slots bool[B,T] of each row, in order -> ([B,q,D] (zeros where absent),
    bool[B,q])."""
    k = jnp.cumsum(is_slot, axis=1, dtype=jnp.int32) - 1
    onehot = is_slot[:, :, None] & (k[:, :, None] == jnp.arange(q))  # [B,T,Q]
    mask = jnp.any(onehot, axis=1)  # [B,Q]
    pos = jnp.argmax(onehot, axis=1)  # [B,Q]: the slot's position (0 where absent)
    states = jnp.take_along_axis(hidden, pos[..., None], axis=1)
    return jnp.where(mask[..., None], states, jnp.zeros_like(states)), mask


class NextChat(nnx.Module):
    """The NExT-Chat model; `__call__(batch: Batch) -> NextChatOutput`.

    Parameter tree: `vision` (ClipVision), `projector`, `llm` (Llama), `loc_encoder` (G), `loc_decoder` (F),
    and with `cfg.sam`: `sam` (the SAM image encoder only, frozen unless `freeze_sam=False`) and `mask_head` (`seg_prompt_mlp`,
    SAM's `prompt_encoder` and `mask_decoder`).
    """

    def __init__(self, cfg: NextChatConfig, *, rngs: nnx.Rngs):
        d = cfg.llm.hidden_size
        dtype, param_dtype = jnp.dtype(cfg.llm.dtype), jnp.dtype(cfg.llm.param_dtype)
        self.cfg = cfg
        self.vision = ClipVision(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size, d, rngs=rngs, dtype=cfg.llm.dtype,
                                   param_dtype=cfg.llm.param_dtype)
        self.llm = Llama(cfg.llm, rngs=rngs)
        loc = {"rngs": rngs, "init_std": cfg.locator_init_std, "dtype": dtype, "param_dtype": param_dtype}
        self.loc_encoder = BoxEncoder(d, **loc)
        self.loc_decoder = BoxDecoder(d, box_prior=cfg.box_prior, **loc)
        if cfg.patch_head:
            self.patch_head = linear(d, 1, ("embed", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if cfg.attr_classes:
            self.attr_head = linear(cfg.vision.hidden_size, cfg.attr_classes, ("embed", None), rngs=rngs,
                                    dtype=jnp.dtype(cfg.vision.dtype), param_dtype=jnp.dtype(cfg.vision.param_dtype))
        if cfg.sam is not None:
            self.sam = Sam(cfg.sam, rngs=rngs, with_decoder=False)
            self.mask_head = MaskHead(d, cfg.sam, rngs=rngs)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """float32[B,H,W,3] (CLIP-normalised) -> [B,P,D] projected patch features."""
        return self.projector(self._vision_features(images))

    def _vision_features(self, images: jax.Array) -> jax.Array:
        """float32[B,H,W,3] -> CLIP patch features [B,P,Dv]."""
        feats = self.vision(images)
        if self.cfg.freeze_vision:
            feats = jax.lax.stop_gradient(feats)  # the frozen tower gets exactly zero gradient
        return feats

    def embed_inputs(self, input_ids: jax.Array, images: jax.Array, boxes: jax.Array, box_mask: jax.Array):
        """int32[B,T], float32[B,H,W,3], float32[B,Q,4], bool[B,Q] -> input embeddings [B,T,D]."""
        self._check_slots(input_ids, boxes.shape[1])
        return self._embed(input_ids, self.encode_image(images), self.loc_encoder(boxes), box_mask)

    def _embed(self, input_ids, image_feats, box_embeds, box_mask):
        tok = self.cfg.tokens
        embeds = self.llm.embed(input_ids)
        embeds = place_rows(embeds, input_ids == tok.im_patch, image_feats)
        return place_rows(embeds, input_ids == tok.boxes, box_embeds, box_mask)

    def __call__(self, batch: Batch, label_tokens: int = 0) -> NextChatOutput:
        """`label_tokens` k > 0: the LM head runs only at the first k positions of each row whose next label
        counts (`ops.losses.supervised_positions`), instead of at all T; the loss is the same while no row has
        more than k counted labels (the training loop checks each batch)."""
        self._check_batch(batch)
        tok = self.cfg.tokens
        box_embeds = self.loc_encoder(batch.boxes)  # [B,Q,D]
        feats = self._vision_features(batch.images)
        attr_logits = None
        if self.cfg.attr_classes and batch.patch_attr is not None:  # only its loss reads it
            attr_logits = self.attr_head(feats).astype(jnp.float32)
        embeds = self._embed(batch.input_ids, self.projector(feats), box_embeds, batch.box_mask)
        hidden, logits, _ = self.llm.forward_embeds(embeds, batch.attention_mask, with_logits=not label_tokens)
        logit_targets = None
        if label_tokens:
            positions, logit_targets = supervised_positions(batch.labels, label_tokens)
            logits = self.llm.head(jnp.take_along_axis(hidden, positions[..., None], axis=1))
        is_trigger = (batch.input_ids == tok.at) & (batch.labels == tok.at)
        states, trigger_mask = gather_slots(hidden, is_trigger, batch.target_boxes.shape[1])
        pred = self.loc_decoder(states)
        patch_logits = None
        if self.cfg.patch_head and batch.patch_target is not None:  # only its loss reads it
            patch_states, _ = gather_slots(hidden, batch.input_ids == tok.im_patch, self.cfg.vision.num_patches)
            patch_logits = self.patch_head(patch_states)[..., 0].astype(jnp.float32)
        mask_logits = iou_pred = None
        if self.cfg.sam is not None and batch.sam_images is not None:
            mask_logits, iou_pred = self.segment(batch.sam_images, states, pred)
        return NextChatOutput(
            logits=logits,
            hidden=hidden,
            pred_boxes=pred,
            trigger_states=states,
            trigger_mask=trigger_mask,
            decode_of_encode=self.loc_decoder(box_embeds),
            encode_of_decode=self.loc_encoder(pred),
            mask_logits=mask_logits,
            iou_pred=iou_pred,
            logit_targets=logit_targets,
            patch_logits=patch_logits,
            attr_logits=attr_logits,
        )

    def segment(self, sam_images: jax.Array, trigger_states: jax.Array, pred_boxes: jax.Array):
        """float32[B,S,S,3] SAM-normalised, [B,Q,D], [B,Q,4] -> (mask logits [B,Q,4g,4g], IoU predictions [B,Q])."""
        if self.cfg.sam is None:
            raise ValueError("this NextChat has no mask head (NextChatConfig.sam is None)")
        image_embeddings = self.sam.image_encoder(sam_images)
        if self.cfg.freeze_sam:
            image_embeddings = jax.lax.stop_gradient(image_embeddings)  # frozen, as released
        return self.mask_head(trigger_states, pred_boxes, image_embeddings)

    def _check_batch(self, batch: Batch) -> None:
        b, t = batch.input_ids.shape
        q = batch.boxes.shape[1]
        size = self.cfg.vision.image_size
        expected = {
            "images": (b, size, size, 3),
            "attention_mask": (b, t),
            "labels": (b, t),
            "boxes": (b, q, 4),
            "box_mask": (b, q),
            "target_boxes": (b, batch.target_boxes.shape[1], 4),
            "target_mask": batch.target_boxes.shape[:2],
        }
        bad = [f"{k} {tuple(getattr(batch, k).shape)} != {v}" for k, v in expected.items()
               if tuple(getattr(batch, k).shape) != tuple(v)]
        if bad:
            raise ValueError("Batch shapes do not fit input_ids [B,T] and the vision config: " + "; ".join(bad))
        self._check_slots(batch.input_ids, q)
        if not isinstance(batch.input_ids, jax.core.Tracer) and not isinstance(batch.labels, jax.core.Tracer):
            at = self.cfg.tokens.at
            triggers = ((np.asarray(batch.input_ids) == at) & (np.asarray(batch.labels) == at)).sum(1)
            if np.any(triggers > batch.target_boxes.shape[1]):
                raise ValueError(f"rows have {triggers.tolist()} triggers, more than the "
                                 f"{batch.target_boxes.shape[1]} target boxes")

    def _check_slots(self, input_ids: jax.Array, q: int) -> None:
        """With concrete ids: each row has 0 or exactly P `<im_patch>` and at most Q `<boxes>` tokens."""
        if isinstance(input_ids, jax.core.Tracer):
            return
        ids, p = np.asarray(input_ids), self.cfg.vision.num_patches
        patches = (ids == self.cfg.tokens.im_patch).sum(1)
        boxes = (ids == self.cfg.tokens.boxes).sum(1)
        if np.any((patches != 0) & (patches != p)):
            raise ValueError(f"rows have {patches.tolist()} <im_patch> tokens; each needs 0 or {p} (the patches)")
        if np.any(boxes > q):
            raise ValueError(f"rows have {boxes.tolist()} <boxes> tokens, more than the {q} boxes given")


def nextchat_loss(
    out: NextChatOutput, batch: Batch, *, w_l1: float, w_giou: float, w_cycle: float = 1.0,
    w_seg: float = 1.0, seg_preset: str = "focal", w_patch: float = 0.0, w_attr: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = CE + L_det + w_cycle * L_cyc (+ w_seg * L_seg when the output has masks and the batch has
    ground truth; + w_patch * L_patch when it has patch logits and `batch.patch_target`) -> (total, parts).

    Rows with `batch.valid` False count nowhere. Boxes are scored only where a trigger was found *and* a
    target exists. Parts: ce, n_tokens, l1, giou, det, cyc_box, cyc_emb, cyc (and seg..., patch). (w_l1,
    w_giou) usually come from `jaxground.ops.losses.DET_PRESETS`.
    """
    valid = batch.valid[:, None]
    if out.logit_targets is None:
        ce, n_tokens = token_cross_entropy(out.logits, jnp.where(valid, batch.labels, IGNORE))
    else:
        ce, n_tokens = target_cross_entropy(out.logits, jnp.where(valid, out.logit_targets, IGNORE))
    det = detection_loss(out.pred_boxes, batch.target_boxes, batch.target_mask & out.trigger_mask & valid,
                         w_l1, w_giou)
    cyc = cycle_loss(batch.boxes, batch.box_mask & valid, out.decode_of_encode,
                     out.trigger_states, out.trigger_mask & valid, out.encode_of_decode)
    total = ce + det["det"] + w_cycle * cyc["cyc"]
    parts = {"ce": ce, "n_tokens": n_tokens.astype(jnp.float32), **det, **cyc}
    if out.patch_logits is not None and batch.patch_target is not None:
        patch = patch_loss(out.patch_logits, batch.patch_target, batch.valid)
        total = total + w_patch * patch
        parts["patch"] = patch
    if out.attr_logits is not None and batch.patch_attr is not None:
        attr = attr_loss(out.attr_logits, batch.patch_attr, batch.valid)
        total = total + w_attr * attr
        parts["attr"] = attr
    if out.mask_logits is not None and batch.masks is not None:
        logits = resize_mask_logits(out.mask_logits, batch.masks.shape[-2:])
        seg, seg_parts = seg_loss(logits, batch.masks, out.iou_pred,
                                  batch.mask_valid & out.trigger_mask & valid, seg_preset)
        total = total + w_seg * seg
        parts |= {"seg": seg, **seg_parts}
    return total, parts


def patch_loss(logits: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Binary cross-entropy of per-patch logits [B,P] against soft targets [B,P] (the patch's share in the
    target mask), averaged over the patches of rows that have a target (target >= 0) and are valid."""
    rows = valid & (target[:, 0] >= 0)
    t = jnp.clip(target, 0.0, 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, t)
    return jnp.sum(bce.mean(-1) * rows) / jnp.maximum(rows.sum(), 1)


def attr_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Cross-entropy of per-patch class logits [B,P,C] against labels int32[B,P], averaged over the labelled
    patches (label >= 0) of valid rows."""
    counted = (labels >= 0) & valid[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(ce * counted) / jnp.maximum(counted.sum(), 1)


def resize_mask_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B,Q,h,w] logits over the padded square -> [B,Q,*size] (bilinear, no antialiasing, as torch does)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return jax.image.resize(logits, (*logits.shape[:2], *size), "bilinear", antialias=False)
