"""Task runners: iterate padded evaluation batches (dicts of `Batch` fields with a `valid` row mask), call a
per-batch function (`jaxground.eval.steps`, jitted, or batched generation), add up metric sums on the host and
collect per-sample prediction rows.

A padded row (`valid=False`) contributes to no sum and no prediction line, so every sample of a split is
counted exactly once whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from jaxground.eval.metrics import Sums, pointing_summary, rec_summary, rec_sums, res_summary
from jaxground.eval.pope import PARSERS, pope_metrics


def _rounded(x) -> list:
    return np.asarray(x, np.float64).round(4).tolist()


def run_rec(step: Callable[[dict], dict], batches: Iterable[dict]) -> tuple[dict, list[dict]]:
    """step(batch) -> {"sums", "pred" [B,4], "target" [B,4]} -> (Acc@0.5 / mIoU summary, prediction rows)."""
    total, rows = Sums(), []
    for batch in batches:
        out = step(batch)
        total.add(out["sums"])
        pred, target = np.asarray(out["pred"]), np.asarray(out["target"])
        for i in np.flatnonzero(np.asarray(batch["valid"])):
            rows.append({"index": len(rows), "pred": _rounded(pred[i]), "target": _rounded(target[i])})
    return rec_summary(total), rows


def run_res(step: Callable[[dict], dict], batches: Iterable[dict]) -> tuple[dict, list[dict]]:
    """step(batch) -> {"sums" (res_sums), "iou" [B], "counted" [B], "box" [B,4]} -> (cIoU / gIoU, rows)."""
    total, rows = Sums(), []
    for batch in batches:
        out = step(batch)
        total.add(out["sums"])
        iou, counted, box = (np.asarray(out[k]) for k in ("iou", "counted", "box"))
        for i in np.flatnonzero(np.asarray(batch["valid"])):
            rows.append({"index": len(rows), "mask_iou": round(float(iou[i]), 4) if counted[i] else None,
                         "pred": _rounded(box[i])})
    return res_summary(total), rows


def run_pointing(step: Callable[[dict], dict], batches: Iterable[dict]) -> tuple[dict, list[dict]]:
    """step(batch) -> {"sums", "choice" [B], "answer" [B], "pred" [B,4]} -> (accuracy, rows)."""
    total, rows = Sums(), []
    for batch in batches:
        out = step(batch)
        total.add(out["sums"])
        choice, answer, pred = (np.asarray(out[k]) for k in ("choice", "answer", "pred"))
        for i in np.flatnonzero(np.asarray(batch["valid"])):
            rows.append({"index": len(rows), "choice": int(choice[i]), "answer": int(answer[i]),
                         "pred": _rounded(pred[i])})
    return pointing_summary(total), rows


def run_generation(generate: Callable[[dict], dict], batches: Iterable[dict],
                   references: Callable[[dict], list[str]]) -> list[dict]:
    """generate(batch) -> {"text": [B] str, "box" [B,4] (first trigger's F(t)), "num_triggers" [B]};
    -> one row per valid sample: answer, reference, box (None without a trigger), target box."""
    rows = []
    for batch in batches:
        out = generate(batch)
        refs = iter(references(batch))
        box, n = np.asarray(out["box"]), np.asarray(out["num_triggers"])
        for i in np.flatnonzero(np.asarray(batch["valid"])):
            rows.append({"index": len(rows), "answer": out["text"][i], "reference": next(refs),
                         "pred": _rounded(box[i]) if n[i] else None,
                         "target": _rounded(batch["target_boxes"][i, 0]) if batch["target_mask"][i, 0] else None})
    return rows


def score_rec_generated(rows: list[dict]) -> dict:
    """REC by free generation: the first generated trigger's box against the target; no trigger scores IoU 0."""
    scored = [r for r in rows if r["target"] is not None]
    pred = np.array([r["pred"] if r["pred"] is not None else [0.0] * 4 for r in scored], np.float32).reshape(-1, 4)
    target = np.array([r["target"] for r in scored], np.float32).reshape(-1, 4)
    sums = rec_sums(pred, target, np.ones(len(scored), bool))
    summary = rec_summary({k: float(v) for k, v in sums.items()})
    summary["no_trigger"] = sum(r["pred"] is None for r in scored)
    return summary


def pope_label(reference: str) -> str:
    """"yes"/"no" from a reference answer ("Yes.", "No, there is not.", "yes")."""
    return "yes" if reference.strip().lower().startswith("yes") else "no"


def run_pope(answers: Iterable[str], labels: Iterable[str], parser: str = "nextchat") -> tuple[dict, list[dict]]:
    """Generated answers and "yes"/"no" labels -> (POPE metrics, prediction rows). The authors' parser reads
    the decoded conversation, so the answer is parsed as "ASSISTANT: {answer}" (it lower-cases after that)."""
    parse = PARSERS[parser]
    rows = []
    for a, y in zip(answers, labels):
        yes = parse(f"ASSISTANT: {a}" if parser == "nextchat" else a)
        rows.append({"answer": a, "pred": "yes" if yes else "no", "label": str(y).lower()})
    metrics = pope_metrics([r["pred"] == "yes" for r in rows], [r["label"] == "yes" for r in rows])
    return metrics, rows


_NUMBER_WORDS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                              "nine", "ten"))}


def parse_count(text: str) -> int | None:
    """The number an answer opens with ("Two: <at> ... ." -> 2, "Zero." -> 0, "3 circles" -> 3); None if it
    opens with neither a number word nor digits."""
    words = text.strip().split()
    if not words:
        return None
    first = words[0].strip(".,:;!").lower()
    return int(first) if first.isdigit() else _NUMBER_WORDS.get(first)


def score_count(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Counting by generation: the number the answer opens with against the reference's. -> ({accuracy (exact),
    mae (unparsed answers excluded), unparsed, count}, rows with pred_count / label_count)."""
    out, hits, errors = [], 0, []
    for r in rows:
        pred, label = parse_count(r["answer"]), parse_count(r["reference"])
        if label is None:
            raise ValueError(f"reference answer {r['reference']!r} does not open with a number")
        hits += pred == label
        if pred is not None:
            errors.append(abs(pred - label))
        out.append(r | {"pred_count": pred, "label_count": label})
    n = len(rows)
    return {"accuracy": hits / n if n else 0.0, "mae": float(np.mean(errors)) if errors else 0.0,
            "unparsed": n - len(errors), "count": n}, out
