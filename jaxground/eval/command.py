"""`jaxground eval --config CFG --checkpoint DIR [--tasks rec,rec_gen,res,res_gen,pope,reg,v7w,count] [--out DIR]
[--max-new-tokens N] [--coordinator HOST:PORT --num-processes N --process-id I] [key=value ...]`

Evaluates a training checkpoint (a run's workdir, its checkpoint dir or a step dir) or a `jaxground convert`
output on every split of `config.eval.datasets` for each task (`jaxground.eval.evaluate.TASKS`; default
`config.eval.tasks`, else REC teacher-forced). The last batch of each split is padded (`valid=False` rows), so no
sample is dropped or counted twice.

Mesh and hosts, as `jaxground train`: the model is split over the mesh of `mesh.data/fsdp/tensor` (overrides such
as `mesh.fsdp=4 mesh.tensor=2`; by default every device), read straight into its shards; `eval.batch_size` is
the global batch, split over data x fsdp. Several hosts (SLURM, a TPU slice under JAXGROUND_MULTIHOST=1, or the
three flags) each read their own shard of every split; the prediction rows of all hosts are gathered in sample
order, the figures computed over all of them, and only process 0 writes OUT/eval.json ({task: {split:
metrics}}) and OUT/predictions.jsonl (one line per sample, with "task" and "split") and prints. OUT defaults to
CHECKPOINT/eval. Exit status 2 for a bad config (an unknown `eval.trigger_state` or `eval.pope_parser` included),
task list, mesh, batch size or checkpoint, reported before any model compute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from jaxground.distributed import add_arguments as distributed_arguments

    parser.add_argument("--config", required=True, help="the run's configs/*.py (data, tokenizer, eval splits)")
    parser.add_argument("--checkpoint", required=True, help="a run's workdir / checkpoint / step dir, or a "
                        "`jaxground convert` output")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: config.eval.tasks or rec)")
    parser.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/eval)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks (default: "
                        "config.eval.max_new_tokens or 32)")
    distributed_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run(args) -> int:
    from jaxground import distributed

    if not distributed.start(args, "eval"):
        return 2

    import jax

    from jaxground import parallel
    from jaxground.config import ConfigError, load_config
    from jaxground.eval.evaluate import check_batch, check_options, evaluate, parse_tasks
    from jaxground.infer.command import load_encoder, load_model

    try:
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        config = load_config(args.config, args.overrides)
        tasks = parse_tasks(args.tasks or config.eval.get("tasks", ("rec",)))
        mesh = parallel.make_mesh(dict(config.mesh))
        check_batch(config, mesh)  # before the weights load
        check_options(config)
        encoder, tokens = load_encoder(config)
        model = load_model(config, args.checkpoint, tokens, mesh)
        results, rows = evaluate(model, encoder, config, tasks, mesh=mesh, max_new_tokens=args.max_new_tokens)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"jaxground eval: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:  # every process holds the same results; one writes them
        out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2))
        with open(out / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(json.dumps(results))
    return 0
