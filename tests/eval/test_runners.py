"""Runners over padded evaluation batches: each sample counted once; POPE runner."""

import numpy as np
import pytest

from jaxground.eval.metrics import pointing_summary, rec_summary, rec_sums, res_summary
from jaxground.eval.runners import add_up, run_pope, run_rec
from jaxground.eval.steps import per_row


def batches(pred, target, batch_size):
    n = len(pred)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)  # pad rows repeat sample 0: they must not count
        yield {"pred": pred[idx], "target": target[idx], "valid": valid}


def step(batch):
    return {"sums": per_row(rec_sums, batch["pred"], batch["target"], batch["valid"]), "pred": batch["pred"],
            "target": batch["target"]}


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 16])
def test_padded_batches_count_each_sample_once(batch_size):
    target = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (7, 1))
    pred = target.copy()
    pred[0] = [0.6, 0.6, 0.9, 0.9]  # sample 0 (the padding source) is wrong: padding it would lower acc
    summary, rows = add_up(run_rec(step, batches(pred, target, batch_size)), rec_summary)
    assert summary["count"] == 7 and len(rows) == 7
    assert summary["acc@0.5"] == pytest.approx(6 / 7)
    assert [r["index"] for r in rows] == list(range(7))  # positions in the batches: padding comes last
    assert "sums" not in rows[0]


def test_run_pope():
    metrics, rows = run_pope(["The answer is yes .", "The answer is no .", "yes"], ["yes", "yes", "no"])
    assert [r["pred"] for r in rows] == ["yes", "no", "yes"]
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["yes_ratio"] == pytest.approx(2 / 3)


def test_prompt_batch_left_pads_the_question_and_keeps_its_boxes():
    from jaxground.eval.prompts import answer_starts, prompt_batch

    at, boxes_id, pad = 90, 91, 0
    ids = np.array([[1, 5, at, boxes_id, 6, 7, at, boxes_id, 8, 2, 0, 0],
                    [1, 5, 6, 7, at, boxes_id, 8, 2, 0, 0, 0, 0],
                    [0] * 12])
    labels = np.full_like(ids, -100)
    labels[0, 6:10] = ids[0, 6:10]
    labels[0, 7] = -100  # <boxes> is never a target
    labels[1, 4:8] = ids[1, 4:8]
    labels[1, 5] = -100
    batch = {"input_ids": ids, "labels": labels, "valid": np.array([True, True, False]),
             "boxes": np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)}
    assert answer_starts(labels).tolist() == [6, 4, 12]
    p = prompt_batch(batch, pad, boxes_id, width=8)
    assert p["input_ids"][0].tolist() == [0, 0, 1, 5, at, boxes_id, 6, 7]
    assert p["input_ids"][1].tolist() == [0, 0, 0, 0, 1, 5, 6, 7]
    assert p["attention_mask"][1].tolist() == [False] * 4 + [True] * 4
    assert p["attention_mask"][2].sum() == 1  # a padding row keeps one token
    assert p["box_mask"].tolist() == [[True, False], [False, False], [False, False]]
    with pytest.raises(ValueError, match="prompt width 5"):
        prompt_batch(batch, pad, boxes_id, width=5)


def test_generated_rec_and_pope_scoring():
    from jaxground.eval.runners import pope_label, score_rec_generated

    rows = [{"pred": [0.1, 0.1, 0.5, 0.5], "target": [0.1, 0.1, 0.5, 0.5]},
            {"pred": None, "target": [0.1, 0.1, 0.5, 0.5]},  # no trigger generated: a miss
            {"pred": [0.0, 0.0, 0.2, 0.2], "target": [0.1, 0.1, 0.5, 0.5]}]
    out = score_rec_generated(rows)
    assert out["count"] == 3 and out["acc@0.5"] == pytest.approx(1 / 3) and out["no_trigger"] == 1
    assert [pope_label(r) for r in ("Yes.", "No, there is not.", "yes", "")] == ["yes", "no", "yes", "no"]
    # the authors' parser lower-cases after "ASSISTANT: ": a capitalised "Yes." is a yes
    metrics, _ = run_pope(["Yes.", "No."], ["yes", "no"])
    assert metrics["accuracy"] == 1.0


def test_res_and_pointing_runners_skip_padding():
    from jaxground.eval.runners import run_pointing, run_res

    def res_step(batch):
        v = batch["valid"].astype(float)
        return {"sums": {"intersection": 2 * v, "union": 4 * v, "iou": 0.5 * v, "count": v},
                "counted": batch["valid"], "box": np.zeros((3, 4))}

    valid = [np.array([True, True, True]), np.array([True, False, False])]
    summary, rows = add_up(run_res(res_step, ({"valid": v} for v in valid)), res_summary)
    assert summary == {"ciou": 0.5, "giou": 0.5, "count": 4} and len(rows) == 4
    assert [r["index"] for r in rows] == [0, 1, 2, 3]

    def pointing_step(batch):
        v = batch["valid"].astype(float)
        return {"sums": {"correct": v * [1, 0, 0], "count": v}, "choice": np.zeros(3, int),
                "answer": np.zeros(3, int), "pred": np.zeros((3, 4))}

    summary, rows = add_up(run_pointing(pointing_step, ({"valid": v} for v in valid)), pointing_summary)
    assert summary == {"accuracy": 0.5, "count": 4} and len(rows) == 4


def test_count_answers_parsed_and_scored():
    from jaxground.eval.runners import parse_count, score_count

    assert [parse_count(t) for t in ("Two: <at> <boxes> .", "Zero.", "10 shapes", "three", "", "Many.")] == \
        [2, 0, 10, 3, None, None]
    rows = [{"answer": "Two: x .", "reference": "Two: y ."}, {"answer": "One: x .", "reference": "Three: y ."},
            {"answer": "No idea", "reference": "Zero."}]
    metrics, out = score_count(rows)
    assert metrics == {"accuracy": 1 / 3, "mae": 1.0, "unparsed": 1, "count": 3}
    assert [(r["pred_count"], r["label_count"]) for r in out] == [(2, 2), (1, 3), (None, 0)]
    with pytest.raises(ValueError, match="does not open with a number"):
        score_count([{"answer": "Two", "reference": "Yes."}])
    # no answer parsed: no error to average (0.0 would read as a perfect score)
    assert score_count([{"answer": "No idea", "reference": "Two."}])[0]["mae"] is None


def test_res_step_scores_only_inside_the_image():
    """A predicted mask that also fills the padding of the square is not charged for it (`mask_region`)."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from jaxground.eval.steps import res_step

    b, s = 2, 8
    region = np.zeros((b, s, s), bool)
    region[:, :, 2:6] = True  # a tall image centred in its square: columns 2..5
    gt = region[:, None].astype(np.float32)  # the object fills the image
    batch = {"images": np.zeros((b, 4, 4, 3), np.float32), "input_ids": np.zeros((b, 3), np.int32),
             "attention_mask": np.ones((b, 3), bool), "labels": np.zeros((b, 3), np.int32),
             "boxes": np.zeros((b, 1, 4), np.float32), "box_mask": np.zeros((b, 1), bool),
             "target_boxes": np.zeros((b, 1, 4), np.float32), "target_mask": np.ones((b, 1), bool),
             "valid": np.ones(b, bool), "sam_images": np.zeros((b, 4, 4, 3), np.float32), "masks": gt,
             "mask_valid": np.ones((b, 1), bool), "mask_region": region}

    def model(_):  # predicts the whole square, padding included
        return SimpleNamespace(mask_logits=jnp.ones((b, 1, s, s)), pred_boxes=jnp.zeros((b, 1, 4)))

    out = res_step(model, batch)
    np.testing.assert_allclose(np.asarray(out["sums"]["iou"]), [1.0, 1.0])
    out = res_step(model, {k: v for k, v in batch.items() if k != "mask_region"})
    np.testing.assert_allclose(np.asarray(out["sums"]["iou"]), [0.5, 0.5])  # without the region the padding counts
