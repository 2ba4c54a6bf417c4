"""`jaxground eval --config CFG --checkpoint DIR [--tasks rec,rec_gen,res,res_gen,pope,reg,v7w,count]
[--splits NAME,...] [--out DIR] [--max-new-tokens N] [--resume] [--progress-every SECONDS]
[--coordinator HOST:PORT --num-processes N --process-id I] [key=value ...]`

Evaluates a training checkpoint (a run's workdir, its checkpoint dir or a step dir) or a `jaxground convert`
output on every split of `config.eval.datasets` (or the `--splits` named) for each task
(`jaxground.eval.evaluate.TASKS`; default `config.eval.tasks`, else REC teacher-forced). The last batch of each
split is padded (`valid=False` rows), so no sample is dropped or counted twice.

Mesh and hosts, as `jaxground train`: the model is split over the mesh of `mesh.data/fsdp/tensor` (overrides such
as `mesh.fsdp=4 mesh.tensor=2`; by default every device), read straight into its shards; `eval.batch_size` is
the global batch, split over data x fsdp. Several hosts (SLURM, a TPU slice under JAXGROUND_MULTIHOST=1, or the
three flags) each read their own shard of every split; the prediction rows of all hosts are gathered in sample
order, the figures computed over all of them, and only process 0 writes OUT/eval.json ({task: {split:
metrics}}) and OUT/predictions.jsonl (one line per sample, with "task" and "split") and prints. OUT defaults to
CHECKPOINT/eval. Each split is saved in OUT/splits as it ends and eval.json rewritten with the splits so far
(`jaxground.eval.saved`), so a crash or preemption loses at most the split under way: `--resume` evaluates only
the splits not saved yet. A progress line per split is printed at most every `--progress-every` seconds. Exit
status 2 for a bad config (an unknown `eval.trigger_state` or `eval.pope_parser` included), task list, mesh,
batch size or checkpoint, reported before any model compute, and for saved splits of another checkpoint, config
or jaxground code on `--resume`. On several hosts such a refusal on any host is every host's, and a host whose
`--checkpoint` resolves to another step than process 0's is refused too (no host is left waiting for another).
Ctrl-C stops with status 130, naming the `--resume` that continues.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxground.paths import unwritable_dir


def add_arguments(parser) -> None:
    from jaxground.distributed import add_arguments as distributed_arguments

    parser.add_argument("--config", required=True, help="the run's configs/*.py (data, tokenizer, eval splits)")
    parser.add_argument("--checkpoint", required=True, help="a run's workdir / checkpoint / step dir, or a "
                        "`jaxground convert` output")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: config.eval.tasks or rec)")
    parser.add_argument("--splits", default=None, help="comma-separated names of config.eval.datasets to evaluate "
                        "(default: every one); the others' data is not read")
    parser.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/eval)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks (default: "
                        "config.eval.max_new_tokens or 32)")
    parser.add_argument("--resume", action="store_true", help="take the splits an earlier run of this evaluation "
                        "saved in OUT/splits (same checkpoint and config) and evaluate only the others")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                        help="a progress line per split at most this often (default 30; 0: only its start and end)")
    distributed_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run(args) -> int:
    from jaxground import distributed

    if not distributed.start(args, "eval"):
        return 2

    import jax

    from jaxground import parallel
    from jaxground.checkpoint import identity
    from jaxground.config import ConfigError, load_config
    from jaxground.eval.evaluate import (
        check_batch,
        check_options,
        evaluate,
        pairs,
        parse_tasks,
        plan,
        select_splits,
    )
    from jaxground.eval.saved import Store, write_text
    from jaxground.infer.command import load_encoder, load_model, model_config_of

    first = jax.process_index() == 0  # every process holds the same results; one writes them
    hosts = distributed.Hosts(ValueError)  # several hosts refuse together
    try:
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if not args.progress_every >= 0:
            raise ValueError(f"--progress-every must be >= 0 seconds, got {args.progress_every}")
        config = load_config(args.config, args.overrides)
        if args.splits is not None:
            select_splits(config, args.splits)
        tasks = parse_tasks(args.tasks or config.eval.get("tasks", ("rec",)))
        mesh = parallel.make_mesh(dict(config.mesh))
        check_batch(config, mesh)  # before the weights load
        check_options(config)
        out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
        if problem := unwritable_dir(out):  # found now, not when the first split is saved
            raise ValueError(f"--out: {problem}")
        store = Store(out, config, args.checkpoint, args.max_new_tokens)
        encoder, tokens = load_encoder(config)
        # every split's records are read here, so a host missing its copy of the data refuses with the others
        planned = plan(config, model_config_of(config, args.checkpoint, tokens), tasks)
        hosts.agree({"checkpoint": identity(args.checkpoint)})  # every refusal above, on any host, stops all here
        done = _resumed(store, pairs(config, tasks)) if args.resume else {}
        so_far: dict = {}
        for (task, split), (figures, _) in done.items():
            so_far.setdefault(task, {})[split] = figures

        def saved(task: str, split: str, figures: dict, rows: list[dict]) -> None:
            if first:  # a crash or preemption after this keeps the split (`--resume`)
                store.save(task, split, figures, rows)
                so_far.setdefault(task, {})[split] = figures
                write_text(out / "eval.json", json.dumps(so_far, indent=2) + "\n")

        if len(done) < len(pairs(config, tasks)):
            model = load_model(config, args.checkpoint, encoder, mesh)
            try:
                results, rows = evaluate(model, encoder, config, tasks, mesh=mesh,
                                         max_new_tokens=args.max_new_tokens, done=done, on_split=saved,
                                         progress_every=args.progress_every, planned=planned)
            except KeyboardInterrupt:
                return distributed.interrupted(
                    f"jaxground eval: interrupted; the splits that ended are saved in {out / 'splits'}: rerun the "
                    "same command with --resume to evaluate only the others")
        else:  # all saved: nothing to load
            results, rows = so_far, [r for pair in pairs(config, tasks) for r in done[pair][1]]
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"jaxground eval: {hosts.refusal(e)}", file=sys.stderr)
        return 2
    if first:
        write_text(out / "eval.json", json.dumps(results, indent=2) + "\n")
        write_text(out / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        print(json.dumps(results))
    return 0


def _resumed(store, pairs) -> dict:
    """`store.load(pairs)` read by process 0, the same on every process (a collective; a refusal too)."""
    import jax

    from jaxground.eval.gather import from_first_process
    from jaxground.eval.saved import ResumeError

    if jax.process_index() == 0:
        try:
            loaded = {"done": [[t, s, f, r] for (t, s), (f, r) in store.load(pairs).items()]}
        except ResumeError as e:
            loaded = {"error": str(e)}
    else:
        loaded = None
    loaded = from_first_process(loaded)
    if "error" in loaded:
        raise ResumeError(loaded["error"])
    return {(t, s): (f, r) for t, s, f, r in loaded["done"]}
