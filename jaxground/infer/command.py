"""`jaxground predict --config CFG --checkpoint DIR --image IMG --prompt TEXT [--box x0,y0,x1,y1 ...]
[--out PNG] [--json] [key=value ...]`

Answers a prompt about one image. Input boxes (pixels) are referred to in the prompt as `[0]`, `[1]`, ...;
the answer's objects are printed as `[k]` with their pixel boxes and drawn into `--out`; a model with a mask
head (`model.sam`) also draws each object's mask (translucent) and `--json` gives its area and COCO RLE.
`--checkpoint` is a training checkpoint or a `jaxground convert` output. Exit status 2 for
bad input (image, boxes, prompt, checkpoint), reported before any model compute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="the run's configs/*.py (model and tokenizer)")
    parser.add_argument("--checkpoint", required=True, help="a run's workdir, checkpoint dir or step dir")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True, help="question; refer to --box i as [i]")
    parser.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 in pixels (repeatable)")
    parser.add_argument("--out", default=None, help="PNG with the answer's boxes (and masks) drawn")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def load_image(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from jaxground.infer.predict import PredictError

    p = Path(path)
    if not p.is_file():
        raise PredictError(f"image not found: {path}")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise PredictError(f"cannot decode image {path}: {e}") from None


def load_model(config, checkpoint: str):
    """(NextChat with the checkpoint's weights, ConversationEncoder) from a run config and either a training
    checkpoint (the model comes from `config.model`) or a `jaxground convert` output (the model comes from its
    saved config; its token ids must be the tokenizer's)."""
    import dataclasses

    import jax
    from flax import nnx

    from jaxground import checkpoint as ckpt
    from jaxground.convert.store import CONFIG_FILE, load_converted
    from jaxground.data.pipeline import make_encoder
    from jaxground.models.nextchat import NextChat
    from jaxground.train.task import data_config, model_config

    encoder, tokens = make_encoder(data_config(config, training=True))
    if (Path(checkpoint) / CONFIG_FILE).is_file():
        model, cfg = load_converted(checkpoint)
        if not isinstance(model, NextChat):
            raise ValueError(f"{checkpoint} holds a converted {type(model).__name__}, not a NextChat")
        if cfg.tokens != tokens:
            raise ValueError(f"the converted model's token ids {dataclasses.asdict(cfg.tokens)} differ from the "
                             f"tokenizer's {dataclasses.asdict(tokens)}")
        if (cfg.vision.image_size, cfg.vision.num_patches) != (config.data.image_size, config.data.num_image_tokens):
            raise ValueError(f"the converted model's image size {cfg.vision.image_size} and {cfg.vision.num_patches} "
                             f"patches differ from data.image_size {config.data.image_size} and "
                             f"data.num_image_tokens {config.data.num_image_tokens}")
        return model, encoder
    cfg = model_config(config, tokens)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NextChat(cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ckpt.load_model(checkpoint, abstract, jax.tree.map(lambda _: device, abstract))
    return nnx.merge(graphdef, state), encoder


def run(args) -> int:
    from jaxground.infer.predict import PredictError

    try:
        return _run(args)
    except PredictError as e:
        print(f"jaxground predict: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from jaxground.config import ConfigError, load_config
    from jaxground.infer.generate import GenerationConfig
    from jaxground.infer.predict import REF, PredictError, mask_function, parse_box, predict

    image = load_image(args.image)
    h, w = image.shape[:2]
    boxes = [parse_box(b, h, w) for b in args.box]
    refs = [int(m) for m in REF.findall(args.prompt)]
    if any(r >= len(boxes) for r in refs):
        raise PredictError(f"prompt refers to [{max(refs)}] but only {len(boxes)} --box given")
    if not args.prompt.strip():
        raise PredictError("empty --prompt")
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise PredictError("--max-new-tokens and --num-beams must be >= 1")
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise PredictError(f"--out {args.out}: expected a .png path")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise PredictError(str(e)) from None
    try:
        model, encoder = load_model(config, args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(f"cannot load {args.checkpoint}: {e}") from None
    ids = encoder.ids
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, method="beam" if args.num_beams > 1 else "greedy",
                           num_beams=args.num_beams, eos_id=ids.eos, pad_id=ids.pad, at_id=ids.at, boxes_id=ids.boxes)
    mask_fn = mask_function(model, image) if model.cfg.sam is not None else None
    try:
        pred = predict(model, encoder, image, args.prompt, boxes, cfg, mask_fn=mask_fn)
    except ValueError as e:  # prompt longer than the context, unencodable prompt
        raise PredictError(str(e)) from None

    if args.out:
        from jaxground.infer.draw import draw

        labels = [f"[{pred.first_ref + i}]" for i in range(len(pred.boxes))]
        draw(image, pred.boxes, labels, pred.masks).save(args.out)
    if args.json:
        print(json.dumps(pred.to_json()))
    else:
        print(pred.text)
        for i, b in enumerate(pred.boxes):
            print(f"[{pred.first_ref + i}] " + " ".join(f"{v:.1f}" for v in b))
    return 0
