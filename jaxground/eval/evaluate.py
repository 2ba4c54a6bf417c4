"""Evaluation of a NextChat over the task/split grid of a run config: one padded Grain pipeline per (task,
split), the task's runner, metrics per split and one prediction row per sample.

Tasks (`TASKS`; select with `config.eval.tasks` or `jaxground eval --tasks`):

| task | data items | how | metrics |
|---|---|---|---|
| `rec` | every REC expression | teacher-forced "Answer: <at> <boxes> ." (as the authors), F(t) of the trigger | acc@0.5, miou |
| `rec_gen` | every REC expression | prompt without the answer, greedy generation, F(t) of the first trigger | acc@0.5, miou, no_trigger |
| `res` | every REC expression with a mask | teacher-forced (ours: cheaper, deterministic), mask head at the trigger | ciou, giou |
| `res_gen` | every REC expression with a mask | as `rec_gen`, mask head at the first trigger (the authors' with trigger_state "predicting") | ciou, giou, ciou_released, no_trigger, multi_trigger, failed |
| `pope` | every POPE question | generation, the authors' answer parsing | accuracy, precision, recall, f1, yes_ratio |
| `reg` | every REC expression, asked back | generation given the box; the expression is the reference | cider, bleu, rouge_l, meteor |
| `v7w` | every Visual7W pointing question | teacher-forced; F(t) picks the candidate of highest IoU | accuracy |
| `count` | every counting question | generation; the number the answer opens with ("Two: <at>...") | accuracy, mae, unparsed |

Config keys read (`config.eval`): `datasets` (split name -> dataset entry), `batch_size` (global: every host
reads `batch_size / hosts` rows of its shard; it must divide over the mesh's data x fsdp shards), and optionally
`tasks` (default ("rec",)), `max_new_tokens` (32; the authors' RES uses 20), `trigger_state` ("at" | "predicting":
the state each generation task reads a trigger's box and mask from, `GenerationConfig.trigger_state`; "predicting"
is the released generate()), `pope_parser` ("nextchat" | "pope"), `meteor` (True: use java for the PTB tokenizer
and METEOR when java is installed), `res_pixels` ("grid" | "original": where `res` and `res_gen` masks are scored,
`jaxground.eval.res_pixels`).

On a mesh: the model is placed by the rules table (`jaxground.infer.command.load_model`), each batch becomes
global arrays split over (data, fsdp) (`parallel.global_batch`), and each host takes back the rows it fed
(`parallel.host_rows`); `gather.gather_rows` then gives every process all rows of the split in sample order, and
the figures are computed over them (cIoU = sum of intersections / sum of unions over the whole split).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
from flax import nnx

from jaxground import parallel
from jaxground.eval import res_pixels, runners, steps
from jaxground.eval.gather import gather_rows, process_sum
from jaxground.eval.metrics import pointing_summary, rec_summary, res_gen_summary, res_summary
from jaxground.eval.progress import Progress
from jaxground.eval.prompts import generated_text, prompt_batch, reference_answers

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalTask:
    data_task: str  # the pipeline's per-item task
    kind: str  # "forward" (a jitted step), "generate" (scored on the host), "generate_masks" (a jitted step)
    needs_masks: bool = False


TASKS = {
    "rec": EvalTask("rec", "forward"),
    "rec_gen": EvalTask("rec", "generate"),
    "res": EvalTask("rec", "forward", needs_masks=True),
    "res_gen": EvalTask("rec", "generate_masks", needs_masks=True),
    "pope": EvalTask("pope", "generate"),
    "reg": EvalTask("reg", "generate"),
    "count": EvalTask("count", "generate"),
    "v7w": EvalTask("v7w", "forward"),
}
# jitted once per process: a model of the same structure (another checkpoint) reuses the compiled step
_STEPS = {"rec": (nnx.jit(steps.rec_teacher_forced_step), runners.run_rec, rec_summary),
          "res": (nnx.jit(steps.res_step), runners.run_res, res_summary),
          "v7w": (nnx.jit(steps.pointing_step), runners.run_pointing, pointing_summary)}
_RES_GENERATED = nnx.jit(steps.res_generated_step, static_argnames=("cfg",))


class EvalConfigError(ValueError):
    """A task list, split or model that cannot be evaluated (raised before any compute)."""


def parse_tasks(tasks) -> tuple[str, ...]:
    """"rec,pope" or a sequence -> checked task names."""
    names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    unknown = [t for t in names if t not in TASKS]
    if not names:
        raise EvalConfigError(f"no eval task named (known: {', '.join(TASKS)})")
    if unknown:
        raise EvalConfigError(f"unknown eval tasks {unknown} (known: {', '.join(TASKS)})")
    if len(set(names)) < len(names):  # a task named twice ran twice, the second over no rows, and kept that
        raise EvalConfigError(f"eval tasks {', '.join(names)}: name each task once")
    return names


def task_data_config(config, task: str, split: str, model_cfg):
    """The pipeline section for one (task, split): only that split, every item of the task once, SAM inputs and
    masks only for RES."""
    from jaxground.train.task import data_config

    cfg = data_config(config, training=False)
    cfg.datasets = {split: config.eval.datasets[split].to_dict()}
    cfg.task = TASKS[task].data_task
    cfg.task_weights = {cfg.task: 1.0}
    masks = TASKS[task].needs_masks
    cfg.with_masks = cfg.with_sam = masks
    if masks:
        cfg.sam_size = model_cfg.sam.img_size
    return cfg


def select_splits(config, names: str) -> None:
    """Keeps only the named splits ("refcoco_val,refcocog_test") of `config.eval.datasets`, so the others' data
    is never read."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = list(config.eval.datasets)
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted or len(set(wanted)) < len(wanted):
        problem = f"no split named {', '.join(unknown)}" if unknown else "name each split once, comma-separated"
        raise EvalConfigError(f"--splits {names!r}: {problem} (the config's splits: {', '.join(known)})")
    config.eval.datasets = {n: config.eval.datasets[n] for n in wanted}


def pairs(config, tasks) -> list[tuple[str, str]]:
    """Every (task, split) to evaluate, in the order evaluated (task by task)."""
    if not config.eval.datasets:
        raise EvalConfigError("eval.datasets is empty")
    return [(task, split) for task in parse_tasks(tasks) for split in config.eval.datasets]


def plan(config, model_cfg, tasks, skip=frozenset()) -> list[tuple[str, str, object]]:
    """(task, split, pipeline) for every pair not in `skip`, built before any model compute; bad configs raise
    here."""
    from jaxground.data.pipeline import make_pipeline

    names = parse_tasks(tasks)
    masks = [t for t in names if TASKS[t].needs_masks]
    if masks and model_cfg.sam is None:
        raise EvalConfigError(f"tasks {', '.join(masks)} need a model with a mask head (model.sam)")
    out = []
    for task, split in pairs(config, names):
        if (task, split) not in skip:
            try:
                out.append((task, split, make_pipeline(task_data_config(config, task, split, model_cfg),
                                                       training=False)))
            except ValueError as e:
                raise EvalConfigError(f"task {task} on split {split}: {e}") from None
    return out


def check_options(config) -> None:
    """Raises EvalConfigError for an unknown `eval.pope_parser`, `eval.trigger_state` or `eval.res_pixels`
    (before any compute)."""
    from jaxground.infer.generate import TRIGGER_STATES

    parser = config.eval.get("pope_parser", "nextchat")
    if parser not in runners.PARSERS:
        raise EvalConfigError(f"eval.pope_parser {parser!r} is not one of {sorted(runners.PARSERS)}")
    state = config.eval.get("trigger_state", "at")
    if state not in TRIGGER_STATES:
        raise EvalConfigError(f"eval.trigger_state {state!r} is not one of {list(TRIGGER_STATES)}")
    pixels = config.eval.get("res_pixels", "grid")
    if pixels not in res_pixels.RES_PIXELS:
        raise EvalConfigError(f"eval.res_pixels {pixels!r} is not one of {list(res_pixels.RES_PIXELS)}")


def generation_config(model_cfg, max_new_tokens: int, trigger_state: str = "at"):
    from jaxground.infer.generate import GenerationConfig

    ids = model_cfg.tokens
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_id=ids.eos, pad_id=ids.pad, at_id=ids.at,
                            boxes_id=ids.boxes, trigger_state=trigger_state)


def prompt_width(model_cfg, max_len: int, max_new_tokens: int) -> int:
    """Static left-padded prompt width: data.max_len, cut to what the context leaves after generation."""
    width = min(max_len, model_cfg.llm.max_position - max_new_tokens)
    if width < 8:
        raise EvalConfigError(f"eval.max_new_tokens {max_new_tokens} leaves {width} prompt tokens in the "
                              f"model's context of {model_cfg.llm.max_position}")
    return width


def check_batch(config, mesh) -> None:
    """Raises parallel.MeshError when the global `eval.batch_size` does not split over the mesh's batch shards
    (data x fsdp) and the hosts."""
    try:
        parallel.check_batch(config.eval.batch_size, mesh, processes=jax.process_count())
    except parallel.MeshError as e:
        raise parallel.MeshError(f"eval.batch_size {config.eval.batch_size}: {e}") from None


def on_mesh(fn: Callable[[dict], dict], mesh, drop: tuple[str, ...] = ()) -> Callable[[dict], dict]:
    """fn(global batch) -> batch-leading outputs, as a function of this host's numpy rows -> its rows of the
    outputs (numpy), without the outputs named in `drop` (left on the devices, never copied to the host)."""
    def rows(batch: dict) -> dict:
        out = fn(parallel.global_batch(batch, mesh))
        return parallel.host_rows({k: v for k, v in out.items() if k not in drop}, mesh)

    return rows


def batch_generator(model, tokenizer, gen_cfg, width: int, mesh) -> Callable[[dict], dict]:
    """This host's batch -> {"text", "box" (first trigger), "num_triggers"}: greedy generation after each row's
    prompt, the rows split over the mesh."""
    from jaxground.infer.predict import generate_nextchat

    ids = model.cfg.tokens

    def generate_rows(g: dict) -> dict:
        # rng None: greedy needs none, and a key made on the host would not be a global array on several hosts
        out = generate_nextchat(model, g["images"], g["input_ids"], g["attention_mask"], g["boxes"], g["box_mask"],
                                None, gen_cfg)
        return {"tokens": out.tokens, "boxes": out.boxes, "num_triggers": out.num_triggers}

    rows = on_mesh(generate_rows, mesh)

    def generate(batch: dict) -> dict:
        out = rows({"images": batch["images"], **prompt_batch(batch, ids.pad, ids.boxes, width)})
        return {"text": [generated_text(t, tokenizer, ids.eos) for t in out["tokens"]], "box": out["boxes"][:, 0],
                "num_triggers": out["num_triggers"]}

    return generate


def mask_generator(model, tokenizer, gen_cfg, width: int, mesh, drop: tuple[str, ...] = ()) -> Callable[[dict], dict]:
    """This host's batch (with SAM images and masks) -> `steps.res_generated_step`'s outputs for its rows (numpy),
    "tokens" decoded to "text", without those named in `drop` (`on_mesh`); the rows split over the mesh."""
    ids = model.cfg.tokens
    step = nnx.cached_partial(_RES_GENERATED, model)
    rows = on_mesh(lambda g: step(g, cfg=gen_cfg), mesh, drop)
    keys = ("images", "sam_images", "masks", "mask_valid", "mask_region", "target_mask", "valid")

    def generate(batch: dict) -> dict:
        out = rows({**{k: batch[k] for k in keys if batch.get(k) is not None},
                    **prompt_batch(batch, ids.pad, ids.boxes, width)})
        return out | {"text": [generated_text(t, tokenizer, ids.eos) for t in out["tokens"]]}

    return generate


def evaluate(model, encoder, config, tasks, *, mesh, max_new_tokens: int | None = None, done: dict | None = None,
             on_split: Callable[[str, str, dict, list[dict]], None] | None = None,
             progress_every: float | None = None, planned: list | None = None) -> tuple[dict, list[dict]]:
    """-> ({task: {split: metrics}}, prediction rows with "task" and "split"), the same on every process.

    `model` is placed on `mesh` (`jaxground.infer.command.load_model`); every process calls this with its own
    shard of each split (the pipeline reads `jax.process_index()` of `jax.process_count()`); see `check_batch`.
    `done` {(task, split): (metrics, rows)} holds splits evaluated before (`jaxground.eval.saved`), taken as they
    are; `on_split(task, split, metrics, rows)` is called as each other split ends; `progress_every` (seconds, not
    None) prints a split's start, its progress that often (0: never) and its end (`progress.Progress`). `planned`:
    `plan`'s (task, split, pipeline) for these tasks, built by the caller before the model loaded (else here)."""
    check_batch(config, mesh)
    check_options(config)
    done = done or {}
    ev = config.eval
    max_new = max_new_tokens or ev.get("max_new_tokens", 32)
    parser = ev.get("pope_parser", "nextchat")
    original = ev.get("res_pixels", "grid") == "original"
    # the RES steps' low-resolution logits are read on the host only to score at original pixels; on the grid
    # they stay on the devices (SAM's 256x256 grid: 256 KiB a row)
    device_only = () if original else ("mask_logits",)
    planned = plan(config, model.cfg, tasks, skip=frozenset(done)) if planned is None else planned
    pipelines = {(t, s): b for t, s, b in planned if (t, s) not in done}
    if any(TASKS[t].kind != "forward" for t, _ in pipelines):
        width = prompt_width(model.cfg, config.data.max_len, max_new)
        gen_cfg = generation_config(model.cfg, max_new, ev.get("trigger_state", "at"))
        generate = batch_generator(model, encoder.tok, gen_cfg, width, mesh)
        generate_masks = mask_generator(model, encoder.tok, gen_cfg, width, mesh, device_only)
    results: dict = {}
    rows: list[dict] = []
    with jax.set_mesh(mesh):  # activations constrained by the rules table, as in training
        for task, split in pairs(config, tasks):
            if (task, split) in done:
                summary, task_rows = done[(task, split)]
                results.setdefault(task, {})[split] = summary
                rows += task_rows
                continue
            batches, kind = pipelines[(task, split)], TASKS[task].kind
            shown = Progress(f"{task}/{split}", batches.num_batches, ev.batch_size, progress_every)
            if kind in ("forward", "generate_masks"):  # jitted steps whose rows carry their metric terms
                if kind == "forward":
                    fn, run, summarize = _STEPS[task]
                    # cached_partial: the model's graph is walked once, not on every batch (`bench generate
                    # --what rec`, tiny: 217.8 -> 252.9-283.4 ex/s)
                    step = on_mesh(nnx.cached_partial(fn, model), mesh, device_only)
                else:
                    step, run, summarize = generate_masks, runners.run_res_generated, res_gen_summary
                if original and TASKS[task].needs_masks:
                    step = res_pixels.at_original_pixels(step, batches, model.cfg.sam.img_size)
                summary, task_rows = runners.add_up(gather_rows(run(shown.wrap(step), batches)), summarize)
            else:
                task_rows = runners.run_generation(
                    shown.wrap(generate), batches, lambda b: reference_answers(b, encoder.tok, model.cfg.tokens.eos))
                summary, task_rows = _score_generation(task, gather_rows(task_rows), parser,
                                                       ev.get("meteor", True))
            if batches.skipped:
                log.warning("eval %s/%s: %s", task, split, batches.summary())
            skipped = process_sum(sum(batches.skipped.values()))
            if skipped:
                summary["skipped"] = skipped
            task_rows = [{"task": task, "split": split, **r} for r in task_rows]
            results.setdefault(task, {})[split] = summary
            rows += task_rows
            shown.done(summary)
            if on_split is not None:
                on_split(task, split, summary, task_rows)
    return results, rows


def _score_generation(task: str, rows: list[dict], parser: str, meteor: bool) -> tuple[dict, list[dict]]:
    if task == "rec_gen":
        return runners.score_rec_generated(rows), rows
    if task == "pope":
        metrics, parsed = runners.run_pope([r["answer"] for r in rows],
                                           [runners.pope_label(r["reference"]) for r in rows], parser)
        return metrics, [r | {"pred": p["pred"], "label": p["label"]} for r, p in zip(rows, parsed)]
    if task == "count":
        return runners.score_count(rows)
    if task == "reg":
        from jaxground.eval.captioning import caption_metrics

        if not rows:
            return {"count": 0}, rows
        keys = [str(r["index"]) for r in rows]
        metrics = caption_metrics({k: r["answer"] for k, r in zip(keys, rows)},
                                  {k: [r["reference"]] for k, r in zip(keys, rows)}, java=meteor)
        return metrics, [{k: v for k, v in r.items() if k not in ("pred", "target")} for r in rows]
    raise ValueError(f"task {task!r} is not a generation task")
