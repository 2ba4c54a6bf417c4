"""The embedded default, stage 3: from the stage-1 model (`--init-from runs/tiny_shapes/stage1`), a tiny SAM
gets a mask head, trained on the masks of the synthetic shapes. The paper freezes SAM's pretrained image
encoder; nothing is pretrained here, so the tiny SAM's image encoder trains too (`model.freeze_sam=False`)
beside `seg_prompt_mlp` and the mask decoder; the LLM, CLIP and box heads stay frozen. Evaluation adds mask
cIoU to REC."""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

from jaxground.train import defaults

_spec = importlib.util.spec_from_file_location("_tiny", Path(__file__).with_name("tiny_shapes.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config() -> ConfigDict:
    c = _tiny.get_config()
    # prompt_dim 128 (the mask decoder's width; its upscaled per-pixel features get prompt_dim / 8 = 16 channels):
    # cIoU 0.698 against 0.676 at 64 and 0.646 at 32 from the same stage-1 model; 256 ran ~5x slower (docs/embedded_default_runs.md)
    c.model.sam = dict(img_size=64, patch_size=8, width=64, depth=2, num_heads=2, window_size=4,
                       global_attn_indexes=(1,), prompt_dim=128, mask_in_chans=4, decoder_depth=2, decoder_heads=2,
                       decoder_mlp_dim=256, iou_head_hidden_dim=64)
    c.loss.w_patch = 0.0  # the patch aid trains the LLM, which stage 3 keeps frozen
    c.loss.w_attr = 0.0  # and the attribute aid the frozen CLIP
    c.loss.seg = "lisa"  # BCE + dice as LISA: cIoU 0.625 against 0.587 with focal + dice + IoU MSE (docs/embedded_default_runs.md)
    c.data.with_masks = True
    c.data.mask_size = 32
    c.data.with_sam = True
    c.data.sam_size = 64
    c.optim = defaults.optim(2e-3, warmup_ratio=0.03)
    c.train = defaults.train(3, steps=900, batch_size=32, log_every=50, eval_every=0, save_every=900, keep=1)
    c.model.freeze_sam = False
    c.train.trainable = ("^mask_head/(seg_prompt_mlp|mask_decoder)/", "^sam/")
    c.train.fresh = ("mask_head", "sam")  # stage 1 has no SAM: both start from a fresh initialisation
    return c
