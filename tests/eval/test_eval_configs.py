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
