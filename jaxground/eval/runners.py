"""Task runners: iterate this process's padded evaluation batches (dicts of `Batch` fields with a `valid` row
mask), call a per-batch function (`jaxground.eval.steps` on the mesh, or batched generation) and collect one prediction
row per valid sample; `add_up` then turns the rows of every process (`jaxground.eval.gather`) into the figures.

A row's "index" is its position in this process's batches, padding rows counted (the gather maps it to the sample
number); forward rows carry their metric terms as "sums". A padded row (`valid=False`) gives no row, so every
sample of a split is counted exactly once whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from jaxground.eval.metrics import Sums, rec_summary, rec_sums
from jaxground.eval.pope import PARSERS, pope_metrics


def _rounded(x) -> list:
    return np.asarray(x, np.float64).round(4).tolist()


def forward_rows(step: Callable[[dict], dict], batches: Iterable[dict],
                 row: Callable[[dict, int], dict]) -> list[dict]:
    """step(batch) -> per-row outputs with "sums" {name: [B]}; row(outputs, i) -> the prediction values of row i.
    -> one row per valid sample: "index", its values and "sums" (its metric terms)."""
    rows, seen = [], 0
    for batch in batches:
        out = step(batch)
        sums = {k: np.asarray(v, np.float64) for k, v in out["sums"].items()}
        valid = np.asarray(batch["valid"])
        for i in np.flatnonzero(valid):
            rows.append({"index": seen + int(i), **row(out, i), "sums": {k: float(v[i]) for k, v in sums.items()}})
        seen += len(valid)
    return rows


def run_rec(step: Callable[[dict], dict], batches: Iterable[dict]) -> list[dict]:
    """step(batch) -> {"sums" (rec_sums per row), "pred" [B,4], "target" [B,4]} -> rows."""
    return forward_rows(step, batches, lambda out, i: {"pred": _rounded(out["pred"][i]),
                                                       "target": _rounded(out["target"][i])})


def run_res(step: Callable[[dict], dict], batches: Iterable[dict]) -> list[dict]:
    """step(batch) -> {"sums" (`steps.res_terms` per row), "counted" [B], "box" [B,4]} -> rows."""
    return forward_rows(step, batches, lambda out, i: {
        "mask_iou": round(float(out["sums"]["iou"][i]), 4) if out["counted"][i] else None,
        "pred": _rounded(out["box"][i])})


def run_res_generated(step: Callable[[dict], dict], batches: Iterable[dict]) -> list[dict]:
    """step(batch) -> {"text" [B] str, "num_triggers" [B], "box" [B,4], "counted" [B], "sums"
    (`steps.res_generated_step`'s)} -> rows: answer, num_triggers, pred (the first trigger's box, None without),
    mask_iou (None when the sample has no mask), intersection and union (pixels of the scored mask)."""
    def row(out, i):
        n, sums = int(out["num_triggers"][i]), out["sums"]
        return {"answer": out["text"][i], "num_triggers": n, "pred": _rounded(out["box"][i]) if n else None,
                "mask_iou": round(float(sums["iou"][i]), 4) if out["counted"][i] else None,
                "intersection": int(sums["intersection"][i]), "union": int(sums["union"][i])}

    return forward_rows(step, batches, row)


def run_pointing(step: Callable[[dict], dict], batches: Iterable[dict]) -> list[dict]:
    """step(batch) -> {"sums" (pointing_sums per row), "choice" [B], "answer" [B], "pred" [B,4]} -> rows."""
    return forward_rows(step, batches, lambda out, i: {
        "choice": int(out["choice"][i]), "answer": int(out["answer"][i]), "pred": _rounded(out["pred"][i])})


def add_up(rows: list[dict], summary: Callable[[Sums], dict]) -> tuple[dict, list[dict]]:
    """Rows with metric terms ("sums") -> (summary of their float64 totals, added in row order; rows without
    them)."""
    total = Sums()
    for r in rows:
        total.add(r["sums"])
    return summary(total), [{k: v for k, v in r.items() if k != "sums"} for r in rows]


def run_generation(generate: Callable[[dict], dict], batches: Iterable[dict],
                   references: Callable[[dict], list[str]]) -> list[dict]:
    """generate(batch) -> {"text": [B] str, "box" [B,4] (first trigger's F(t)), "num_triggers" [B]};
    -> one row per valid sample: "index", answer, reference, box (None without a trigger), target box."""
    rows, seen = [], 0
    for batch in batches:
        out = generate(batch)
        refs = iter(references(batch))
        box, n = np.asarray(out["box"]), np.asarray(out["num_triggers"])
        valid = np.asarray(batch["valid"])
        for i in np.flatnonzero(valid):
            rows.append({"index": seen + int(i), "answer": out["text"][i], "reference": next(refs),
                         "pred": _rounded(box[i]) if n[i] else None,
                         "target": _rounded(batch["target_boxes"][i, 0]) if batch["target_mask"][i, 0] else None})
        seen += len(valid)
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
    mae (unparsed answers excluded; None when none parsed), unparsed, count}, rows with pred_count / label_count)."""
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
    return {"accuracy": hits / n if n else 0.0, "mae": float(np.mean(errors)) if errors else None,
            "unparsed": n - len(errors), "count": n}, out
