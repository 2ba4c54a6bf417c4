"""Per-batch evaluation functions of a NextChat (pure, jittable: call them under `nnx.jit`).

Axes: B batch, T tokens, W prompt tokens (left-padded), N new tokens, Q boxes, Hm/Wm ground-truth mask size.
Each takes the model and a dict of `Batch` fields (one evaluation item per row, `valid` False on padding rows)
and returns per-row outputs only: the prediction line's values and "sums", each row's own metric terms
{name: [B]} (zero on padding rows). The host adds the terms up once it holds the rows of every process
(`jaxground.eval.gather`), in sample order, so the figures do not depend on the mesh, the batch size or the
host count. The teacher-forced ones give the answer ("Answer: <at> <boxes> .") and read the first trigger, as
the authors evaluate REC and Visual7W (their RES evaluation generates: `res_generated_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxground.data.batch import Batch
from jaxground.data.conversation import IGNORE
from jaxground.eval.metrics import pointing_choice, pointing_sums, rec_sums
from jaxground.infer.generate import GenerationConfig
from jaxground.models.nextchat import resize_mask_logits
from jaxground.ops.mask_metrics import intersection_union, iou_of_counts


def per_row(sums_fn, *args) -> dict:
    """A batch-summing metric (`rec_sums`, `pointing_sums`) applied to each row alone: {name: [B]}."""
    return jax.vmap(lambda *row: sums_fn(*(a[None] for a in row)))(*args)


def rec_teacher_forced_step(model, batch: dict) -> dict:
    """REC: one forward pass with the answer given -> per-row sums and the predicted / target box [B,4] of the
    first trigger. A row whose trigger is missing scores IoU 0 (F of a zero state is still a box)."""
    b = Batch(**batch)
    out = model(b)
    pred = jnp.where(out.trigger_mask[:, :1], out.pred_boxes[:, 0], 0.0)
    sums = per_row(rec_sums, pred, b.target_boxes[:, 0], b.valid & b.target_mask[:, 0])
    return {"sums": sums, "pred": pred, "target": b.target_boxes[:, 0]}


def scored_masks(mask_logits: jax.Array, masks: jax.Array, region: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Predicted mask logits [B,Q',h,w], ground-truth masks [B,Q,Hm,Wm] (Q >= Q') -> (prediction, ground truth)
    bool[B,Q',Hm,Wm]: logits > 0 resized to the ground truth's grid over the padded square, both cut to the
    image's pixels (`region` bool[B,Hm,Wm], the batch's `mask_region`: prediction in the padding is not scored,
    as SAM's postprocessing crops it)."""
    q = mask_logits.shape[1]
    region = True if region is None else region[:, None]
    pred = (resize_mask_logits(mask_logits, masks.shape[-2:]) > 0) & region
    return pred, (masks[:, :q] > 0.5) & region


def res_terms(inter: jax.Array, union: jax.Array, counted: jax.Array) -> dict:
    """Per-row RES terms from each row's mask intersection and union [B] (pixel counts): {"intersection",
    "union", "iou" (an empty union scores 1), "count"}, zero on rows not counted [B]. Jittable, and NumPy works."""
    v = jnp.asarray(counted, jnp.float32)
    iou = iou_of_counts(inter, union)
    return {"intersection": inter * v, "union": union * v, "iou": iou * v, "count": v}


def res_generated_terms(inter: jax.Array, union: jax.Array, gt_area: jax.Array, num_triggers: jax.Array,
                        counted: jax.Array) -> dict:
    """Per-row `res_gen` terms from the first trigger's mask against the ground truth (intersection, union,
    ground-truth area [B]) and each row's trigger count: `res_terms` of that mask (an empty mask without a
    trigger), "released_*" the same under the released rule (an empty mask unless exactly one trigger: more masks
    than the ground truth's one are not scored there), and the 0/1 counts "no_trigger", "multi_trigger" and
    "failed" (zero intersection under the released rule, the authors' `failed`)."""
    n = num_triggers
    first = res_terms(jnp.where(n > 0, inter, 0.0), jnp.where(n > 0, union, gt_area), counted)
    released = res_terms(jnp.where(n == 1, inter, 0.0), jnp.where(n == 1, union, gt_area), counted)
    v = jnp.asarray(counted, jnp.float32)
    return (first | {f"released_{k}": x for k, x in released.items()}
            | {"no_trigger": v * (n == 0), "multi_trigger": v * (n > 1), "failed": v * (released["intersection"] == 0)})


def res_step(model, batch: dict) -> dict:
    """RES: the teacher-forced forward pass with SAM images; the first trigger's mask against `masks[:, 0]`
    (`scored_masks`) -> per-row `res_terms`, "counted" bool[B], "box" [B,4] and the scored "mask_logits"
    [B,1,h,w] (for `eval.res_pixels="original"`, `eval.res_pixels`)."""
    b = Batch(**batch)
    if b.sam_images is None or b.masks is None:
        raise ValueError("RES needs a batch with sam_images and masks (data.with_sam and data.with_masks)")
    out = model(b)
    if out.mask_logits is None:
        raise ValueError("RES needs a model with a mask head (model.sam)")
    pred, gt = scored_masks(out.mask_logits[:, :1], b.masks, b.mask_region)  # [B,1,Hm,Wm]
    valid = b.valid & b.target_mask[:, 0] & b.mask_valid[:, 0]
    inter, union = (x[:, 0] for x in intersection_union(pred, gt))
    return {"sums": res_terms(inter, union, valid), "counted": valid, "box": out.pred_boxes[:, 0],
            "mask_logits": out.mask_logits[:, :1]}


def res_generated_step(model, batch: dict, cfg: GenerationConfig) -> dict:
    """RES by generation (`res_gen`, the authors' RES protocol): greedy generation after each row's prompt, then
    the mask head on the first trigger's recorded state and box (`Generation.trigger_states`, `boxes`, from
    `cfg.trigger_state`) with the SAM image embedding, scored as `res_step` scores (`scored_masks`).

    batch: the prompt (`prompts.prompt_batch`: "input_ids" int32[B,W] left-padded, "attention_mask", "boxes",
    "box_mask") with "images", and the teacher-forced batch's "sam_images", "masks", "mask_valid", "target_mask",
    "valid" (and "mask_region" when it has one).
    -> {"tokens" int32[B,N], "num_triggers" int32[B], "box" [B,4] (first trigger's F(t)), "counted" bool[B],
    "mask_logits" [B,1,h,w] (the first trigger's), "sums" (`res_generated_terms`)}."""
    from jaxground.infer.predict import generate_nextchat

    g = generate_nextchat(model, batch["images"], batch["input_ids"], batch["attention_mask"], batch["boxes"],
                          batch["box_mask"], None, cfg)  # rng None: greedy, and no host-made key on several hosts
    logits, _ = model.segment(batch["sam_images"], g.trigger_states[:, :1], g.boxes[:, :1])  # [B,1,h,w]
    pred, gt = scored_masks(logits, batch["masks"], batch.get("mask_region"))  # [B,1,Hm,Wm]
    valid = batch["valid"] & batch["target_mask"][:, 0] & batch["mask_valid"][:, 0]  # [B]
    inter, union = (x[:, 0] for x in intersection_union(pred, gt))
    gt_area = jnp.sum(gt[:, 0], (1, 2)).astype(jnp.float32)
    return {"tokens": g.tokens, "num_triggers": g.num_triggers, "box": g.boxes[:, 0], "counted": valid,
            "mask_logits": logits, "sums": res_generated_terms(inter, union, gt_area, g.num_triggers, valid)}


def question_box_mask(batch: Batch, boxes_id: int) -> jnp.ndarray:
    """bool[B,Q]: the boxes whose `<boxes>` token comes before the answer (the question's boxes, in order)."""
    labelled = batch.labels != IGNORE
    start = jnp.where(labelled.any(1), jnp.argmax(labelled, axis=1), labelled.shape[1])
    before = jnp.arange(batch.input_ids.shape[1])[None] < start[:, None]
    n = jnp.sum(before & (batch.input_ids == boxes_id), axis=1)
    return jnp.arange(batch.boxes.shape[1])[None] < n[:, None]


def pointing_step(model, batch: dict) -> dict:
    """Visual7W pointing: the question's boxes are the candidates; the teacher-forced F(t) of the answer's
    trigger picks the candidate of highest IoU; right when it is the candidate equal to the target box."""
    b = Batch(**batch)
    out = model(b)
    candidates = question_box_mask(b, model.cfg.tokens.boxes)
    distance = jnp.abs(b.boxes - b.target_boxes[:, :1]).sum(-1)  # [B,Q]
    answer = jnp.argmin(jnp.where(candidates, distance, jnp.inf), axis=1)
    pred = out.pred_boxes[:, 0]
    valid = b.valid & b.target_mask[:, 0] & candidates.any(1)
    return {"sums": per_row(pointing_sums, pred, b.boxes, candidates, answer, valid),
            "choice": pointing_choice(pred, b.boxes, candidates), "answer": answer, "pred": pred}
