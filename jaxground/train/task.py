"""NExT-Chat as a training `Task`: the model from `config.model`, the loss of the stage, the Grain pipelines of
`config.data` (training mixture) and `config.eval` (held-out split), and teacher-forced REC evaluation.

Evaluation as the authors do it: each held-out sample is a REC question answered `<at> <boxes>`; one forward
pass with the answer given (teacher forcing) puts the predicted box F(t) at the trigger; Acc@0.5 and mean IoU
against `target_boxes`.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from flax import nnx

from jaxground.data.batch import Batch
from jaxground.eval.metrics import rec_summary, rec_sums
from jaxground.eval.steps import scored_masks
from jaxground.models.clip import ClipVisionConfig
from jaxground.models.llama import LlamaConfig
from jaxground.models.nextchat import NextChat, NextChatConfig, nextchat_loss
from jaxground.models.sam.config import SamConfig
from jaxground.ops.losses import DET_PRESETS, count_supervised
from jaxground.ops.mask_metrics import res_scores, res_sums
from jaxground.train.loop import Task
from jaxground.train.state import DECAYS


class TaskConfigError(ValueError):
    """A model, loss or data section that cannot be built."""


def _fields(cls, section: ml_collections.ConfigDict, what: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section.keys()) - known)
    if unknown:
        raise TaskConfigError(f"{what}: unknown keys {unknown} (known: {sorted(known)})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.to_dict().items()}


def model_config(config, tokens) -> NextChatConfig:
    """`config.model` -> NextChatConfig; `llm.vocab_size` -1 takes the tokenizer's size."""
    llm = _fields(LlamaConfig, config.model.llm, "model.llm")
    if llm.get("vocab_size", -1) == -1:
        llm["vocab_size"] = max(dataclasses.asdict(tokens).values()) + 1
    return NextChatConfig(
        llm=LlamaConfig(**llm),
        vision=ClipVisionConfig(**_fields(ClipVisionConfig, config.model.vision, "model.vision")),
        projector=config.model.projector,
        freeze_vision=config.model.freeze_vision,
        box_prior=config.model.box_prior,
        locator_init_std=config.model.get("locator_init_std", 0.02),
        tokens=tokens,
        sam=SamConfig(**_fields(SamConfig, config.model.sam, "model.sam")) if config.model.get("sam") else None,
        freeze_sam=config.model.get("freeze_sam", True),
        patch_head=config.model.get("patch_head", False),
        attr_classes=config.model.get("attr_classes", 0),
    )


def data_config(config, *, training: bool) -> ml_collections.ConfigDict:
    """The pipeline section for this process: the per-host batch is `train.batch_size / process_count`;
    evaluation reads `eval.datasets` with only the REC task (images with at most `eval.max_objects` objects
    when set)."""
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    hosts = jax.process_count()
    if training:
        cfg.batch_size = config.train.batch_size // hosts
        if config.loss.get("w_patch", 0.0) and config.model.get("patch_head"):  # the patch aid's targets
            cfg.patch_targets = config.model.vision.patch_size
        if config.loss.get("w_attr", 0.0) and config.model.get("attr_classes"):  # the attribute aid's labels
            cfg.patch_attributes = config.model.vision.patch_size
    else:
        cfg.datasets = config.eval.datasets.to_dict()
        cfg.task_weights = {"rec": 1.0}
        cfg.turns = 1  # each expression scored alone, as in the released evaluation
        cfg.max_objects = config.eval.get("max_objects", 0)  # e.g. 1: only the single-object test scenes
        cfg.batch_size = config.eval.batch_size // hosts
    return cfg


def rec_eval(model: NextChat, batch: dict) -> dict:
    """REC sums; with masks in the model and the batch, also RES sums (cIoU) of the masks at the triggers."""
    b = Batch(**batch)
    out = model(b)
    valid = b.target_mask & b.valid[:, None]  # a target whose trigger is missing scores IoU 0
    sums = rec_sums(out.pred_boxes.reshape(-1, 4), b.target_boxes.reshape(-1, 4), valid.reshape(-1))
    if out.mask_logits is not None and b.masks is not None:
        res = res_sums(*scored_masks(out.mask_logits, b.masks, b.mask_region), b.mask_valid & valid)
        sums |= {f"mask_{k}": v for k, v in res.items()}
    return sums


def summarize(sums: dict) -> dict:
    figures = rec_summary(sums)
    if "mask_union" in sums:
        res = res_scores({k.removeprefix("mask_"): v for k, v in sums.items() if k.startswith("mask_")})
        figures |= {"ciou": res["ciou"], "mask_giou": res["giou"]}
    return figures


def check_stage(train: ml_collections.ConfigDict) -> None:
    """`train.trainable`/`train.frozen` decide what trains; `defaults.train(stage)` fills them from the stage.
    Raises when they are another stage's patterns (`train.stage` overridden alone), which would train the
    wrong set in a config file (a command-line override alone is refused at load, `config.apply_overrides`); a
    config's own patterns (e.g. tiny stage 3 adding `^sam/`) stay its choice."""
    from jaxground.train.defaults import STAGE_TRAINABLE, stage_patterns_hint

    if train.stage not in STAGE_TRAINABLE:
        raise TaskConfigError(f"train.stage must be 1, 2 or 3, got {train.stage}")
    configured = (tuple(train.trainable), tuple(train.frozen))
    if configured == STAGE_TRAINABLE[train.stage]:
        return
    other = next((s for s, patterns in STAGE_TRAINABLE.items() if patterns == configured), None)
    if other is not None:
        raise TaskConfigError(
            f"train.stage={train.stage} but train.trainable/train.frozen are stage {other}'s {configured}: the "
            f"patterns decide what trains; use a stage-{train.stage} config or also set "
            f"{stage_patterns_hint(train.stage)}")


# (key, what a valid value is, the test) for the numbers of `train` and `optim`; NaN fails every test
RANGES = (
    ("train.steps", ">= 0", lambda v: v >= 0),
    ("train.micro_steps", ">= 1", lambda v: v >= 1),
    ("train.log_every", ">= 1", lambda v: v >= 1),
    ("train.eval_every", ">= 0 (0 = only at the end)", lambda v: v >= 0),
    ("train.save_every", ">= 0 (0 = only at the end and on a stop)", lambda v: v >= 0),
    ("train.keep", ">= 1", lambda v: v >= 1),
    ("optim.lr", ">= 0", lambda v: v >= 0),
    ("optim.warmup_ratio", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("optim.min_lr_ratio", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("optim.b1", "in [0, 1)", lambda v: 0 <= v < 1),
    ("optim.b2", "in [0, 1)", lambda v: 0 <= v < 1),
    ("optim.eps", "> 0", lambda v: v > 0),
    ("optim.weight_decay", ">= 0", lambda v: v >= 0),
    ("optim.clip_norm", ">= 0 (0 = no clipping)", lambda v: v >= 0),
    ("optim.decay", '"hf" or "all"', lambda v: v in DECAYS),
    ("eval.batch_size", ">= 1", lambda v: v >= 1),
    ("data.seed", ">= 0", lambda v: v >= 0),
    ("data.mask_size", ">= 1", lambda v: v >= 1),
)


def check_ranges(config) -> None:
    """Refuses a training or optimizer number outside its range before any training: a negative learning rate
    used to train until the loss overflowed, `train.log_every=0` to divide by zero at the first step, and a
    negative `train.steps` to end at once as if done."""
    for key, valid, ok in RANGES:
        section, name = key.split(".")
        if section not in config or name not in config[section]:  # e.g. optim.decay: its default
            continue
        value = config[section][name]
        if not ok(value):
            raise TaskConfigError(f"{key} must be {valid}, got {value!r}")


def check_model_fits_data(config, cfg: NextChatConfig) -> None:
    """Refuses a projector kind or mask-loss preset that does not exist, and image settings the vision tower does
    not produce, before any training: the first two failed in the model's construction or the step's tracing, and
    `data.num_image_tokens` other than the tower's patch count trained silently (patches dropped, or `<im_patch>`
    slots left as token embeddings)."""
    from jaxground.models.projector import KINDS
    from jaxground.ops.mask_losses import NAMES

    if cfg.projector not in KINDS:
        raise TaskConfigError(f"model.projector must be one of {KINDS}, got {cfg.projector!r}")
    if cfg.sam is not None and config.loss.get("seg") not in NAMES:
        raise TaskConfigError(f"loss.seg must be one of {NAMES}, got {config.loss.get('seg')!r}")
    vision, data = cfg.vision, config.data
    if (data.image_size, data.num_image_tokens) != (vision.image_size, vision.num_patches):
        raise TaskConfigError(f"data.image_size {data.image_size} and data.num_image_tokens {data.num_image_tokens} "
                              f"must be the vision tower's image size {vision.image_size} and patch count "
                              f"{vision.num_patches} ((image_size / patch_size)^2)")


def make_task(config) -> Task:
    from jaxground.data.pipeline import make_pipeline, open_readers, tokenizer_path
    from jaxground.data.tokenizer import vocabulary_id

    check_stage(config.train)
    check_ranges(config)
    stage = config.train.stage
    if stage == 3 and not (config.model.get("sam") and config.data.with_masks and config.data.with_sam):
        raise TaskConfigError("stage 3 needs model.sam, data.with_masks=True and data.with_sam=True")
    if config.loss.det not in DET_PRESETS:
        raise TaskConfigError(f"loss.det {config.loss.det!r} is not one of {sorted(DET_PRESETS)}")
    w_l1, w_giou = DET_PRESETS[config.loss.det]
    w_patch = config.loss.get("w_patch", 0.0)
    if w_patch and not config.model.get("patch_head"):
        raise TaskConfigError(f"loss.w_patch={w_patch} needs model.patch_head=True")
    w_attr = config.loss.get("w_attr", 0.0)
    if w_attr and not config.model.get("attr_classes"):
        raise TaskConfigError(f"loss.w_attr={w_attr} needs model.attr_classes > 0")
    w_cycle = config.loss.w_cycle
    train_data, eval_data = data_config(config, training=True), data_config(config, training=False)
    train_readers = open_readers(train_data, training=True)  # its errors first: the eval split is often alike
    try:  # the run ends with an evaluation: refuse its split now, not after the training
        eval_encoder = open_readers(eval_data, training=False)[0]
    except (ValueError, FileNotFoundError) as e:
        raise TaskConfigError(f"the evaluation split (eval.datasets): {e}") from None
    encoder, tokens = train_readers[0], train_readers[0].ids
    vocabulary = vocabulary_id(encoder.tok)
    if (eval_vocabulary := vocabulary_id(eval_encoder.tok)) != vocabulary:
        raise TaskConfigError(f"the evaluation split's tokenizer {tokenizer_path(eval_data)} (vocabulary "
                              f"{eval_vocabulary}) is not the training data's {tokenizer_path(train_data)} "
                              f"(vocabulary {vocabulary}): set data.tokenizer to the one the model trains with")
    cfg = model_config(config, tokens)
    check_model_fits_data(config, cfg)
    seed = config.train.seed

    label_tokens = config.train.get("label_tokens", 0)
    if label_tokens < 0:
        raise TaskConfigError(f"train.label_tokens must be >= 0 (0 = the LM head at every position), got {label_tokens}")

    def check_rows(rows: dict) -> None:
        most = count_supervised(rows["labels"])
        if most > label_tokens:
            raise TaskConfigError(f"a training row has {most} supervised tokens, more than train.label_tokens="
                                  f"{label_tokens}: raise it (or set 0 to run the LM head at every position)")

    def loss_fn(model: NextChat, batch: dict):
        b = Batch(**batch)
        total, parts = nextchat_loss(model(b, label_tokens), b, w_l1=w_l1, w_giou=w_giou, w_cycle=w_cycle,
                                     seg_preset=config.loss.seg, w_patch=w_patch, w_attr=w_attr)
        shown = {"ce": parts["ce"], "l1": parts["l1"], "giou": parts["giou"], "cycle": parts["cyc"]}
        return total, shown | {k: parts[k] for k in ("seg", "patch", "attr") if k in parts}

    return Task(
        model_factory=lambda: NextChat(cfg, rngs=nnx.Rngs(seed)),
        loss_fn=loss_fn,
        train_batches=make_pipeline(train_data, training=True, readers=train_readers),
        eval_fn=rec_eval,
        eval_batches=lambda: make_pipeline(eval_data, training=False),
        summarize=summarize,
        check_rows=check_rows if label_tokens else None,
        tokenizer=(vocabulary, tokenizer_path(train_data)),
    )


