"""NExT-Chat prediction: prompt (+ input boxes) about one image -> answer text with `[k]` object references,
boxes in image pixels and, with a mask head, masks at image size.

Axes: B batch, T prompt tokens, Q trigger slots, D model width, H/W original image size.

Input boxes are referred to in the prompt as `[0]`, `[1]`, ... (as in the authors' demo); each reference
becomes `<at> <boxes>` whose `<boxes>` embedding is G(box). In the answer, every `<at> <boxes>` with a recorded
trigger becomes `[k]` numbered after the input boxes, and box k is F(t) of that trigger mapped from the padded
square to pixels; an `<at>` without a box (the last token, or beyond max_triggers) becomes `[?]`. With
`GenerationConfig(trigger_state="predicting")` (the released demo's reading) every generated `<at>` up to
max_triggers has a box, the last token's too. Masks whose predicted IoU (SAM's IoU head) is below
`mask_iou_threshold`, when one is given, are blanked, as the demo does at 0.3.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.data.sam_transforms import postprocess_masks, preprocess_image
from jaxground.data.templates import LOC
from jaxground.data.transforms import square_offsets
from jaxground.infer.generate import Generation, GenerationConfig, check_fits, generate_from_embeds

REF = re.compile(r"\[(\d+)\]")


class PredictError(ValueError):
    """Bad predict input (image, boxes, prompt), reported before any compute."""


def boxes_to_pixels(boxes01: np.ndarray, height: int, width: int) -> np.ndarray:
    """float[...,4] xyxy normalised to the centred padded square -> pixel xyxy, clipped to the HxW image, corners
    ordered (F has no constraint and may decode x1 < x0)."""
    side, left, top = square_offsets(height, width)
    px = np.asarray(boxes01, np.float64) * side - np.array([left, top, left, top], np.float64)
    px = np.clip(px, 0, np.array([width, height, width, height], np.float64))
    lo, hi = np.minimum(px[..., :2], px[..., 2:]), np.maximum(px[..., :2], px[..., 2:])
    return np.concatenate([lo, hi], -1).astype(np.float32)


def parse_box(text: str, height: int, width: int) -> np.ndarray:
    """"x0,y0,x1,y1" in pixels -> float32[4]; refuses malformed, empty or out-of-image boxes."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise PredictError(f"--box {text!r}: expected four numbers x0,y0,x1,y1") from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise PredictError(f"--box {text!r}: expected four finite numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise PredictError(f"--box {text!r}: needs x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise PredictError(f"--box {text!r} lies outside the {width}x{height} image")
    return np.asarray(values, np.float32)


def prompt_turn(prompt: str, num_boxes: int) -> tuple[str, list[list[int]]]:
    """Replaces each `[i]` with a location marker -> (text, groups); every given box must exist."""
    groups = []

    def sub(m):
        i = int(m.group(1))
        if i >= num_boxes:
            raise PredictError(f"prompt refers to [{i}] but only {num_boxes} --box given")
        groups.append([i])
        return LOC
    text = REF.sub(sub, prompt)
    return text, groups


@dataclasses.dataclass
class Prediction:
    text: str  # the answer, `<at> <boxes>` replaced by `[k]`
    boxes: np.ndarray  # float32[n,4] pixel xyxy of the answer's objects, k = num input boxes + index
    first_ref: int  # index of the first answer object
    masks: np.ndarray | None  # bool[n,H,W], blanked where mask_iou is below the threshold
    mask_iou: np.ndarray | None = None  # float32[n] SAM's predicted IoU of each mask

    def to_json(self) -> dict:
        objects = [{"ref": self.first_ref + i, "box": [round(float(v), 2) for v in b]} for i, b in enumerate(self.boxes)]
        if self.masks is not None:
            for o, m, iou in zip(objects, self.masks, self.mask_iou):
                o["mask_area"] = int(m.sum())
                o["mask_iou"] = round(float(iou), 4)
                o["mask_rle"] = rle_encode(m)
        return {"answer": self.text, "objects": objects}


def rle_encode(mask: np.ndarray) -> dict:
    """bool[H,W] -> COCO uncompressed RLE {"size": [H, W], "counts": [...]}: run lengths over the column-major
    pixels, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, bool).reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    """The inverse of `rle_encode`."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    return np.repeat(values, rle["counts"]).reshape((h, w), order="F")


@functools.partial(nnx.jit, static_argnames=("geo",))
def _masks(model, sam_images, trigger_states, boxes, geo):
    logits, iou = model.segment(sam_images, trigger_states, boxes)  # [1,Q,4g,4g] over the padded square, [1,Q]
    return postprocess_masks(logits, geo) > 0, iou  # [1,Q,H,W]


def mask_function(model, image: np.ndarray):
    """The mask head of a NextChat with SAM for one image uint8[H,W,3]:
    `fn(trigger_states [1,Q,D], boxes [1,Q,4]) -> (bool[1,Q,H,W] masks in original image pixels, predicted IoU
    float32[1,Q])`."""
    if model.cfg.sam is None:
        raise ValueError("this NextChat has no mask head (model.sam)")
    sam_image, geo = preprocess_image(image, model.cfg.sam.img_size, pad="center")
    sam_images = jnp.asarray(sam_image)[None]
    return lambda states, boxes: _masks(model, sam_images, states, boxes, geo)


@functools.partial(nnx.jit, static_argnames=("cfg",))
def generate_nextchat(model, images, input_ids, attention_mask, boxes, box_mask, rng, cfg: GenerationConfig) -> Generation:
    """NextChat generation: images float32[B,S,S,3], left-padded ids int32[B,T] (+ mask), input boxes
    float32[B,Q,4] for the `<boxes>` tokens (box_mask bool[B,Q]); `rng` for sampling (None: key 0, made inside)."""
    embeds = model.embed_inputs(input_ids, images, boxes, box_mask)
    return generate_from_embeds(model.llm, embeds, attention_mask, cfg, last_token=input_ids[:, -1],
                                locator=(model.loc_encoder, model.loc_decoder), rng=rng)


UNBOXED = "[?]"  # an <at> without a box: the last generated token (no <boxes> forced after it), or beyond max_triggers


def answer_text(tokens: np.ndarray, tokenizer, ids, first_ref: int, num_objects: int,
                predicting: bool = False) -> str:
    """Generated ids (up to eos) -> text with each `<at> <boxes>` of the `num_objects` recorded triggers as `[k]`
    and any other `<at>` as `UNBOXED`. Generation records the first max_triggers `<at>` that a forced `<boxes>`
    follows, in order, or with `predicting` (trigger_state "predicting") the first max_triggers `<at>`."""
    tokens = tokens.tolist()
    pieces, k, run = [], first_ref, []

    def flush():
        if run:
            pieces.append(tokenizer.decode(run, skip_special_tokens=True).strip())
            run.clear()
    for i, t in enumerate(tokens):
        if t == ids.eos:
            break
        if t == ids.at:
            flush()
            followed = predicting or (i + 1 < len(tokens) and tokens[i + 1] == ids.boxes)
            boxed = followed and k < first_ref + num_objects
            pieces.append(f"[{k}]" if boxed else UNBOXED)
            k += boxed
        elif t != ids.boxes:
            run.append(t)
    flush()
    return re.sub(r"\s+([.,;:!?])", r"\1", " ".join(p for p in pieces if p))


def to_host(tree):
    """Device outputs -> numpy, whole, on every process. On several hosts the model's outputs are global arrays
    spanning devices this process cannot address, which `np.asarray` refuses: JAX's `process_allgather` (as
    `jaxground.eval.gather` uses it) copies each whole to every host, so every process calls this for the same
    outputs in the same order (a collective). Host arrays (and a one-process run's) are taken as they are."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


def encode_prompt(encoder, prompt: str, boxes_px: list[np.ndarray], height: int, width: int):
    """The user turn of `prompt` with `[i]` -> `<at> <boxes>` of pixel box i -> the encoder's `Encoded`."""
    from jaxground.data.transforms import boxes_to_square

    text, groups = prompt_turn(prompt, len(boxes_px))
    object_boxes = boxes_to_square(np.stack(boxes_px), height, width) if boxes_px else np.zeros((0, 4), np.float32)
    return encoder.encode([("user", text, groups)], object_boxes, key="prompt")


def _check_finite(values: np.ndarray, what: str) -> None:
    """Refuses NaN or infinite model outputs (weights that hold them), which JSON cannot carry nor a drawing place."""
    if not np.isfinite(values).all():
        raise PredictError(f"the model decoded a non-finite {what} (NaN or infinity): its weights hold NaN or "
                           "infinity, or overflowed in this dtype")


def predict(model, encoder, image: np.ndarray, prompt: str, boxes_px: list[np.ndarray], cfg: GenerationConfig,
            *, rng=None, mask_fn=None, pad_fill: str = "mean", mask_iou_threshold: float | None = None) -> Prediction:
    """One image uint8[H,W,3], a prompt with `[i]` references to `boxes_px` -> Prediction.

    `pad_fill`: the colour the image is padded square with, as the model was trained (`data.pad_fill`: "white"
    for NExT-Chat's released weights).
    `mask_fn(trigger_states [1,Q,D], boxes [1,Q,4]) -> (bool[1,Q,H,W], iou [1,Q])` adds masks (`mask_function`:
    the SAM mask head); a mask whose predicted IoU is below `mask_iou_threshold` is blanked (the demo: 0.3; None:
    none is; the IoU head is not trained by NExT-Chat's losses, and a model trained from scratch can predict
    IoUs below 0 for good masks).
    """
    from jaxground.data.transforms import clip_image

    h, w = image.shape[:2]
    enc = encode_prompt(encoder, prompt, boxes_px, h, w)
    check_fits(model.llm.cfg.max_position, len(enc.input_ids), cfg)
    q = max(len(enc.boxes), 1)
    in_boxes = np.zeros((1, q, 4), np.float32)
    in_boxes[0, : len(enc.boxes)] = enc.boxes
    box_mask = np.arange(q)[None] < len(enc.boxes)
    size = model.cfg.vision.image_size
    # uncommitted host inputs: jit copies them whole to every device of the model's mesh, each host from its own
    # copy, so on several hosts they must be the same on every one (`jaxground predict` checks that they are)
    out = generate_nextchat(model, jnp.asarray(clip_image(image, size, pad_fill))[None], jnp.asarray(enc.input_ids)[None],
                            jnp.ones((1, len(enc.input_ids)), bool), jnp.asarray(in_boxes), jnp.asarray(box_mask),
                            jax.random.key(0) if rng is None else rng, cfg)
    got = to_host({"tokens": out.tokens, "lengths": out.lengths, "num_triggers": out.num_triggers, "boxes": out.boxes,
                   "overflowed": out.overflowed})
    if got["overflowed"][0]:
        raise PredictError(f"sampled beam search: the beam scores passed float32's range within {cfg.max_new_tokens} "
                           f"tokens (transformers 4.31, whose beam_sample this is, divides a beam's whole score by the "
                           f"temperature {cfg.temperature:g} again at every step, and raises here): use a temperature "
                           "of at least 1 or fewer --max-new-tokens")
    n = int(got["num_triggers"][0])
    tokens = got["tokens"][0, : int(got["lengths"][0])]
    _check_finite(got["boxes"][0, :n], "box")
    masks = iou = None
    if mask_fn is not None:  # all Q trigger slots (one compile), the first n kept
        masks, iou = (x[0, :n] for x in to_host(mask_fn(out.trigger_states, out.boxes)))
        _check_finite(iou, "mask IoU")
        if mask_iou_threshold is not None:
            masks = masks & (iou >= mask_iou_threshold)[:, None, None]
    return Prediction(
        text=answer_text(tokens, encoder.tok, encoder.ids, len(boxes_px), n, cfg.trigger_state == "predicting"),
        boxes=boxes_to_pixels(got["boxes"][0, :n], h, w),
        first_ref=len(boxes_px),
        masks=masks,
        mask_iou=iou,
    )
