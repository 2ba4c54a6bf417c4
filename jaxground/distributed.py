"""Multi-host start: `jax.distributed.initialize` from explicit flags, a SLURM allocation or a TPU VM slice.

Call `initialize` before anything touches a device. Each host then runs the same program, reads its own
shard of the data (`shard_index()` of `shard_count()`), and the train step sees global arrays assembled
with `parallel.global_batch`.
"""

from __future__ import annotations

import os

import jax


def _env_multi_host() -> str | None:
    """Which cluster the environment describes, if it runs more than one process."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return "tpu"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: bool | None = None,
) -> str:
    """Starts multi-process JAX when there is more than one process; returns how ("explicit", "slurm",
    "tpu", "mpi" or "single"). An explicit `coordinator` ("host:port") needs `num_processes` and
    `process_id`; otherwise JAX's cluster detection reads SLURM / TPU VM / MPI variables. On CPU processes
    (tests, one machine) the collectives go over gloo."""
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if coordinator is None and (num_processes is not None or process_id is not None):
        raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT")
    how = "explicit" if coordinator is not None else _env_multi_host()
    if how is None:
        return "single"
    if cpu_collectives is None:
        cpu_collectives = os.environ.get("JAX_PLATFORMS", "") == "cpu"
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if how == "explicit":
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return how


def shard_index() -> int:
    return jax.process_index()


def shard_count() -> int:
    return jax.process_count()
