"""Multi-host start: `jax.distributed.initialize` from explicit flags, a SLURM allocation, a GKE TPU slice, MPI,
or, with `JAXGROUND_MULTIHOST=1` (set by `launch/tpu_vm.sh`), JAX's own detection (a Cloud TPU VM slice, found
through the metadata server: no environment variable tells it apart from a single host).

Call `initialize` before anything touches a device. Each host then runs the same program, reads its own
shard of the data (`shard_index()` of `shard_count()`), and the train step sees global arrays assembled
with `parallel.global_batch`.
"""

from __future__ import annotations

import os
import re
import sys

import jax


def _env_multi_host() -> str | None:
    """Which cluster the environment describes, if it runs more than one process."""
    if os.environ.get("JAXGROUND_MULTIHOST") == "1":
        return "auto"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:  # GKE's TPU slices
        return "tpu"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def _tasks_on_node() -> int:
    """This node's task count from SLURM's compressed per-node list ("8(x2),4"; nodes in SLURM_NODEID order)."""
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
    counts = []
    for n, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", per_node):
        counts += [int(n)] * int(repeat or 1)
    return counts[int(os.environ.get("SLURM_NODEID", "0"))]


def slurm_local_devices() -> list[int] | None:
    """The GPUs this SLURM task drives. JAX's SLURM detection gives each process only GPU number SLURM_LOCALID:
    right for one task per GPU (None keeps it), but one task per node would use GPU 0 alone, so it gets all."""
    gpus, tasks = int(os.environ.get("SLURM_GPUS_ON_NODE", "0")), _tasks_on_node()
    if gpus <= 1 or tasks == gpus:
        return None
    if tasks == 1:
        return list(range(gpus))
    raise ValueError(f"SLURM runs {tasks} tasks on a node with {gpus} GPUs: run one task per GPU "
                     f"(--ntasks-per-node={gpus}) or one per node")


def add_arguments(parser) -> None:
    """The flags `initialize` takes, for a command that may run on several hosts."""
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host without SLURM/TPU)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--heartbeat-timeout", type=int, default=None, metavar="SECONDS",
                        help="declare a process dead after this long without its heartbeat (JAX's default: 100); "
                             "raise it where a host can stall that long, e.g. heavily shared CPU hosts")


def start(args, command: str) -> bool:
    """`initialize` from the flags of `add_arguments` for `jaxground {command}`; False (after a one-line message on
    stderr) when they are bad, so the command exits 2."""
    try:
        initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=args.heartbeat_timeout)
    except ValueError as e:
        print(f"jaxground {command}: {e}", file=sys.stderr)
        return False
    return True


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: bool | None = None,
    heartbeat_timeout: int | None = None,
) -> str:
    """Starts multi-process JAX when there is more than one process; returns how ("explicit", "auto",
    "slurm", "tpu", "mpi" or "single"). An explicit `coordinator` ("host:port") needs `num_processes` and
    `process_id`; otherwise JAX's cluster detection reads SLURM / GKE / MPI variables, or, under
    `JAXGROUND_MULTIHOST=1`, whatever it can find (a Cloud TPU VM's metadata). On CPU processes
    (tests, one machine) the collectives go over gloo. `heartbeat_timeout` (seconds, None = JAX's default) is how
    long the coordinator waits for a process's heartbeat before it stops the whole run."""
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if coordinator is None and (num_processes is not None or process_id is not None):
        raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT")
    if heartbeat_timeout is not None and heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat-timeout must be at least 1 second, got {heartbeat_timeout}")
    how = "explicit" if coordinator is not None else _env_multi_host()
    if how is None:
        return "single"
    if cpu_collectives is None:
        cpu_collectives = os.environ.get("JAX_PLATFORMS", "") == "cpu"
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = {} if heartbeat_timeout is None else {"heartbeat_timeout_seconds": heartbeat_timeout}
    if how == "explicit":
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id, **timeouts)
    elif how == "slurm":
        jax.distributed.initialize(local_device_ids=slurm_local_devices(), **timeouts)
    else:
        jax.distributed.initialize(**timeouts)
    return how


def shard_index() -> int:
    return jax.process_index()


def shard_count() -> int:
    return jax.process_count()
