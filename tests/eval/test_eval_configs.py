"""The README's list of each `configs/eval_*.py`'s own tasks is what the config runs."""

import re
from pathlib import Path

import pytest

from jaxground.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["eval_shapes", "eval_refcoco", "eval_res", "eval_pope"])
def test_readme_names_each_eval_configs_tasks(name):
    readme = " ".join((ROOT / "README.md").read_text().split())
    documented = re.search(rf"`{name}\.py` `([a-z_,]+)`", readme)
    assert documented, f"the README does not list the tasks of {name}.py"
    tasks = load_config(str(ROOT / "configs" / f"{name}.py"), []).eval.tasks
    assert ",".join(tasks) == documented.group(1)


def test_splits_keeps_the_named_ones_with_their_overridden_paths():
    from jaxground.eval.evaluate import EvalConfigError, select_splits

    config = load_config(str(ROOT / "configs" / "eval_refcoco.py"), ["paths.refcocog=/data/g"])
    assert len(config.eval.datasets) == 8
    select_splits(config, "refcocog_test, refcoco_val")
    assert sorted(config.eval.datasets) == ["refcoco_val", "refcocog_test"]
    assert config.eval.datasets.refcocog_test.path == "/data/g" and config.eval.datasets.refcocog_test.split == "test"
    for names, problem in (("refcoco_val,nope", "no split named nope"), ("", "name each split once, comma-separated"),
                           ("refcoco_val,refcoco_val", "name each split once, comma-separated")):
        config = load_config(str(ROOT / "configs" / "eval_refcoco.py"), [])
        with pytest.raises(EvalConfigError, match=f"{problem} \\(the config's splits: refcoco_plus_testA, "):
            select_splits(config, names)


def test_a_split_evaluated_under_splits_is_taken_by_a_full_resume(tmp_path):
    """`eval.json` gathers splits of separate `--splits` runs: a split saved under `--splits` is what a run of
    every split saves for it, so `--resume` without `--splits` takes it."""
    from jaxground.convert.store import CONFIG_FILE
    from jaxground.eval.evaluate import select_splits
    from jaxground.eval.saved import Store

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / CONFIG_FILE).write_text("{}")  # a converted checkpoint: identified by its path
    some = load_config(str(ROOT / "configs" / "eval_refcoco.py"), [])
    select_splits(some, "refcoco_val")
    Store(tmp_path / "out", some, str(tmp_path / "ckpt"), None).save("rec", "refcoco_val", {"acc@0.5": 0.5}, [])
    every = Store(tmp_path / "out", load_config(str(ROOT / "configs" / "eval_refcoco.py"), []), str(tmp_path / "ckpt"),
                  None)
    assert every.load([("rec", "refcoco_val"), ("rec", "refcoco_testA")]) == {("rec", "refcoco_val"): ({"acc@0.5": 0.5}, [])}
