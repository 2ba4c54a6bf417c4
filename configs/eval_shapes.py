"""The synthetic shapes' test split for the embedded default's stage-3 model (`bash launch/local.sh` trains it):
REC teacher-forced and generated, RES (mask head), POPE, region captions; the shapes' counting questions too
with `--tasks rec,rec_gen,res,pope,reg,count`.

    jaxground eval --config configs/eval_shapes.py --checkpoint runs/tiny_shapes/stage3 paths.shapes=data/shapes
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("_eval", Path(__file__).with_name("_eval.py"))
_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eval)


def get_config() -> ConfigDict:
    c = _eval.load("tiny_shapes_stage3")
    c.paths = ConfigDict({"shapes": "data/shapes"})
    c.data.datasets.shapes.path = c.paths.get_ref("shapes")
    c.data.max_boxes = 4  # training holds one box per sample (REC); questions of other tasks carry more
    datasets = {"shapes_test": {"kind": "shapes", "path": c.paths.get_ref("shapes"), "split": "test",
                                "image_root": "", "weight": 1.0}}
    c.eval = _eval.eval_section(datasets, ("rec", "rec_gen", "res", "pope", "reg"), batch_size=64,
                                max_new_tokens=24)
    return c
