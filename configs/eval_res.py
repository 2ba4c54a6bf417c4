"""RES on RefCOCO / RefCOCO+ / RefCOCOg with the 7B model and its SAM mask head: cIoU and gIoU of the mask at the
teacher-forced "<at> <boxes>" answer (`res`: ours, cheaper and deterministic), of the mask at the first trigger
of a greedy answer (`res_gen`), plus the box of the teacher-forced pass (`rec`).

    jaxground eval --config configs/eval_res.py --checkpoint CONVERTED_OR_WORKDIR \
        paths.refcoco=/data/refcoco paths.refcoco_plus=/data/refcoco+ paths.refcocog=/data/refcocog \
        paths.coco_images=/data/coco/train2014

The authors' protocol is `res_gen` with `eval.trigger_state=predicting` (the released generate() reads each
trigger from the state that chose `<at>`), 20 new tokens (set here), and its `ciou_released` figure (a sample
without exactly one trigger scores an empty mask). Masks are scored at original image pixels as the released
evaluation scores them (`eval.res_pixels = "original"`, `jaxground.eval.res_pixels`): SAM's logits upsampled to
1024, bilinear to the image's long side, `> 0`, the centred padding cut, against the refs' COCO polygons
rasterised at the image size (summed per polygon, as there). `eval.res_pixels=grid` scores on the padded square's
grid at `data.mask_size` = 256 (SAM's own logit grid for 1024 inputs) inside the image instead: no host work,
coarser for images larger than 256 px.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("_eval", Path(__file__).with_name("_eval.py"))
_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eval)


def get_config() -> ConfigDict:
    c = _eval.load("nextchat_7b_stage3")
    datasets = _eval.refcoco_datasets(c)
    c.eval = _eval.eval_section(datasets, ("res", "res_gen", "rec"), batch_size=16, max_new_tokens=20,
                                res_pixels="original")
    c.data.mask_size = 256
    return c
