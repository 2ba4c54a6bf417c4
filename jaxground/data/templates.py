"""Task prompt templates: several phrasings per task, one picked per sample from a seeded generator.

`build_turns(example, task, item, rng)` turns one task item (see `records.Example`) into conversation turns
`[(role, text, groups)]`: `text` holds one `<loc>` per entry of `groups`, each a list of object indices whose
boxes the location format writes there. REC answers are `"Answer: <loc> ."`, the form the authors
teacher-force at evaluation (or the expression restated before its box, `rec_answer="expression"`).
"""

from __future__ import annotations

import numpy as np

from jaxground.data.records import Example

LOC = "<loc>"

QUESTIONS = {
    "rec": (
        "Where is <expr> in the image?",
        "Where is <expr>?",
        "Can you point out <expr> in the image?",
        "Locate <expr> in the image.",
        "Please find <expr> and give its location.",
        "Which object is <expr>? Show its box.",
    ),
    "reg": (
        "What is region <loc>?",
        "Describe region <loc> briefly.",
        "What object is in region <loc>?",
        "Give a short description of region <loc>.",
        "What can you see in <loc>?",
    ),
    "gcap": (
        "Describe the image, with the location of each object.",
        "What is in the image? Give the box of each object you name.",
        "Briefly describe the image and locate the objects you mention.",
        "Write a grounded caption of the image.",
    ),
    "pope": (
        "Is there a <obj> in the image?",
        "Is there a <obj> in the image? Answer yes or no.",
        "Does the image contain a <obj>?",
        "Can you see a <obj> in this image?",
    ),
    "count": (
        "How many <noun> are there?",
        "How many <noun> are in the image?",
        "Count the <noun> in the image.",
        "What is the number of <noun> here?",
    ),
    "v7w": (
        "<question> Candidates: <cands>.",
        "<question> Choose one of <cands>.",
        "<question> Pick the right region among <cands>.",
    ),
    "vqa": ("<question>",),
}
_YES = {"yes": ("Yes.", "Yes, there is."), "no": ("No.", "No, there is not.")}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Turn = tuple  # (role "user" | "assistant", text with <loc> markers, groups: list[list[int]])


def _pick(options, rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def available_tasks(example: Example) -> list[str]:
    """Tasks this example can serve (`reg` comes with `rec`)."""
    tasks = [t for t, items in example.tasks.items() if items]
    return tasks + (["reg"] if "rec" in tasks else [])


REC_ANSWERS = ("released", "expression")


def build_turns(example: Example, task: str, item: dict, rng: np.random.Generator,
                rec_answer: str = "released") -> list[Turn]:
    """`rec_answer`: "released" answers REC with `Answer: <loc> .`; "expression" restates the expression before
    its box (`The red circle <loc> .`), the phrase-then-box form of grounded captions."""
    q = _pick(QUESTIONS.get(task, ("",)), rng)
    if task == "rec":
        if rec_answer not in REC_ANSWERS:
            raise ValueError(f"rec_answer {rec_answer!r} is not one of {REC_ANSWERS}")
        expr = item["expr"]
        answer = f"Answer: {LOC} ." if rec_answer == "released" else f"{expr[0].upper()}{expr[1:]} {LOC} ."
        return [("user", q.replace("<expr>", expr), []), ("assistant", answer, [[item["obj"]]])]
    if task == "reg":
        expr = item["expr"].removeprefix("the ")
        return [("user", q, [[item["obj"]]]), ("assistant", f"{expr[0].upper()}{expr[1:]}.", [])]
    if task == "gcap":
        return [("user", q, []), ("assistant", item["caption"], [list(g) for g in item["groups"]])]
    if task == "pope":
        q = item.get("question") or q.replace("<obj>", item["object"])  # real POPE keeps its own wording
        return [("user", q, []), ("assistant", _pick(_YES[item["answer"]], rng), [])]
    if task == "count":
        objs = list(item["objs"])
        word = _NUMBERS[len(objs)] if len(objs) < len(_NUMBERS) else str(len(objs))
        answer = f"{word.capitalize()}." if not objs else f"{word.capitalize()}: {LOC} ."
        return [("user", q.replace("<noun>", item["noun"]), []), ("assistant", answer, [objs] if objs else [])]
    if task == "v7w":  # candidates in a per-sample order, as the official V7W_POINT shuffles them
        answer = item["candidates"][item["answer"]]
        cands = [item["candidates"][int(i)] for i in rng.permutation(len(item["candidates"]))]
        text = q.replace("<question>", item["question"]).replace("<cands>", " ".join([LOC] * len(cands)))
        return [("user", text, [[c] for c in cands]), ("assistant", f"Answer: {LOC} .", [[answer]])]
    if task == "vqa":
        return [("user", item["question"], []), ("assistant", item["answer"], [])]
    if task == "conv":
        return [(role, text.replace("<image>", "").strip(), []) for role, text in item["turns"]]
    raise ValueError(f"unknown task {task!r}")


def all_template_texts() -> list[str]:
    """Every fixed phrase (for training a tokenizer on the synthetic corpus)."""
    out = [q for qs in QUESTIONS.values() for q in qs]
    out += [a for answers in _YES.values() for a in answers] + list(_NUMBERS) + ["Answer: ."]
    out += [f"{n.capitalize()}:" for n in _NUMBERS]  # counting answers open with the capitalised number
    return out
