"""Each reader on a tiny fixture written in its dataset's real on-disk format, then through the pipeline."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxground.data import sources
from jaxground.data.pipeline import make_pipeline, pipeline_config
from jaxground.data.records import Example


def _image(path, w=40, h=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _read(kind, path, split="train"):
    return sources.read(kind, {"path": str(path), "split": split})


def test_refcoco_refs_pickle_and_instances(tmp_path):
    refs = [
        {"ref_id": 7, "ann_id": 70, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"sent": "man on the left", "raw": "Man on the left"}, {"sent": "left guy"}]},
        {"ref_id": 8, "ann_id": 71, "image_id": 1, "split": "val", "category_id": 1, "sentences": [{"sent": "x"}]},
    ]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    inst = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 70, "image_id": 1, "bbox": [2, 3, 10, 12], "category_id": 1,
                             "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]]},
                            {"id": 71, "image_id": 1, "bbox": [20, 3, 10, 12], "category_id": 1,
                             "segmentation": {"counts": "x", "size": [30, 40]}}]}
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    train = _read("refcoco", tmp_path)
    assert len(train) == 1
    ex = train[0]
    np.testing.assert_array_equal(ex.boxes, [[2, 3, 12, 15]])
    assert ex.tasks["rec"] == [{"expr": "man on the left", "obj": 0}, {"expr": "left guy", "obj": 0}]
    assert ex.image_path == "COCO_train2014_000000000001.jpg" and ex.polygons == [[[2, 3, 12, 3, 12, 15, 2, 15]]]
    assert _read("refcoco", tmp_path, "val")[0].polygons is None  # RLE is not decoded


def test_refcoco_shikra_jsonl(tmp_path):
    f = tmp_path / "REC_refcoco_unc_val.jsonl"
    f.write_text(json.dumps({"img_path": "a.jpg", "expression": "red car", "bbox": [1, 2, 30, 20],
                             "dataset_name": "refcoco", "height": 30, "width": 40}) + "\n")
    (ex,) = _read("refcoco_jsonl", f)
    np.testing.assert_array_equal(ex.boxes, [[1, 2, 30, 20]])
    assert ex.tasks == {"rec": [{"expr": "red car", "obj": 0}]} and (ex.width, ex.height) == (40, 30)


@pytest.mark.parametrize("kind, good, bad_value", [
    ("refcoco_jsonl", {"img_path": "a.jpg", "expression": "red car", "bbox": [1, 2, 30, 20]}, {"bbox": "abc"}),
    ("refcoco_jsonl", {"img_path": "a.jpg", "expression": "red car", "bbox": [1, 2, 30, 20]}, {"width": "wide"}),
    ("pope", {"image": "a.jpg", "text": "Is there a dog in the image?", "label": "no"}, {"label": 1}),
])
def test_jsonl_bad_line_named(tmp_path, kind, good, bad_value):
    """A line that is not JSON, lacks a key the reader needs, or holds a value it cannot take, is refused as
    FILE:LINE (blank lines count); a bad value was refused without its place until 2026-12-05."""
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(good)[:-3] + "\n")
    with pytest.raises(sources.SourceError, match=r"x\.jsonl:3: not JSON"):
        _read(kind, f)
    key = min(good)
    f.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != key}) + "\n")
    with pytest.raises(sources.SourceError, match=rf"x\.jsonl:2: no '{key}'"):
        _read(kind, f)
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(good | bad_value) + "\n")
    with pytest.raises(sources.SourceError, match=r"x\.jsonl:3: "):
        _read(kind, f)
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert [ex.key.split(" ")[0] for ex in _read(kind, f)] == ["x.jsonl:1", "x.jsonl:3"]


def test_flickr30k_entities(tmp_path):
    (tmp_path / "train.txt").write_text("100\n")
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Sentences" / "100.txt").write_text(
        "[/EN#1/people A child] in [/EN#2/clothing a pink dress] climbs [/EN#3/other stairs] .\n")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "100.xml").write_text(
        "<annotation><size><width>40</width><height>30</height><depth>3</depth></size>"
        "<object><name>1</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>2</name><name>1</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>9</xmax><ymax>19</ymax>"
        "</bndbox></object><object><name>3</name><nobndbox>1</nobndbox></object></annotation>")
    (ex,) = _read("flickr", tmp_path)
    # 1-based inclusive VOC pixels: x0, y0 as the official reader's (all - 1), x1, y1 one past the last pixel
    np.testing.assert_array_equal(ex.boxes, [[0, 1, 10, 20], [2, 3, 9, 19]])
    (item,) = ex.tasks["gcap"]
    assert item["caption"] == "A child <loc> in a pink dress <loc> climbs stairs ."
    assert item["groups"] == [[0, 1], [1]]


def test_visual_genome_regions(tmp_path):
    f = tmp_path / "region_descriptions.json"
    f.write_text(json.dumps([{"id": 5, "regions": [
        {"region_id": 1, "image_id": 5, "phrase": "a cat ", "x": 1, "y": 2, "width": 5, "height": 6},
        {"region_id": 2, "image_id": 5, "phrase": "grass", "x": 0, "y": 0, "width": 40, "height": 10}]}]))
    (ex,) = _read("vg", f)
    np.testing.assert_array_equal(ex.boxes, [[1, 2, 6, 8], [0, 0, 40, 10]])
    assert ex.tasks["rec"][0] == {"expr": "a cat", "obj": 0} and ex.image_path == "5.jpg"


def test_visual7w_pointing(tmp_path):
    f = tmp_path / "dataset_v7w_pointing.json"
    f.write_text(json.dumps({"images": [{"filename": "v7w_9.jpg", "image_id": 9, "split": "val", "qa_pairs": [
        {"qa_id": 1, "question": "Which is the cup?", "answer": 12, "multiple_choices": [11, 13, 14],
         "type": "which"}]}], "boxes": [
        {"box_id": i, "x": i, "y": 1, "width": 3, "height": 4, "name": f"o{i}"} for i in (11, 12, 13, 14)]}))
    (ex,) = _read("v7w", f, "val")
    (item,) = ex.tasks["v7w"]
    assert ex.names[item["candidates"][item["answer"]]] == "o12"
    np.testing.assert_array_equal(ex.boxes[item["candidates"][item["answer"]]], [12, 1, 15, 5])
    assert _read("v7w", f, "train") == []


def test_visual7w_candidates_come_in_a_per_sample_order():
    from jaxground.data.templates import build_turns

    ex = Example(boxes=np.zeros((4, 4), np.float32), tasks={})
    item = {"question": "Which is the cup?", "candidates": [0, 1, 2, 3], "answer": 2}
    orders = set()
    for seed in range(20):
        (_, _, shown), (_, _, answer) = build_turns(ex, "v7w", item, np.random.default_rng(seed))
        assert sorted(g[0] for g in shown) == [0, 1, 2, 3] and answer == [[2]]
        orders.add(tuple(g[0] for g in shown))
    assert len(orders) > 5


def test_pope_and_llava(tmp_path):
    f = tmp_path / "coco_pope_random.json"
    f.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "no"}\n')
    (ex,) = _read("pope", f)
    assert ex.tasks["pope"] == [{"object": "dog", "answer": "no", "question": "Is there a dog in the image?"}]
    g = tmp_path / "llava.json"
    g.write_text(json.dumps([{"id": "1", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dog."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    (ex,) = _read("llava", g)
    assert ex.tasks["conv"][0]["turns"] == [["user", "<image>\nWhat is it?"], ["assistant", "A dog."]]
    assert ex.image_path == "000000033471.jpg"
    (ex,) = sources.read("llava", {"path": str(g), "split": "train", "coco_prefix": True})
    assert ex.image_path == "COCO_train2014_000000033471.jpg"  # the file name in COCO's train2014


def test_llava_finds_its_image_under_the_coco_file_name(tmp_path, shapes_dir):
    from jaxground.train.defaults import grounding_mixture

    _image(tmp_path / "train2014" / "COCO_train2014_000000033471.jpg")
    g = tmp_path / "llava_instruct_150k.json"
    g.write_text(json.dumps([{"id": "1", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the red circle?"}, {"from": "gpt", "value": "A circle."}]}]))
    entry = grounding_mixture(with_llava=True)["llava"] | {"path": str(g), "image_root": str(tmp_path / "train2014")}
    cfg = pipeline_config(num_image_tokens=4, image_size=16, max_len=80, batch_size=1,
                          tokenizer=str(shapes_dir / "tokenizer"), strict=True, datasets={"llava": entry})
    (batch,) = list(make_pipeline(cfg, training=False, process_index=0, process_count=1))
    assert batch["valid"].all()


def test_tfds_without_tensorflow_says_so(tmp_path):
    try:
        import tensorflow  # noqa: F401
        pytest.skip("tensorflow is installed")
    except ImportError:
        pass
    with pytest.raises(sources.SourceError, match="needs tensorflow"):
        _read("tfds_refcoco", tmp_path, "refcoco_unc/validation")


def test_readers_feed_the_pipeline(tmp_path, shapes_dir):
    """REC from the jsonl layout and POPE, mixed, read from image files through the real pipeline."""
    _image(tmp_path / "img" / "a.jpg")
    rec = tmp_path / "rec.jsonl"
    rec.write_text(json.dumps({"img_path": "a.jpg", "expression": "the red circle", "bbox": [1, 2, 30, 20],
                               "height": 30, "width": 40}) + "\n")
    pope = tmp_path / "pope.json"
    pope.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a red circle in the image?", '
                    '"label": "yes"}\n')
    cfg = pipeline_config(num_image_tokens=4, image_size=16, max_len=80, batch_size=2,
                          tokenizer=str(shapes_dir / "tokenizer"), strict=True)
    cfg.datasets = {
        "rec": {"kind": "refcoco_jsonl", "path": str(rec), "split": "", "image_root": str(tmp_path / "img"),
                "weight": 1.0},
        "pope": {"kind": "pope", "path": str(pope), "split": "", "image_root": str(tmp_path / "img"),
                 "weight": 1.0}}
    (batch,) = list(make_pipeline(cfg, training=False, process_index=0, process_count=1))
    assert batch["valid"].all() and batch["target_mask"].sum() == 1
    # expand2square pads 40x30 to 40x40 (5 px above): the box moves down by 5 px.
    np.testing.assert_allclose(batch["target_boxes"][batch["target_mask"]], [[1 / 40, 7 / 40, 30 / 40, 25 / 40]])


def test_paper_mixture_points_each_reader_at_what_it_reads():
    """File readers get a file path and directory readers a directory (README: Data sources)."""
    from jaxground.train.defaults import grounding_mixture

    reads_file = {"refcoco": False, "refcoco_jsonl": True, "flickr": False, "vg": True, "v7w": True, "llava": True}
    for name, ds in grounding_mixture(with_llava=True).items():
        assert Path(ds["path"]).suffix in ((".json", ".jsonl") if reads_file[ds["kind"]] else ("",)), (name, ds["path"])
