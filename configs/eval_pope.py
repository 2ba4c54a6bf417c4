"""POPE (object hallucination) with the 7B model: the random, popular and adversarial question files, greedy
generation, answers parsed by the authors' rule (`eval.pope_parser="pope"` for the official one).

    jaxground eval --config configs/eval_pope.py --checkpoint CONVERTED_OR_WORKDIR \
        paths.pope=/data/pope paths.coco_images=/data/coco/val2014

`paths.pope` holds `coco_pope_{random,popular,adversarial}.json` (one JSON object a line).
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("_eval", Path(__file__).with_name("_eval.py"))
_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eval)


def get_config() -> ConfigDict:
    c = _eval.load("nextchat_7b_stage2")
    c.paths = ConfigDict({"pope": "data/pope", "coco_images": "data/coco/val2014"})
    files = {s: c.paths.get_ref("pope") + f"/coco_pope_{s}.json" for s in ("random", "popular", "adversarial")}
    datasets = {f"pope_{s}": {"kind": "pope", "path": f, "split": "test", "image_root": c.paths.get_ref("coco_images"),
                              "weight": 1.0} for s, f in files.items()}
    c.eval = _eval.eval_section(datasets, ("pope",), batch_size=32, max_new_tokens=16)
    return c
