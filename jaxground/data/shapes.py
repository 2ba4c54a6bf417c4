"""Synthetic shapes: the embedded default's data set, generated deterministically on one core.

Each image holds 1..max_objects coloured shapes (overlaps allowed; later shapes occlude earlier ones), each with
its exact visible mask and box. Task items (see `records.Example`):
- `rec`: referring expressions that pick exactly one object: attributes ("the small blue square"), extremes
  ("the leftmost shape", "the largest shape") and relations ("the triangle left of the green circle");
  `resolve(expr, attrs, boxes)` parses them back, and only expressions it resolves to exactly the target are
  kept;
- `gcap`: a caption naming every object, grouped by colour and shape;
- `pope`: balanced yes/no existence questions; `count`: counting by shape or colour (zero included).
Image i of a split is drawn from `np.random.default_rng((seed, split code, i))`, so splits are disjoint and any
image can be regenerated alone.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from jaxground.data.records import Example, png_bytes, write_records

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "white": (250, 250, 250),
}
SIZES = ("small", "medium", "large")
PATCH_CLASSES = 1 + len(SHAPES) * len(SIZES)  # the attribute aid's per-patch classes: background, (shape, size)
_RADIUS = {"small": 0.08, "medium": 0.12, "large": 0.17}  # half-extent as a share of the image side
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
RELATIONS = ("left of", "right of", "above", "below")
EXTREMES = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}  # axis, sign
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """bool[size,size]: the filled shape centred at (cx, cy) with half-extent r (pixels)."""
    out = np.zeros((size, size), bool)
    x0, y0 = max(int(cx - 1.3 * r) - 1, 0), max(int(cy - 1.3 * r) - 1, 0)  # evaluate in its window only
    x1, y1 = min(int(cx + 1.3 * r) + 2, size), min(int(cy + 1.3 * r) + 2, size)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    out[y0:y1, x0:x1] = _inside(shape, x - cx, y - cy, r)
    return out


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.2
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    if shape == "triangle":  # apex up; base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.5 * 1.15)
    raise ValueError(f"unknown shape {shape!r}")


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def draw_scene(rng: np.random.Generator, size: int, min_objects: int = 1, max_objects: int = 6):
    """-> (uint8[size,size,3] image, list of attrs dicts, float32[n,4] pixel boxes, bool[n,size,size] masks)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = rng.integers(90, 150, size=3)  # a mid-grey tinted background, distinct from every colour
    owner = np.full((size, size), -1, np.int32)
    full_masks, attrs = [], []
    for _ in range(n):
        for _attempt in range(20):
            shape, colour, sz = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))], SIZES[
                rng.integers(len(SIZES))]
            r = _RADIUS[sz] * size
            cx, cy = rng.uniform(r, size - r, size=2)
            m = _shape_mask(shape, cx, cy, r, size)
            # Keep at least 60% of every earlier object visible, so each stays recognisable.
            covered = owner[m]
            ok = all((covered == j).sum() < 0.4 * full_masks[j].sum() for j in np.unique(covered) if j >= 0)
            if ok and m.sum() > 4:
                break
        else:
            continue
        owner[m] = len(attrs)
        full_masks.append(m)
        attrs.append({"shape": shape, "colour": colour, "size": sz})
    masks = np.stack([owner == i for i in range(len(attrs))])
    for i, a in enumerate(attrs):
        jitter = rng.integers(-12, 13, size=3)
        image[masks[i]] = np.clip(np.array(COLOURS[a["colour"]]) + jitter, 0, 255)
    boxes = np.stack([_box(m) for m in masks])
    return image, attrs, boxes, masks


def patch_class(attrs: dict) -> int:
    """The attribute aid's class of an object: 1 + its (shape, size) index (0 is the background)."""
    return 1 + SHAPES.index(attrs["shape"]) * len(SIZES) + SIZES.index(attrs["size"])


# ---- referring expressions: a tiny grammar, generated and parsed by the same rules ----

def _np_matches(words: list[str], attrs: list[dict]) -> list[int]:
    """Objects matching a noun phrase like ["small", "red", "circle"] or ["blue", "shape"]."""
    ws = set(words) - {"shape", "object"}
    return [i for i, a in enumerate(attrs) if ws <= {a["shape"], a["colour"], a["size"]}]


def _related(i: int, j: int, rel: str, boxes: np.ndarray) -> bool:
    a, b = boxes[i], boxes[j]
    return {"left of": a[2] <= b[0], "right of": a[0] >= b[2], "above": a[3] <= b[1], "below": a[1] >= b[3]}[rel]


def resolve(expr: str, attrs: list[dict], boxes: np.ndarray) -> list[int]:
    """The objects an expression of this grammar refers to (all matches; unambiguous means exactly one)."""
    words = expr.removeprefix("the ").split()
    if len(words) == 2 and words[1] == "shape" and words[0] in ("largest", "smallest"):
        ranks = [SIZES.index(a["size"]) for a in attrs]
        best = max(ranks) if words[0] == "largest" else min(ranks)
        return [i for i, r in enumerate(ranks) if r == best]
    if len(words) == 2 and words[1] == "shape" and words[0] in EXTREMES:
        axis, sign = EXTREMES[words[0]]
        centre = sign * (boxes[:, axis] + boxes[:, axis + 2]) / 2
        extent = boxes[:, axis + 2] - boxes[:, axis]
        i = int(np.argmax(centre))
        # Only when it is clearly the extreme one: ahead of every other by a quarter of their mean extent.
        clear = all(centre[i] - centre[j] > 0.25 * (extent[i] + extent[j]) for j in range(len(attrs)) if j != i)
        return [i] if clear else [j for j in range(len(attrs)) if centre[i] - centre[j] <= 0.25 * (extent[i] + extent[j])]
    text = " ".join(words)
    for rel in RELATIONS:
        key = f" {rel} the "
        if key in text:
            head, land = text.split(key)
            heads, lands = _np_matches(head.split(), attrs), _np_matches(land.split(), attrs)
            if len(lands) != 1:  # the landmark itself must be unambiguous
                return []
            return [i for i in heads if i != lands[0] and _related(i, lands[0], rel, boxes)]
    return _np_matches(words, attrs)


def _expressions(attrs: list[dict], boxes: np.ndarray, rng: np.random.Generator, limit: int = 8) -> list[dict]:
    """Unambiguous referring expressions (at most `limit`), each {"expr", "obj"}: attribute phrases found
    unique by counting, extremes and relations by `resolve`; every kept one is checked with `resolve`."""
    keys = [lambda a: (a["shape"],), lambda a: (a["colour"], a["shape"]), lambda a: (a["size"], a["shape"]),
            lambda a: (a["size"], a["colour"], a["shape"]), lambda a: (a["colour"], "shape"),
            lambda a: (a["colour"], "object")]
    counts = [Counter(k(a) for a in attrs) for k in keys]
    cands = [(" ".join(k(a)), i) for i, a in enumerate(attrs) for k, c in zip(keys, counts) if c[k(a)] == 1]
    cands += [(f"{w} shape", None) for w in ("largest", "smallest", *EXTREMES)]
    relations = []
    shape_counts = counts[0]
    for i, a in enumerate(attrs):  # relations, only where the head's shape alone is ambiguous
        if shape_counts[(a["shape"],)] < 2:
            continue
        for j, b in enumerate(attrs):
            if i != j:
                for land in ([b["colour"], b["shape"]], [b["shape"]]):
                    if sum(1 for o in attrs if all(w in o.values() for w in land)) == 1:
                        relations += [(f"{a['shape']} {rel} the {' '.join(land)}", i) for rel in RELATIONS]
    found = []
    for pool, quota in ((relations, limit // 2), (cands, limit)):
        for k in rng.permutation(len(pool)):
            text, want = pool[k]
            expr = f"the {text}"
            hits = resolve(expr, attrs, boxes)
            if len(hits) == 1 and (want is None or hits[0] == want) and all(f["expr"] != expr for f in found):
                found.append({"expr": expr, "obj": hits[0]})
                if len(found) >= quota:
                    break
    return found


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith("s") else "s")


def _tasks(attrs: list[dict], boxes: np.ndarray, rng: np.random.Generator) -> dict:
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(attrs):
        groups.setdefault((a["colour"], a["shape"]), []).append(i)
    parts, gcap_groups = [], []
    for (c, s), objs in groups.items():
        n = len(objs)
        parts.append(f"{'a' if n == 1 else _NUMBERS[n]} {c} {_plural(s, n)} <loc>")
        gcap_groups.append(objs)
    caption = "There " + ("is " if len(gcap_groups[0]) == 1 else "are ") + (
        ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."
    present = {f"{c} {s}" for c, s in groups}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    k = min(len(present), 2)
    present = sorted(present)
    pope = [{"object": present[o], "answer": "yes"} for o in rng.permutation(len(present))[:k]]
    pope += [{"object": absent[o], "answer": "no"} for o in rng.permutation(len(absent))[:k]]
    count = []
    for s in rng.permutation(len(SHAPES))[:2]:
        count.append({"noun": _plural(SHAPES[s], 2),
                      "objs": [i for i, a in enumerate(attrs) if a["shape"] == SHAPES[s]]})
    c = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    count.append({"noun": f"{c} shapes", "objs": [i for i, a in enumerate(attrs) if a["colour"] == c]})
    return {"rec": _expressions(attrs, boxes, rng), "gcap": [{"caption": caption, "groups": gcap_groups}],
            "pope": pope, "count": count}


def make_example(seed: int, split: str, index: int, size: int = 64, min_objects: int = 1,
                 max_objects: int = 6) -> Example:
    """Image `index` of `split`: a pure function of its arguments."""
    rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
    image, attrs, boxes, masks = draw_scene(rng, size, min_objects, max_objects)
    names = [f"{a['colour']} {a['shape']}" for a in attrs]
    return Example(boxes=boxes, tasks=_tasks(attrs, boxes, rng), image=png_bytes(image), width=size, height=size,
                   names=names, masks=masks, source="shapes", key=f"shapes/{split}/{index}", attrs=attrs)


def corpus(examples: list[Example]) -> list[str]:
    """Every text the templates can produce from these examples (to train the synthetic tokenizer)."""
    from jaxground.data import templates
    from jaxground.data.conversation import SHORT_SYSTEM

    texts = list(templates.all_template_texts()) + [f"{SHORT_SYSTEM} USER:", "ASSISTANT:"] * 50
    for ex in examples:
        for items in ex.tasks.values():
            for it in items:
                texts += [str(v) for v in it.values() if isinstance(v, str)]
        texts += ex.names
    # Markers and placeholders (<loc>, <expr>, ...) never reach the tokenizer as text.
    return [re.sub(r"<\w+>", " ", t) for t in texts]


def write_dataset(out: str | Path, *, train: int = 20000, val: int = 1000, test: int = 1000, size: int = 64,
                  seed: int = 0, min_objects: int = 1, max_objects: int = 6, workers: int = 0) -> dict:
    """Writes `{split}.array_record` files and `tokenizer/` (a small BPE) under `out`; returns split sizes.
    `workers` > 0 draws images in that many processes (the output is identical)."""
    import functools
    import multiprocessing

    from jaxground.data.tokenizer import train_bpe

    out = Path(out)
    counts, sample = {}, []
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers else None
    try:
        for split, n in (("train", train), ("val", val), ("test", test)):
            make = functools.partial(make_example, seed, split, size=size, min_objects=min_objects,
                                     max_objects=max_objects)
            examples = pool.imap(make, range(n), chunksize=64) if pool else map(make, range(n))

            def keep_some(examples=examples, split=split):
                for i, ex in enumerate(examples):
                    if split == "train" and i < 2000:
                        sample.append(ex)
                    yield ex

            counts[split] = write_records(out / f"{split}.array_record", keep_some())
    finally:
        if pool:
            pool.close()
    train_bpe(corpus(sample), out / "tokenizer")
    return counts
