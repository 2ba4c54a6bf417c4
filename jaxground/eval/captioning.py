"""Region-captioning metrics through `pycocoevalcap` (the COCO caption evaluation code).

CIDEr (CIDEr-D as COCO computes it), BLEU-1..4 and ROUGE-L always; METEOR 1.5 and the Stanford PTB
tokenizer need `java` on PATH. Without java, captions are tokenized by lower-casing and splitting off the same
punctuation PTB removes, METEOR is left out, and `notes` says so. Scores are on COCO's 0..1 scale (CIDEr on
its own scale, about 0..10).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

_PUNCT = re.compile(r"[.?!,:;\-`'\"()\[\]{}]")


def simple_tokenize(text: str) -> str:
    """Lower-case, punctuation removed, single spaces (the no-java stand-in for PTBTokenizer)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                    java: bool = True) -> dict:
    """predictions {id: caption}, references {id: [captions]} (same ids) -> {"cider", "bleu4", ...}.
    `java=False` skips java even when it is installed (simple tokenizer, no METEOR)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise RuntimeError("caption metrics need pycocoevalcap (pip install pycocoevalcap==1.2)") from e
    if set(predictions) != set(references):
        raise ValueError(f"{len(set(predictions) ^ set(references))} ids are not in both predictions and references")
    if not predictions:
        raise ValueError("no captions to score")
    ids = sorted(predictions)
    notes = []
    java = java and shutil.which("java") is not None
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
        gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    else:
        res = {i: [simple_tokenize(predictions[i])] for i in ids}
        gts = {i: [simple_tokenize(c) for c in references[i]] for i in ids}
        notes.append("without java: simple tokenizer, no METEOR")

    out = {"cider": float(Cider().compute_score(gts, res)[0])}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            out["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            _close(meteor)
    out["count"] = len(ids)
    if notes:
        out["notes"] = notes
    return out


def _close(meteor) -> None:
    proc = meteor.meteor_p
    if proc.stdin:
        proc.stdin.close()
    proc.kill()
    proc.wait()
