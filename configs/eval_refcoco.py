"""REC on RefCOCO / RefCOCO+ / RefCOCOg (val, testA, testB; RefCOCOg val and test, umd) with the 7B model,
teacher-forced as the authors evaluate it (`rec`); `--tasks rec,rec_gen` adds free generation.

    jaxground eval --config configs/eval_refcoco.py --checkpoint CONVERTED_OR_WORKDIR \
        paths.refcoco=/data/refcoco paths.refcoco_plus=/data/refcoco+ paths.refcocog=/data/refcocog \
        paths.coco_images=/data/coco/train2014

Each of `paths.refcoco*` points at a local directory in the `refer` layout (refs(*).p + instances.json), every
split of all three is evaluated; `--splits refcoco_val,refcocog_test` evaluates only those (names as
`{refcoco,refcoco_plus,refcocog}_{split}`).
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("_eval", Path(__file__).with_name("_eval.py"))
_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eval)


def get_config() -> ConfigDict:
    c = _eval.load("nextchat_7b_stage2")
    datasets = _eval.refcoco_datasets(c)
    c.eval = _eval.eval_section(datasets, ("rec",), batch_size=64)
    return c
