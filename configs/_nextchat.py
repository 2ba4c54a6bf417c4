"""Shared body of the paper-scale configs (`nextchat_{7b,13b}_stage*.py`): LLaMA/Vicuna + CLIP ViT-L/14-336
+ SAM ViT-H, the paper's optimisation (AdamW, cosine, 3% warmup; batch 128 / lr 2e-5 in stage 1, 64 / 2e-6
in stage 2), FSDP over every device, bfloat16 compute on float32 master weights, scanned + remat layers."""

from ml_collections import ConfigDict

from jaxground.data.pipeline import pipeline_config
from jaxground.train import defaults

STAGES = {  # stage -> (global batch, lr, steps)
    1: (128, 2e-5, 30000),
    2: (64, 2e-6, 10000),
    3: (64, 2e-5, 5000),
}


def config(size: str, stage: int) -> ConfigDict:
    batch, lr, steps = STAGES[stage]
    c = ConfigDict()
    c.mesh = defaults.mesh(data=1, fsdp=-1, tensor=1)
    c.model = ConfigDict(dict(
        llm=defaults.llama(size).to_dict(),
        vision=defaults.clip_vit_l14_336().to_dict(),
        projector="mlp2x_gelu",
        freeze_vision=True,
        box_prior=False,
        sam=defaults.sam_vit_h().to_dict() if stage == 3 else None,
    ))
    if stage == 3:
        datasets = {"refcoco": defaults.dataset("refcoco", f"{defaults.DATA_ROOT}/refcoco", "train", 1.0,
                                                defaults.COCO_IMAGES)}
    else:
        datasets = defaults.grounding_mixture(with_llava=stage == 2)
    c.data = pipeline_config(
        datasets=datasets,
        tokenizer=f"{defaults.DATA_ROOT}/vicuna-7b-v1.5",
        system_prompt="A chat between a curious user and an artificial intelligence assistant. The assistant "
                      "gives helpful, detailed, and polite answers to the user's questions.",
        image_size=336,
        pad_fill="white",  # NExT-Chat's Expand2square default, which its configs and released weights use
        num_image_tokens=576,
        max_len=1024,
        max_boxes=8,
        with_masks=stage == 3,
        with_sam=stage == 3,
        workers=8,
    )
    c.eval = ConfigDict(dict(
        datasets={"refcoco_val": defaults.dataset("refcoco", f"{defaults.DATA_ROOT}/refcoco", "val", 1.0,
                                                  defaults.COCO_IMAGES)},
        batch_size=batch,
    ))
    c.loss = defaults.loss(det="released")
    c.optim = defaults.optim(lr, warmup_ratio=0.03, weight_decay=0.0, clip_norm=1.0)
    c.train = defaults.train(stage, steps=steps, batch_size=batch, log_every=10, eval_every=2000,
                             save_every=1000, keep=3)
    if stage == 3:  # SAM's weights must come with --init-from (a converted checkpoint); only this MLP is new
        c.train.fresh = ("mask_head/seg_prompt_mlp",)
    return c
