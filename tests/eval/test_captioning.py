"""Caption metrics: values computed by hand on tiny corpora, with and without java."""

import shutil

import pytest

pytest.importorskip("pycocoevalcap")

from jaxground.eval import captioning

REFS = {"a": ["a man riding a horse"], "b": ["two dogs play in the snow"]}


def test_simple_tokenize():
    assert captioning.simple_tokenize("A Man, riding -- a horse!") == "a man riding a horse"


def test_no_java_hand_values(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    out = captioning.caption_metrics({"a": "A man on a horse.", "b": "two dogs play in the snow"}, REFS)
    assert "meteor" not in out and out["notes"]
    # ROUGE-L for "a": LCS "a man a horse" = 4 of 5 words both ways, F_beta = 0.8; "b" is exact: 1
    assert out["rouge_l"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["count"] == 2


def test_no_java_exact_match_scores(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    preds = {k: v[0] for k, v in REFS.items()}
    out = captioning.caption_metrics(preds, REFS)
    # disjoint captions: every n-gram has idf log(2), the vectors coincide, no length penalty -> 10 (CIDEr-D x10)
    assert out["cider"] == pytest.approx(10.0, rel=1e-6)
    assert out["bleu4"] == pytest.approx(1.0, rel=1e-6)
    assert out["rouge_l"] == pytest.approx(1.0)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and PTB tokenizer need java")
def test_with_java_meteor():
    good = captioning.caption_metrics({"a": "A man riding a horse.", "b": "two dogs play in snow"}, REFS)
    assert 0.5 < good["meteor"] < 1.0 and "notes" not in good
    assert good["rouge_l"] < 1.0 and good["bleu1"] > 0.8  # PTB drops the capital and the full stop


def test_bad_input():
    with pytest.raises(ValueError, match="not in both"):
        captioning.caption_metrics({"a": "x"}, REFS)
