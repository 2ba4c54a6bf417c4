"""Teacher-forced evaluation batches -> generation prompts and reference answers (host NumPy).

Axes: B batch, T tokens (max_len), W prompt width (left-padded), Q boxes.

An evaluation batch holds whole conversations (question and answer, right-padded). The answer starts at the
first labelled position (every answer token is a target but `<boxes>`, and an answer's `<at>` is a target), so
the prompt is everything before it, ending in "ASSISTANT:". Its `<boxes>` tokens are the first boxes of the row
(boxes are in token order), which is what the prompt's box mask keeps.
"""

from __future__ import annotations

import numpy as np

from jaxground.data.conversation import IGNORE


def answer_starts(labels: np.ndarray) -> np.ndarray:
    """int32[B,T] labels -> int32[B] index of the first target (T for a row without any, e.g. padding)."""
    labelled = np.asarray(labels) != IGNORE
    return np.where(labelled.any(1), labelled.argmax(1), labelled.shape[1]).astype(np.int32)


def prompt_batch(batch: dict, pad_id: int, boxes_id: int, width: int) -> dict:
    """A teacher-forced batch -> {"input_ids" int32[B,W], "attention_mask" bool[B,W] (left-padded prompts),
    "boxes" float32[B,Q,4], "box_mask" bool[B,Q] (the prompt's boxes only)}. Raises ValueError when a valid
    row's prompt is longer than `width`."""
    ids, starts = np.asarray(batch["input_ids"]), answer_starts(batch["labels"])
    valid = np.asarray(batch["valid"], bool)
    b, q = ids.shape[0], batch["boxes"].shape[1]
    out_ids = np.full((b, width), pad_id, np.int32)
    mask = np.zeros((b, width), bool)
    n_boxes = np.zeros(b, np.int64)
    for r in range(b):
        n = int(starts[r]) if valid[r] else 1  # a padding row keeps one token: no row is all padding
        if n > width:
            raise ValueError(f"a prompt of {n} tokens does not fit the prompt width {width} (data.max_len or the "
                             "context left after eval.max_new_tokens)")
        out_ids[r, width - n:] = ids[r, :n]
        mask[r, width - n:] = True
        n_boxes[r] = int((ids[r, :n] == boxes_id).sum())
    return {"input_ids": out_ids, "attention_mask": mask, "boxes": np.asarray(batch["boxes"], np.float32),
            "box_mask": np.arange(q)[None] < n_boxes[:, None]}


def reference_answers(batch: dict, tokenizer, eos_id: int) -> list[str]:
    """The answer text of every valid row (special tokens dropped), in row order."""
    ids, starts = np.asarray(batch["input_ids"]), answer_starts(batch["labels"])
    out = []
    for r in np.flatnonzero(np.asarray(batch["valid"], bool)):
        answer = ids[r, starts[r]:].tolist()
        answer = answer[: answer.index(eos_id)] if eos_id in answer else answer
        out.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return out


def generated_text(tokens: np.ndarray, tokenizer, eos_id: int) -> str:
    """Generated ids int[N] (up to eos) -> text, special tokens dropped."""
    t = np.asarray(tokens).tolist()
    t = t[: t.index(eos_id)] if eos_id in t else t
    return tokenizer.decode(t, skip_special_tokens=True).strip()
