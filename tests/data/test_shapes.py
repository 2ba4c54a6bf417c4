import hashlib

import numpy as np

from jaxground.data import shapes
from jaxground.data.records import RecordSource, decode, encode


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_deterministic_and_round_trips():
    a, b = shapes.make_example(3, "train", 7, size=48), shapes.make_example(3, "train", 7, size=48)
    assert a.image == b.image and a.tasks == b.tasks
    c = decode(encode(a))
    np.testing.assert_array_equal(c.masks, a.masks)
    np.testing.assert_array_equal(c.boxes, a.boxes)
    assert c.tasks == a.tasks and c.attrs == a.attrs


def test_splits_are_disjoint(shapes_dir):
    digests = {}
    for split in ("train", "val", "test"):
        src = RecordSource(shapes_dir / f"{split}.array_record")
        digests[split] = {hashlib.sha1(src[i].image).hexdigest() for i in range(len(src))}
    assert len(digests["train"]) == 48
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def _independent_matches(expr, attrs, boxes):
    """A second reading of the grammar, written from its description, for attribute and relation phrases."""
    words = expr.split()[1:]
    rel = next((r for r in shapes.RELATIONS if f" {r} the " in expr), None)
    if rel:
        head, land = expr[4:].split(f" {rel} the ")
        lands = _independent_matches("the " + land, attrs, boxes)
        assert len(lands) == 1, expr
        j = lands[0]
        test = {"left of": lambda a, b: a[2] <= b[0], "right of": lambda a, b: a[0] >= b[2],
                "above": lambda a, b: a[3] <= b[1], "below": lambda a, b: a[1] >= b[3]}[rel]
        return [i for i in _independent_matches("the " + head, attrs, boxes) if i != j and test(boxes[i], boxes[j])]
    return [i for i, a in enumerate(attrs)
            if all(w in ("shape", "object") or w in (a["shape"], a["colour"], a["size"]) for w in words)]


def test_every_expression_picks_exactly_its_object():
    kinds = set()
    for i in range(150):
        ex = shapes.make_example(0, "val", i, size=64)
        # Masks are the visible pixels and the boxes are their bounding boxes.
        for m, b in zip(ex.masks, ex.boxes):
            assert m.any() and _bbox(m) == b.tolist()
        assert not (ex.masks.sum(0) > 1).any()  # each pixel belongs to one object at most
        for item in ex.tasks["rec"]:
            assert shapes.resolve(item["expr"], ex.attrs, ex.boxes) == [item["obj"]], item
            words = item["expr"].split()
            if words[1] in ("largest", "smallest", *shapes.EXTREMES):
                kinds.add(words[1])
                continue
            kinds.add("relation" if any(f" {r} " in item["expr"] for r in shapes.RELATIONS) else "attribute")
            assert _independent_matches(item["expr"], ex.attrs, ex.boxes) == [item["obj"]], item
    assert {"relation", "attribute", "largest"} <= kinds


def test_pope_balanced_and_counts_exact():
    yes = no = 0
    for i in range(40):
        ex = shapes.make_example(1, "train", i)
        present = {f"{a['colour']} {a['shape']}" for a in ex.attrs}
        for item in ex.tasks["pope"]:
            assert (item["object"] in present) == (item["answer"] == "yes")
            yes, no = yes + (item["answer"] == "yes"), no + (item["answer"] == "no")
        for item in ex.tasks["count"]:
            noun = item["noun"]
            plural = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
                      "crosses": "cross"}
            want = [k for k, a in enumerate(ex.attrs)
                    if noun == f"{a['colour']} shapes" or plural.get(noun) == a["shape"]]
            assert item["objs"] == want, (noun, ex.attrs)
    assert yes == no


def test_curriculum_limits_objects():
    for i in range(30):
        assert len(shapes.make_example(0, "train", i, max_objects=1).boxes) == 1
