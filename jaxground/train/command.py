"""`jaxground train --config configs/X.py [--workdir DIR] [--init-from CKPT ...] [key=value ...]`

Trains on every device of every process (multi-host: start the same command on each host; SLURM is detected,
a Cloud TPU VM slice under JAXGROUND_MULTIHOST=1 (launch/tpu_vm.sh), or pass --coordinator/--num-processes/
--process-id). Resumes from the latest
checkpoint in WORKDIR when there is one. Exit status: 0 done or preempted by SIGTERM (checkpoint saved), 1
diverged, 2 bad config, 130 stopped by Ctrl-C (checkpoint saved; a second Ctrl-C stops without saving).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxground.paths import unwritable_dir


def add_arguments(parser) -> None:
    from jaxground.distributed import add_arguments as distributed_arguments

    parser.add_argument("--config", required=True, help="configs/*.py with get_config()")
    parser.add_argument("--workdir", default=None, help="checkpoints, metrics.jsonl, tb/, eval.json "
                        "(default: runs/<config name>)")
    parser.add_argument("--init-from", action="append", default=None,
                        help="a run's workdir or checkpoint, or a `jaxground convert` output: start from its model "
                        "weights (fresh optimizer), e.g. stage 3 from stage 1; repeat to merge several in order "
                        "(a later one wins where two hold the same array)")
    distributed_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run(args) -> int:
    from jaxground import distributed

    if not distributed.start(args, "train"):
        return 2

    import jax

    from jaxground import checkpoint, parallel
    from jaxground.config import load_config
    from jaxground.data.conversation import BadSample
    from jaxground.train import loop
    from jaxground.train.task import TaskConfigError, make_task

    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    if "://" in workdir or any("://" in p for p in args.init_from or ()):
        print("jaxground train: --workdir and --init-from take file system paths; for a bucket, mount it "
              "(e.g. gcsfuse) and pass the mount path")
        return 2
    workdir = Path(workdir)
    hosts = distributed.Hosts(distributed.Refused)  # several hosts refuse together, before the first collective
    try:  # everything the config names is built (and checked) here, before any training
        config = load_config(args.config, args.overrides)
        task = make_task(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxground train: {hosts.refusal(distributed.Refused(f'bad config: {e}'))}")
        return 2
    try:
        if problem := unwritable_dir(workdir):
            raise distributed.Refused(f"--workdir: {problem}")
        result = loop.fit(task, config, workdir, init_from=args.init_from, hosts=hosts)
    except (parallel.MeshError, checkpoint.CheckpointMismatch, TaskConfigError, FileNotFoundError,
            distributed.Refused, BadSample) as e:  # BadSample: no usable sample in a long run of them
        print(f"jaxground train: {hosts.refusal(e)}")
        return 2
    except loop.Diverged as e:
        print(f"jaxground train: stopped: {e}")
        return 1
    if jax.process_index() == 0:
        if result.status != "done":
            print(f"{result.status} at step {result.step}; rerun the same command to resume")
        else:
            print(f"done: step {result.step}; eval {json.dumps(result.eval)}; workdir {workdir}")
    return 130 if result.status == "interrupted" else 0
