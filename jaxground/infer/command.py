"""`jaxground predict --config CFG --checkpoint DIR --image IMG --prompt TEXT [--box x0,y0,x1,y1 ...]
[--out PNG] [--json] [--num-beams W [--beam-rules hf|released]] [--demo-beams] [--sample [--temperature T]
[--top-k K] [--top-p P] [--seed S]] [--demo-sampling] [key=value ...]`, or `... --list TSV` for many images with
one model load

Answers a prompt about one image (or each line's of `--list`: `image<TAB>prompt[<TAB>out.png[<TAB>boxes]]`,
boxes as `x0,y0,x1,y1` separated by spaces). Input boxes (pixels) are referred to in the prompt as `[0]`, `[1]`, ...;
the answer's objects are printed as `[k]` with their pixel boxes and drawn into `--out`; a model with a mask
head (`model.sam`) also draws each object's mask (translucent) and `--json` gives its area and COCO RLE.
`--checkpoint` is a training checkpoint or a `jaxground convert` output. The model is split over the mesh of the
run config's `mesh.data/fsdp/tensor` (e.g. `mesh.fsdp=4 mesh.tensor=2`; by default every device, as training);
each request runs alone (batch 1), its inputs on every device. Decoding is greedy unless `--num-beams` or
`--sample` asks otherwise (both: HF's sampled beam search, as transformers 4.31 runs it); `--beam-rules released`
runs beam search as transformers 4.31 does (the released demo's), `hf` (the default) as the installed HF 5.x does;
`--demo-beams` is the demo's `--num-beams 5 --beam-rules released`. Every request samples with the key of `--seed`,
so its answer does not depend on the others of a `--list`. Exit status 2 for bad input (image, boxes, prompt,
decoding flags, checkpoint, mesh), reported before any model compute.

Several hosts (SLURM, a TPU slice under JAXGROUND_MULTIHOST=1, or `--coordinator HOST:PORT --num-processes N
--process-id I`, as `jaxground eval`) run the same command: the mesh spans every host's devices, each host reads
its shards of the checkpoint and runs the same requests (each image and `--list` file must be readable on every
host, the same pixels, prompts and boxes everywhere, and `--checkpoint` the same step), and only process 0 prints and
writes the `--out` images. A refusal on any host is every host's, before the model loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

# The released NExT-Chat demo's sampling settings (its web UI's defaults and NextChatInference's; README, Prediction)
DEMO_SAMPLING = {"temperature": 0.8, "top_k": 5, "top_p": 0.7}
# Its beam search: HF generate (transformers 4.31) with num_beams=5 (README, Prediction)
DEMO_BEAMS = {"num_beams": 5, "beam_rules": "released"}
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="the run's configs/*.py (model and tokenizer)")
    parser.add_argument("--checkpoint", required=True, help="a run's workdir, checkpoint dir or step dir")
    parser.add_argument("--image", default=None)
    parser.add_argument("--prompt", default=None, help="question; refer to --box i as [i]")
    parser.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 in pixels (repeatable)")
    parser.add_argument("--out", default=None, help="PNG with the answer's boxes (and masks) drawn")
    parser.add_argument("--list", default=None, metavar="TSV", help="instead of --image/--prompt/--box/--out: one "
                        "request per line, image<TAB>prompt[<TAB>out.png[<TAB>boxes]] (boxes: x0,y0,x1,y1 ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (per request) instead of text")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams (default 1: "
                        "greedy); with --sample, HF's sampled beam search (transformers 4.31's beam_sample)")
    parser.add_argument("--beam-rules", default=None, help="with --num-beams > 1: 'hf', beam search as the installed "
                        "HF generate (5.x) runs it (default), or 'released', as transformers 4.31 runs it (the "
                        "released demo's; lengths count its placeholder input id, beams at the limit are ranked after "
                        "the last step); sampled beam search is always 'released'")
    parser.add_argument("--demo-beams", action="store_true", help="the released demo's beam search: --num-beams 5 "
                        "--beam-rules released (each flag given beside it wins); with --demo-sampling, the demo's "
                        "sampled beam search")
    parser.add_argument("--sample", action="store_true", help="sample each token instead of greedy decoding: "
                        "logits divided by --temperature, then --top-k, then --top-p, as HF generate applies them")
    parser.add_argument("--demo-sampling", action="store_true", help="--sample with the released demo's settings: "
                        "temperature 0.8, top-k 5, top-p 0.7 (each flag given beside it wins); add --num-beams 5 for "
                        "the demo's sampled beam search")
    parser.add_argument("--temperature", type=float, default=None, help="with --sample; default 1")
    parser.add_argument("--top-k", type=int, default=None, help="with --sample: keep the k most likely tokens (and "
                        "ties); default 0, off")
    parser.add_argument("--top-p", type=float, default=None, help="with --sample: keep the smallest set of most "
                        "likely tokens holding this probability; default 1, off")
    parser.add_argument("--seed", type=int, default=None, help="with --sample: the sampling key, 0 <= seed < 2**32; "
                        "default 0. The same seed gives the same answer")
    parser.add_argument("--max-triggers", type=int, default=8, help="most answer objects given a box (and mask); "
                        "an <at> beyond them is printed as [?]")
    parser.add_argument("--trigger-state", default="at", help="where each object's box and mask come from: 'at', "
                        "the state at <at> (as trained; default), or 'predicting', the state that chose <at> (as the "
                        "released demo reads it)")
    parser.add_argument("--mask-iou-threshold", type=float, default=None, help="blank masks whose predicted IoU "
                        "is below this (the released demo: 0.3; default: none is blanked)")
    from jaxground.distributed import add_arguments as distributed_arguments

    distributed_arguments(parser)  # several hosts, as `jaxground eval`
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def load_image(path: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    from jaxground.data.transforms import rgb_uint8
    from jaxground.infer.predict import PredictError

    p = Path(path)
    if p.is_dir():
        raise PredictError(f"image {path} is a folder, not an image file")
    if not p.is_file():
        raise PredictError(f"image not found: {path}")
    try:
        with Image.open(p) as im:
            # turned as its EXIF orientation says, so boxes and drawings are in the image as viewers show it
            return rgb_uint8(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise PredictError(f"cannot decode image {path}: {e}") from None


def load_encoder(config):
    """(ConversationEncoder, TokenIds) of the run config's tokenizer."""
    from jaxground.data.pipeline import make_encoder
    from jaxground.train.task import data_config

    return make_encoder(data_config(config, training=True))


def model_config_of(config, checkpoint: str, tokens):
    """The NextChatConfig `load_model` builds, read without loading weights: a `jaxground convert` output's saved one
    (checked against the tokenizer's `tokens` and the run config's image size: ValueError), else the run config's
    `model` (a training checkpoint)."""
    import dataclasses

    from jaxground.convert.store import CONFIG_FILE, read_config
    from jaxground.train.task import model_config

    if not (Path(checkpoint) / CONFIG_FILE).is_file():
        return model_config(config, tokens)
    kind, cfg = read_config(checkpoint)
    if kind != "nextchat":
        raise ValueError(f"{checkpoint} holds a converted {kind} model, not a NextChat")
    if cfg.tokens != tokens:
        raise ValueError(f"the converted model's token ids {dataclasses.asdict(cfg.tokens)} differ from the "
                         f"tokenizer's {dataclasses.asdict(tokens)}")
    if (cfg.vision.image_size, cfg.vision.num_patches) != (config.data.image_size, config.data.num_image_tokens):
        raise ValueError(f"the converted model's image size {cfg.vision.image_size} and {cfg.vision.num_patches} "
                         f"patches differ from data.image_size {config.data.image_size} and "
                         f"data.num_image_tokens {config.data.num_image_tokens}")
    return cfg


def load_model(config, checkpoint: str, encoder, mesh):
    """NextChat with the checkpoint's weights on `mesh` (each array read straight into its shards by the rules
    table, as training places it), from a run config and either a training checkpoint (the model comes from
    `config.model`; trained with `encoder`'s tokenizer: `checkpoint.check_tokenizer`) or a `jaxground convert` output (the
    model comes from its saved config; its token ids must be the tokenizer's): `model_config_of`. A mesh that
    leaves much of the model whole on every device is refused (`parallel.check_fit`, a ValueError) before anything
    is read."""
    from flax import nnx

    from jaxground import checkpoint as ckpt
    from jaxground import parallel
    from jaxground.data.pipeline import tokenizer_path
    from jaxground.data.tokenizer import vocabulary_id
    from jaxground.models.nextchat import NextChat
    from jaxground.train.task import data_config

    ckpt.check_tokenizer(checkpoint, vocabulary_id(encoder.tok), tokenizer_path(data_config(config, training=True)))
    cfg = model_config_of(config, checkpoint, encoder.ids)
    with nnx.logical_axis_rules(parallel.RULES):  # NNX resolves the logical names under a caller's mesh
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NextChat(cfg, rngs=nnx.Rngs(0))))
    parallel.check_fit(abstract, mesh)
    state = ckpt.load_model(checkpoint, abstract, parallel.state_shardings(abstract, mesh))
    return nnx.merge(graphdef, state)


def run(args) -> int:
    from jaxground import distributed
    from jaxground.infer.predict import PredictError

    if not distributed.start(args, "predict"):  # before anything touches a device
        return 2
    hosts = distributed.Hosts(PredictError)  # several hosts refuse together
    try:
        return _run(args, hosts)
    except PredictError as e:
        print(f"jaxground predict: {hosts.refusal(e)}", file=sys.stderr)
        return 2


@dataclasses.dataclass
class Request:
    image_path: str
    image: object  # uint8[H,W,3]
    prompt: str
    boxes: list  # float32[4] pixel boxes, referred to as [i]
    out: str | None
    where: str  # prefix of its errors: "FILE:LINE: " for a --list line


def _request(image_path: str, prompt: str, box_texts: list[str], out: str | None, where: str = "") -> Request:
    """One checked request; bad input raises PredictError (prefixed by `where`, e.g. the --list line)."""
    from jaxground.infer.predict import REF, PredictError, parse_box

    try:
        image = load_image(image_path)
        h, w = image.shape[:2]
        boxes = [parse_box(b, h, w) for b in box_texts]
        refs = [int(m) for m in REF.findall(prompt)]
        if any(r >= len(boxes) for r in refs):
            raise PredictError(f"prompt refers to [{max(refs)}] but only {len(boxes)} --box given")
        if not prompt.strip():
            raise PredictError("empty --prompt")
        if out:
            _check_out(out)
    except PredictError as e:
        raise PredictError(f"{where}{e}") from None
    return Request(image_path, image, prompt, boxes, out, where)


def _check_out(out: str) -> None:
    """Refuses an --out that is not a .png path or that could not be written (`paths.unwritable_file`), so the
    answer is not computed and then lost."""
    from jaxground.infer.predict import PredictError
    from jaxground.paths import unwritable_file

    if Path(out).suffix.lower() != ".png":
        raise PredictError(f"--out {out}: expected a .png path")
    if problem := unwritable_file(out):
        raise PredictError(f"--out: {problem}")


def _requests(args) -> list[Request]:
    from jaxground.infer.predict import PredictError

    if args.list is None:
        if args.image is None or args.prompt is None:
            raise PredictError("give --image and --prompt, or --list")
        return [_request(args.image, args.prompt, args.box, args.out)]
    if args.image or args.prompt or args.box or args.out:
        raise PredictError("--list replaces --image, --prompt, --box and --out")
    path = Path(args.list)
    if not path.is_file():
        raise PredictError(f"--list file not found: {args.list}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if not 2 <= len(cols) <= 4:
            raise PredictError(f"{args.list}:{n}: expected image<TAB>prompt[<TAB>out.png[<TAB>boxes]], "
                               f"got {len(cols)} columns")
        boxes = cols[3].split() if len(cols) > 3 else []
        out.append(_request(cols[0], cols[1], boxes, (cols[2] if len(cols) > 2 else "") or None, f"{args.list}:{n}: "))
    if not out:
        raise PredictError(f"--list {args.list} holds no request")
    return out


def decoding(args) -> tuple[dict, int | None]:
    """The `GenerationConfig` decoding fields the flags ask for, and the sampling seed (None unless sampling).
    Contradictory or bad values raise PredictError naming the flag (before the model loads)."""
    from jaxground.infer.predict import PredictError

    beams = beam_fields(args)
    given = {k: v for k, v in [("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                               ("seed", args.seed)] if v is not None}
    if not (args.sample or args.demo_sampling):
        if given:
            raise PredictError(f"--{next(iter(given)).replace('_', '-')} needs --sample (decoding is greedy otherwise)")
        return ({"method": "beam", **beams} if beams else {"method": "greedy"}), None
    v = NEUTRAL_SAMPLING | (DEMO_SAMPLING if args.demo_sampling else {}) | given
    if not (math.isfinite(v["temperature"]) and v["temperature"] > 0):
        raise PredictError(f"--temperature must be a finite number > 0, got {v['temperature']}")
    if v["top_k"] < 0:
        raise PredictError(f"--top-k must be >= 0 (0: off), got {v['top_k']}")
    if not 0 < v["top_p"] <= 1:
        raise PredictError(f"--top-p must be in (0, 1], got {v['top_p']}")
    if not 0 <= v["seed"] < 2**32:
        raise PredictError(f"--seed must be in [0, 2**32), got {v['seed']}")
    seed = v.pop("seed")
    if beams:  # HF generate with do_sample and num_beams > 1 (the demo's other reading, README)
        if beams["beam_rules"] != "released":
            raise PredictError("--beam-rules hf: sampled beam search runs only as transformers 4.31 does "
                               "(--beam-rules released)")
        return {"method": "beam_sample", "num_beams": beams["num_beams"], **v, "beam_rules": "released"}, seed
    return {"method": "sample", **v}, seed


def num_beams(args) -> int:
    """--num-beams, else 5 under --demo-beams, else 1."""
    if args.num_beams is not None:
        return args.num_beams
    return DEMO_BEAMS["num_beams"] if args.demo_beams else 1


def beam_fields(args) -> dict:
    """{"num_beams", "beam_rules"} for beam search (num_beams > 1; the rules: --beam-rules, else "released" under
    --demo-beams, else "released" with sampling and "hf" without), {} for one beam. A bad or idle --beam-rules
    raises PredictError."""
    from jaxground.infer.generate import BEAM_RULES
    from jaxground.infer.predict import PredictError

    if args.beam_rules is not None and args.beam_rules not in BEAM_RULES:
        raise PredictError(f"--beam-rules must be one of {', '.join(BEAM_RULES)}, got {args.beam_rules!r}")
    w = num_beams(args)
    if w < 2:
        if args.beam_rules is not None:
            raise PredictError("--beam-rules needs --num-beams > 1 (decoding is not beam search otherwise)")
        return {}
    default = "released" if args.demo_beams or args.sample or args.demo_sampling else "hf"
    return {"num_beams": w, "beam_rules": args.beam_rules or default}


def _check_prompts(requests: list[Request], encoder, context: int, cfg) -> None:
    """Refuses, before the model loads, a prompt the encoder rejects or that leaves no room for
    max_new_tokens in the model's context."""
    from jaxground.infer.generate import check_fits
    from jaxground.infer.predict import PredictError, encode_prompt

    for req in requests:
        try:
            enc = encode_prompt(encoder, req.prompt, req.boxes, *req.image.shape[:2])
            check_fits(context, len(enc.input_ids), cfg)
        except ValueError as e:
            raise PredictError(f"{req.where}{e}") from None


def _run(args, hosts) -> int:
    import jax

    from jaxground import parallel
    from jaxground.checkpoint import identity
    from jaxground.config import ConfigError, load_config
    from jaxground.distributed import interrupted
    from jaxground.infer.generate import GenerationConfig
    from jaxground.infer.hosts import predict_inputs
    from jaxground.infer.predict import PredictError

    requests = _requests(args)
    if min(args.max_new_tokens, num_beams(args), args.max_triggers) < 1:
        raise PredictError("--max-new-tokens, --num-beams and --max-triggers must be >= 1")
    if args.mask_iou_threshold is not None and math.isnan(args.mask_iou_threshold):  # blanked every mask
        raise PredictError("--mask-iou-threshold must be a number, got nan")
    fields, seed = decoding(args)
    try:
        config = load_config(args.config, args.overrides)
        mesh = parallel.make_mesh(dict(config.mesh))
        encoder, ids = load_encoder(config)
        context = model_config_of(config, args.checkpoint, ids).llm.max_position
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise PredictError(str(e)) from None
    try:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, max_triggers=args.max_triggers, eos_id=ids.eos,
                               pad_id=ids.pad, at_id=ids.at, boxes_id=ids.boxes, trigger_state=args.trigger_state,
                               **fields)
    except ValueError as e:
        raise PredictError(str(e)) from None
    _check_prompts(requests, encoder, context, cfg)
    try:
        source = identity(args.checkpoint)
    except FileNotFoundError as e:
        raise PredictError(f"cannot load {args.checkpoint}: {e}") from None
    # every refusal above, on any host, stops all hosts here
    hosts.agree(predict_inputs(requests, source))
    try:
        model = load_model(config, args.checkpoint, encoder, mesh)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(f"cannot load {args.checkpoint}: {e}") from None
    rng = jax.random.key(seed) if seed is not None else None
    record = fields | ({"seed": seed} if seed is not None else {})
    done = 0
    try:
        for req in requests:
            _answer(args, req, model, encoder, config, cfg, record, rng)
            done += 1
    except KeyboardInterrupt:
        return interrupted(f"jaxground predict: interrupted after {done} of {len(requests)} requests; the answers "
                           "printed (and their --out images) are complete")
    return 0


def _answer(args, req: Request, model, encoder, config, cfg, record: dict, rng) -> None:
    """Answers one request: every host computes it (collectives); process 0 prints it and draws its --out."""
    import jax

    from jaxground.infer.draw import draw
    from jaxground.infer.predict import mask_function, predict

    mask_fn = mask_function(model, req.image) if model.cfg.sam is not None else None
    pred = predict(model, encoder, req.image, req.prompt, req.boxes, cfg, rng=rng, mask_fn=mask_fn,
                   pad_fill=config.data.get("pad_fill", "mean"), mask_iou_threshold=args.mask_iou_threshold)
    if jax.process_index() != 0:
        return
    if req.out:
        labels = [f"[{pred.first_ref + i}]" for i in range(len(pred.boxes))]
        Path(req.out).parent.mkdir(parents=True, exist_ok=True)  # a missing folder must not lose the answer
        draw(req.image, pred.boxes, labels, pred.masks).save(req.out)
    if args.json:
        print(json.dumps(({"image": req.image_path} if args.list else {}) | pred.to_json() | {"decoding": record}),
              flush=True)
        return
    if args.list:
        print(f"{req.image_path}: {req.prompt}")
    print(pred.text)
    for i, b in enumerate(pred.boxes):
        print(f"[{pred.first_ref + i}] " + " ".join(f"{v:.1f}" for v in b), flush=True)
