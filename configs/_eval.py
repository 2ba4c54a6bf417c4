"""Shared body of the evaluation configs (`eval_*.py`): a run config whose `eval` section lists the splits
(name -> dataset entry) and the tasks of `jaxground eval` (see `jaxground.eval.evaluate`)."""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict


def load(name: str) -> ConfigDict:
    """The `get_config()` of a sibling config file (e.g. "nextchat_7b_stage2")."""
    spec = importlib.util.spec_from_file_location(f"_eval_base_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def eval_section(datasets: dict, tasks: tuple, batch_size: int, *, max_new_tokens: int = 32,
                 trigger_state: str = "at", pope_parser: str = "nextchat", meteor: bool = True,
                 res_pixels: str = "grid") -> ConfigDict:
    return ConfigDict({"datasets": datasets, "tasks": tasks, "batch_size": batch_size,
                       "max_new_tokens": max_new_tokens, "trigger_state": trigger_state,
                       "pope_parser": pope_parser, "meteor": meteor, "res_pixels": res_pixels})


REFCOCO_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco_plus": ("val", "testA", "testB"),
                  "refcocog": ("val", "test")}


def refcoco_datasets(c: ConfigDict) -> dict:
    """Adds `c.paths` (local RefCOCO/+/g and COCO image folders) and returns one dataset entry per split; the
    entries reference `c.paths`, so a `paths.*=...` override reaches every split that uses it."""
    c.paths = ConfigDict({"refcoco": "data/refcoco", "refcoco_plus": "data/refcoco+", "refcocog": "data/refcocog",
                          "coco_images": "data/coco/train2014"})
    return {f"{name}_{split}": {"kind": "refcoco", "path": c.paths.get_ref(name), "split": split,
                                "image_root": c.paths.get_ref("coco_images"), "weight": 1.0}
            for name, splits in REFCOCO_SPLITS.items() for split in splits}
