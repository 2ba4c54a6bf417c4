"""`res_gen`: RES by free generation, the mask head on the first trigger. An unrigged tiny random NextChat (its
`<at>` logit scaled so that some answers hold no trigger, most one, some two) whose mask head is shifted so that
some masks are on and some off (the tiny SAM of `build_model` gives each sample a mask that is all on or all
off), evaluated on one device over 24 REC expressions of 3 shapes images; at original pixels
(`eval.res_pixels=original`) also on the same images placed on wide and tall canvases."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_end_to_end import build_model, overrides
from test_res_pixels import decode_mask, released_reference

CONFIG = "configs/eval_shapes.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config args, model, encoder)."""
    from jaxground.config import load_config
    from jaxground.data.shapes import write_dataset
    from jaxground.infer.command import load_encoder

    root = tmp_path_factory.mktemp("res_gen")
    write_dataset(root / "shapes", train=8, val=1, test=3, size=32, max_objects=2)
    args = [*overrides(root / "shapes"), "eval.batch_size=8"]
    config = load_config(CONFIG, args)
    encoder, tokens = load_encoder(config)
    model = build_model(config, rigged=False, std=0.3)
    kernel = model.llm.lm_head.kernel
    kernel.set_value(kernel.get_value().at[:, tokens.at].multiply(4.0))  # some answers hold triggers
    hyper = model.mask_head.mask_decoder.hypernet[0].layers[2]
    hyper.bias.set_value(hyper.bias.get_value() - 0.4)  # mask logits of either sign, depending on the state
    return args, model, encoder


@pytest.fixture(scope="module")
def evaluated(tiny):
    """trigger_state -> (figures, rows) of `res_gen`, each state evaluated once."""
    from jaxground.config import load_config
    from jaxground.eval.evaluate import evaluate
    from jaxground.parallel import make_mesh

    args, model, encoder = tiny
    cache = {}

    def run(state: str):
        if state not in cache:
            config = load_config(CONFIG, [*args, f"eval.trigger_state={state}"])
            cache[state] = evaluate(model, encoder, config, ("res_gen",), mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
        return cache[state]

    return run


def ground_truth_areas(args, model) -> list[int]:
    """Each sample's ground-truth mask area on the scored grid (inside the image), in sample order."""
    from jaxground.config import load_config
    from jaxground.eval.evaluate import plan

    (_, _, batches), = plan(load_config(CONFIG, args), model.cfg, ("res_gen",))
    areas = []
    for b in batches:
        gt = (b["masks"][:, 0] > 0.5) & b["mask_region"]
        areas += [int(a) for a in gt.sum((1, 2))[b["valid"]]]
    return areas


def test_res_gen_figures_are_its_rows_added_up(tiny, evaluated):
    """cIoU and gIoU count a sample without a trigger as an empty mask and score the first trigger's mask
    otherwise; `ciou_released` scores an empty mask unless exactly one trigger; `failed` counts the samples of
    zero intersection under that rule."""
    args, model, _ = tiny
    figures, rows = evaluated("at")
    f = figures["res_gen"]["shapes_test"]
    n = np.array([r["num_triggers"] for r in rows])
    inter = np.array([r["intersection"] for r in rows], float)
    union = np.array([r["union"] for r in rows], float)
    gt = np.array(ground_truth_areas(args, model), float)
    assert len(rows) == len(gt) == f["count"] == 24
    assert (n == 0).any() and (n == 1).any() and (n > 1).any()
    on = inter > 0
    assert on.any() and (~on & (n > 0)).any()  # masks on and off among the triggered samples
    assert np.all(inter[n == 0] == 0) and np.all(union[n == 0] == gt[n == 0])  # no trigger: an empty mask
    np.testing.assert_allclose([r["mask_iou"] for r in rows], np.round(inter / union, 4))
    assert all((r["pred"] is None) == (r["num_triggers"] == 0) for r in rows)

    one = n == 1
    released_inter = np.where(one, inter, 0.0)
    released_union = np.where(one, union, gt)
    assert f["ciou"] == pytest.approx(inter.sum() / union.sum())
    assert f["giou"] == pytest.approx(np.mean(inter / union))
    assert f["ciou_released"] == pytest.approx(released_inter.sum() / released_union.sum())
    assert (f["no_trigger"], f["multi_trigger"]) == ((n == 0).sum(), (n > 1).sum())
    assert f["failed"] == (released_inter == 0).sum()
    # a sample with two triggers whose first mask overlaps the object: cIoU counts it, the released rule does not
    assert (on & (n > 1)).any() and f["ciou"] != pytest.approx(f["ciou_released"])


def test_trigger_state_predicting_changes_boxes_and_masks_not_tokens(evaluated):
    """`eval.trigger_state=predicting` reads each trigger from the state that chose `<at>` (the released
    generate()): the same answers, other boxes and masks. A trailing `<at>` (the last allowed token) is a trigger
    only there, so trigger counts may only grow."""
    at, predicting = evaluated("at")[1], evaluated("predicting")[1]
    assert [r["answer"] for r in at] == [r["answer"] for r in predicting]
    assert all(a["num_triggers"] <= p["num_triggers"] for a, p in zip(at, predicting))
    both = [(a, p) for a, p in zip(at, predicting) if a["pred"] is not None and p["pred"] is not None]
    assert len(both) > 5 and all(not np.allclose(a["pred"], p["pred"], atol=1e-3) for a, p in both)
    assert any((a["intersection"], a["union"]) != (p["intersection"], p["union"]) for a, p in both)


def test_trigger_state_reaches_the_other_generation_tasks(tiny, monkeypatch):
    """`rec_gen`, `pope`, `reg` and `count` generate through `batch_generator`: it gets `eval.trigger_state` (a stub
    stands in for the generation, which `res_gen` runs for real above)."""
    from jaxground.config import load_config
    from jaxground.eval import evaluate
    from jaxground.parallel import make_mesh

    args, model, encoder = tiny
    configs = []

    def stub(model, tokenizer, gen_cfg, width, mesh):
        configs.append(gen_cfg)
        return lambda batch: {"text": [""] * len(batch["valid"]), "box": np.zeros((len(batch["valid"]), 4)),
                              "num_triggers": np.zeros(len(batch["valid"]), int)}

    monkeypatch.setattr(evaluate, "batch_generator", stub)
    config = load_config(CONFIG, [*args, "eval.trigger_state=predicting"])
    figures, _ = evaluate.evaluate(model, encoder, config, ("rec_gen",), mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    assert figures["rec_gen"]["shapes_test"]["no_trigger"] == 24
    assert [c.trigger_state for c in configs] == ["predicting"]


def test_unknown_trigger_state_refused_before_loading(tiny, capsys):
    """One line, exit status 2, before the checkpoint (which does not exist) is read."""
    from jaxground import cli

    args, _, _ = tiny
    code = cli.main(["eval", "--config", CONFIG, "--checkpoint", "no_such_run", "--tasks", "res_gen", *args,
                     "eval.trigger_state=chosen"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == "jaxground eval: eval.trigger_state 'chosen' is not one of ['at', 'predicting']"


def test_unknown_res_pixels_refused_before_loading(tiny, capsys):
    """One line, exit status 2, before the checkpoint (which does not exist) is read."""
    from jaxground import cli

    args, _, _ = tiny
    code = cli.main(["eval", "--config", CONFIG, "--checkpoint", "no_such_run", "--tasks", "res", *args,
                     "eval.res_pixels=native"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "jaxground eval: eval.res_pixels 'native' is not one of ['grid', 'original']"


@pytest.fixture(scope="module")
def non_square(tiny, tmp_path_factory):
    """The shapes test images placed off-centre on wide (32 x 45) and tall (47 x 32) canvases: (records dir,
    Examples). The first image's objects become COCO polygons (the box and a triangle over part of it, so
    pixels inside both count twice, as the released ground truth counts them); the others keep their masks."""
    import dataclasses
    import io
    import shutil

    from PIL import Image

    from jaxground.data.records import RecordSource, png_bytes, write_records

    args, _, _ = tiny
    shapes = Path(next(a for a in args if a.startswith("paths.shapes=")).split("=", 1)[1])
    src = RecordSource([shapes / "test.array_record"])
    out = []
    for i, ex in enumerate(src[k] for k in range(len(src))):
        (h, w), (top, left) = ((32, 45), (0, 9)) if i % 2 == 0 else ((47, 32), (6, 0))
        image = np.zeros((h, w, 3), np.uint8)
        with Image.open(io.BytesIO(ex.image)) as im:
            image[top : top + 32, left : left + 32] = np.asarray(im.convert("RGB"))
        boxes = ex.boxes + np.array([left, top, left, top], np.float32)
        masks = np.zeros((len(boxes), h, w), bool)
        masks[:, top : top + 32, left : left + 32] = ex.masks
        polygons = None
        if i == 0:
            polygons = [[[x0, y0, x1, y0, x1, y1, x0, y1], [x0, y0, (x0 + x1) / 2, y1 + 3, x0 - 2, y1]]
                        for x0, y0, x1, y1 in boxes.tolist()]
            masks = None
        out.append(dataclasses.replace(ex, image=png_bytes(image), width=w, height=h, boxes=boxes, masks=masks,
                                       polygons=polygons))
    root = tmp_path_factory.mktemp("non_square")
    shutil.copytree(shapes / "tokenizer", root / "tokenizer")
    write_records(root / "test.array_record", out)
    return root, out


def test_grid_scoring_leaves_mask_logits_on_the_devices(tiny, monkeypatch):
    """Under `eval.res_pixels=grid` (the default) nothing reads the RES steps' mask logits on the host, so
    they are not copied there; the test below shows `original` gets them."""
    from jaxground.config import load_config
    from jaxground.eval import evaluate
    from jaxground.parallel import make_mesh

    args, model, encoder = tiny
    copied, real = [], evaluate.parallel.host_rows
    monkeypatch.setattr(evaluate.parallel, "host_rows", lambda tree, mesh: copied.append(set(tree)) or real(tree, mesh))
    figures, _ = evaluate.evaluate(model, encoder, load_config(CONFIG, args), ("res", "res_gen"),
                                   mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    assert {"sums", "counted", "box"} <= copied[0] and {"tokens", "sums"} <= copied[-1]
    assert not any("mask_logits" in keys for keys in copied)
    assert figures["res"]["shapes_test"]["count"] == figures["res_gen"]["shapes_test"]["count"] == 24


def test_res_at_original_pixels_equals_the_released_rule(tiny, non_square, monkeypatch):
    """`eval.res_pixels=original` on wide and tall images: every counted row of `res` and `res_gen` scores the
    intersection and union of the released code (its mask from the step's logits by `released_reference`, its
    ground truth by pycocotools' `decode_mask` or the record's mask), and the figures add them up."""
    from jaxground.config import load_config
    from jaxground.eval import evaluate
    from jaxground.parallel import make_mesh

    args, model, encoder = tiny
    root, examples = non_square
    captured = []
    real = evaluate.res_pixels.at_original_pixels

    def spy(step, batches, sam_size):  # keeps each batch's step outputs (the mask logits), task by task
        outputs = []
        captured.append(outputs)

        def kept(batch):
            outputs.append(step(batch))
            return outputs[-1]

        return real(kept, batches, sam_size)

    monkeypatch.setattr(evaluate.res_pixels, "at_original_pixels", spy)
    config = load_config(CONFIG, [*args, f"paths.shapes={root}", "eval.res_pixels=original"])
    figures, rows = evaluate.evaluate(model, encoder, config, ("res", "res_gen"),
                                      mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    samples = [(ex, item["obj"]) for ex in examples for item in ex.tasks["rec"]]
    gts = [decode_mask(ex.polygons[o], ex.height, ex.width) if ex.polygons else ex.masks[o].astype(np.uint8)
           for ex, o in samples]
    assert max(g.max() for g in gts) == 2 and {g.shape[0] > g.shape[1] for g in gts} == {True, False}
    assert len(captured) == 2  # each task's step went through the original-pixel scoring
    for task, outputs in zip(("res", "res_gen"), captured):
        task_rows = [r for r in rows if r["task"] == task]
        logits = np.concatenate([o["mask_logits"] for o in outputs])[: len(samples), 0]
        triggers = (np.concatenate([o["num_triggers"] for o in outputs])[: len(samples)] if task == "res_gen"
                    else np.ones(len(samples), int))
        inter, union = [], []
        for x, gt, n in zip(logits, gts, triggers):
            pred = released_reference(x, *gt.shape, 32)[0] & (n > 0)
            inter.append(float((pred * gt).sum()))
            union.append(float(pred.sum() + gt.sum()) - inter[-1])
        inter, union = np.array(inter), np.array(union)
        assert len(task_rows) == len(samples) == figures[task]["shapes_test"]["count"]
        np.testing.assert_allclose([r["mask_iou"] for r in task_rows], np.round(inter / union, 4))
        f = figures[task]["shapes_test"]
        if task == "res_gen":
            assert [(r["intersection"], r["union"]) for r in task_rows] == list(zip(inter, union))
            one = triggers == 1  # the released rule: an empty mask unless exactly one trigger
            areas = np.array([g.sum() for g in gts], float)
            assert f["ciou_released"] == pytest.approx(np.where(one, inter, 0).sum() / np.where(one, union, areas).sum())
        assert np.isfinite(list(f.values())).all() and 0 < inter.sum() and (inter == 0).any()
        assert f["ciou"] == pytest.approx(inter.sum() / union.sum())
        assert f["giou"] == pytest.approx(np.mean(inter / union))
