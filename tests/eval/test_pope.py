"""POPE parsing (the NExT-Chat authors' rule and the official POPE rule) and metrics by hand."""

import pytest

from jaxground.eval.pope import extract_nextchat, parse_nextchat, parse_pope, pope_metrics


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is yes .", "yes"),
        ("The answer is no .", "no"),
        ("So the answer is no.", "no"),
        ("USER: is there a cat? ASSISTANT: The Answer Is No .", "no"),  # lower-cased after ASSISTANT:
        ("Answer: no", "no"),
        ("Yes, there is a dog.", "no"),  # no phrase, and "yes" is case-sensitive here
        ("yes there is", "yes"),
        # `.+` is greedy, so a second phrase ends up inside the first answer (and then counts as yes)
        ("The answer is no . The answer is yes .", "no . The answer is yes"),
        ("There is no such object.", "no"),
    ],
)
def test_extract_nextchat(text, answer):
    assert extract_nextchat(text) == answer


def test_nextchat_anything_but_no_is_yes():
    assert parse_nextchat("The answer is a cat .") is True
    assert parse_nextchat("The answer is no .") is False


@pytest.mark.parametrize(
    "text, yes",
    [
        ("Yes, there is a cat in the image.", True),
        ("No, there is no cat.", False),
        ("There is not a cat.", False),
        ("Yes. No cat is there.", True),  # only the first sentence counts
        ("Nothing here", True),  # "Nothing" is not "no"
        ("no", False),
    ],
)
def test_parse_pope(text, yes):
    assert parse_pope(text) is yes


def test_pope_metrics_hand_values():
    pred = [True, True, False, False, True, False]
    label = [True, False, False, True, True, False]
    # TP 2, FP 1, TN 2, FN 1
    out = pope_metrics(pred, label)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(0.5)
    assert out["count"] == 6


def test_pope_metrics_never_divide_by_zero():
    out = pope_metrics([False, False], [False, False])
    assert out["accuracy"] == 1.0 and out["precision"] == 0.0 and out["f1"] == 0.0 and out["yes_ratio"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics([True], [])
