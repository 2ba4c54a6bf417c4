"""POPE (object hallucination) answer parsing and metrics.

Two parsers:
- `parse_nextchat` (default) follows the NExT-Chat authors' `PopeComputeMetrics.extract_ans`: keep the text
  after the last "ASSISTANT: " (lower-cased only then), take what follows "The answer is" / "the answer is" /
  "So the answer is" / "Answer:" when that phrase occurs exactly once, else "yes" if "yes" occurs anywhere,
  else "no". Any extracted answer other than exactly "no" counts as yes.
- `parse_pope` follows the official POPE / LLaVA script: first sentence only, commas dropped, "no" if one of
  the words is "No", "no" or "not", else yes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_ANSWER = re.compile(r"(?:(?:(?:(?:(?:So t)|(?:T)|(?:t))he answer is)|(?:Answer:)) (.+))")


def extract_nextchat(text: str) -> str:
    """The answer string as the authors extract it (e.g. "yes", "no", "a cat")."""
    if "ASSISTANT: " in text:
        text = text.split("ASSISTANT: ")[-1].lower()
    found = _ANSWER.findall(text.strip())
    if len(found) != 1:
        return "yes" if "yes" in text else "no"
    return found[0].strip().rstrip(".").strip()


def parse_nextchat(text: str) -> bool:
    """True for a "yes" answer."""
    return extract_nextchat(text) != "no"


def parse_pope(text: str) -> bool:
    """True for a "yes" answer, by the official POPE rule."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not any(w in words for w in ("No", "no", "not"))


PARSERS = {"nextchat": parse_nextchat, "pope": parse_pope}


def pope_metrics(pred_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 (for the "yes" class) and yes-ratio; 0.0 where a ratio is 0/0."""
    if len(pred_yes) != len(label_yes):
        raise ValueError(f"{len(pred_yes)} predictions for {len(label_yes)} labels")
    pairs = list(zip(map(bool, pred_yes), map(bool, label_yes)))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    tn = sum(not p and not y for p, y in pairs)
    fn = sum(not p and y for p, y in pairs)
    n = len(pairs)

    def ratio(a, b):
        return a / b if b else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(tp + fp, n),
        "count": n,
    }
