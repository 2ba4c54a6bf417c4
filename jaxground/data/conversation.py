"""Vicuna v1.1 conversations -> token ids, labels, input boxes and target boxes.

`"{system} USER: <im_start><im_patch>×N<im_end> {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"`,
preceded by `<s>`. Labels (aligned with ids, -100 = ignored) cover each answer and its `</s>` only. Turn texts
hold `<loc>` markers, one per group of object indices; the location format writes each group (for `emb`,
`"<at> <boxes>"` per box). Every `<boxes>` takes the next box of `boxes` (questions and answers); `<boxes>` is
never a target; an `<at>` in an answer is a trigger, a target, and its box goes to `target_boxes` in order.

Text is tokenized piece by piece between added tokens, whose ids are inserted directly, so labels and
special positions are exact by construction (no offset bookkeeping over a re-tokenized string).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxground.data.templates import LOC
from jaxground.tokens import SPECIAL_TOKENS, TokenIds

IGNORE = -100
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SHORT_SYSTEM = "A chat about an image."
IMAGE_POSITIONS = ("first", "last")  # where the first user turn puts the image: before or after its text
PIECE_CACHE = 200_000  # text pieces whose ids an encoder keeps


class BadSample(ValueError):
    """A sample that cannot be encoded faithfully (it is skipped, or raised in strict mode). `reason` is a
    short category for the skip counters."""

    def __init__(self, message: str, reason: str = "bad sample"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Encoded:
    input_ids: np.ndarray  # int32[L]
    labels: np.ndarray  # int32[L], IGNORE where not a target
    boxes: np.ndarray  # float32[nb,4], one per <boxes> token, in order
    target_boxes: np.ndarray  # float32[nt,4], one per trigger, in order
    target_objects: list[int]  # object index of each trigger (for its mask)


class ConversationEncoder:
    """Encodes turns with a tokenizer, its `TokenIds` and a location format (`location_format.get_format`)."""

    def __init__(self, tokenizer, ids: TokenIds, location_format, num_image_tokens: int,
                 system: str = DEFAULT_SYSTEM, image_position: str = "first"):
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position {image_position!r} is not one of {IMAGE_POSITIONS}")
        self.tok, self.ids, self.fmt = tokenizer, ids, location_format
        self.num_image_tokens, self.system, self.image_position = num_image_tokens, system, image_position
        added = list(dict.fromkeys([*SPECIAL_TOKENS, *location_format.extra_tokens, "</s>"]))
        self._added_ids = dict(zip(added, tokenizer.convert_tokens_to_ids(added)))
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
        self._carries_boxes = ids.boxes is not None and "<boxes>" in location_format.format(np.zeros((1, 4)))
        self._pieces: dict[str, list[int]] = {}  # text piece -> ids: templates repeat, and a call costs ~0.1 ms

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text piece's ids, tokenizing only the pieces not seen before (one tokenizer call for them)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._pieces]
        fresh = dict(zip(new, self.tok(new, add_special_tokens=False)["input_ids"])) if new else {}
        if len(self._pieces) < PIECE_CACHE:
            self._pieces.update(fresh)
        return [fresh[t] if t in fresh else self._pieces[t] for t in texts]

    def _render(self, text: str, groups: list, boxes: np.ndarray, key: str) -> tuple[str, list[list[int]]]:
        parts = text.split(LOC)
        if len(parts) - 1 != len(groups):
            raise BadSample(f"{key}: {len(parts) - 1} <loc> markers but {len(groups)} box groups", "marker/box mismatch")
        out = [parts[0]]
        for group, rest in zip(groups, parts[1:]):
            out += [self.fmt.format(boxes[list(group)].reshape(-1, 4)), rest]
        return "".join(out), [list(g) for g in groups]

    def _segments(self, text: str) -> list:
        """A text -> list of str (plain text, stripped) and int (an added token's id)."""
        out = []
        for piece in self._split.split(text):
            if piece in self._added_ids:
                out.append(self._added_ids[piece])
            elif piece.strip():
                out.append(piece.strip())
        return out

    def encode(self, turns: list, object_boxes: np.ndarray, key: str = "") -> Encoded:
        """turns: [(role, text, groups)] alternating user/assistant, user first; object_boxes: float32[n,4]
        normalised xyxy. Raises BadSample when it cannot encode the sample faithfully."""
        ids = self.ids
        chunks: list[tuple[list, bool]] = []  # (segments, is_target)
        box_list, target_objs = [], []
        image = [ids.im_start] + [ids.im_patch] * self.num_image_tokens + [ids.im_end]
        for t, (role, text, groups) in enumerate(turns):
            if role != ("user" if t % 2 == 0 else "assistant"):
                raise BadSample(f"{key}: turn {t} has role {role!r}; turns must alternate user/assistant", "bad turns")
            rendered, groups = self._render(text, groups, object_boxes, key)
            if self._carries_boxes:
                box_list += [o for g in groups for o in g]
                if role == "assistant":
                    target_objs += [o for g in groups for o in g]
            if role == "user":
                head = self._segments(f"{self.system} USER:" if t == 0 else "USER:")
                text = self._segments(rendered)
                if t == 0:
                    text = image + text if self.image_position == "first" else text + image
                chunks.append((head + text + self._segments("ASSISTANT:"), False))
            else:
                chunks.append((self._segments(rendered) + [ids.eos], True))
        encoded = iter(self._tokenize([s for segs, _ in chunks for s in segs if isinstance(s, str)]))
        input_ids, labels = [ids.bos], [IGNORE]
        for segs, target in chunks:
            for s in segs:
                piece = next(encoded) if isinstance(s, str) else [s]
                input_ids += piece
                labels += piece if target else [IGNORE] * len(piece)
        input_ids = np.asarray(input_ids, np.int32)
        labels = np.asarray(labels, np.int32)
        labels[input_ids == ids.boxes] = IGNORE
        n_slots, n_triggers = int((input_ids == ids.boxes).sum()), int((labels == ids.at).sum())
        if n_slots != len(box_list) or n_triggers != len(target_objs):
            raise BadSample(f"{key}: {n_slots} <boxes> tokens for {len(box_list)} boxes, "
                            f"{n_triggers} triggers for {len(target_objs)} target boxes", "<boxes>/box mismatch")
        boxes = object_boxes[box_list].reshape(-1, 4).astype(np.float32)
        targets = object_boxes[target_objs].reshape(-1, 4).astype(np.float32)
        return Encoded(input_ids, labels, boxes, targets, target_objs)
