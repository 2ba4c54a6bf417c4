"""Multi-host start: `jax.distributed.initialize` from explicit flags, a SLURM allocation, a GKE TPU slice, MPI,
or, with `JAXGROUND_MULTIHOST=1` (set by `launch/tpu_vm.sh`), JAX's own detection (a Cloud TPU VM slice, found
through the metadata server: no environment variable tells it apart from a single host).

Call `initialize` before anything touches a device. Each host then runs the same program, reads its own
shard of the data (`shard_index()` of `shard_count()`), and the train step sees global arrays assembled
with `parallel.global_batch`. `Hosts` makes the hosts of `jaxground train`, `eval` and `predict` refuse together
before their first collective; after it, a process that fails alone stops every process (`run_command`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable

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
    parser.set_defaults(multi_host=True)  # how the CLI knows the command may run on several hosts


def start(args, command: str) -> bool:
    """`initialize` from the flags of `add_arguments` for `jaxground {command}`; False (after a one-line message on
    stderr) when they are bad, so the command exits 2. On several processes it starts the watch of `run_command`."""
    try:
        initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=args.heartbeat_timeout)
    except ValueError as e:
        print(f"jaxground {command}: {e}", file=sys.stderr)
        return False
    if jax.process_count() > 1:
        _stop.watch(command)
        if jax.config.jax_cpu_collectives_implementation == "gloo":
            _stdout_for_python_only()
    return True


def _stdout_for_python_only() -> None:
    """gloo prints its connections from C++ on file descriptor 1, in pieces that can split a printed line (a JSON
    result): C++'s prints go to stderr, and Python's alone to the original stdout."""
    sys.stdout.flush()
    sys.stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def refuse_arguments(argv: list[str], command: str, message: str) -> None:
    """For a command line of `jaxground {command}` that this process cannot parse: when its `add_arguments` flags or
    the environment name a run of several processes, joins it and stops every process with `message` (the others
    would wait for this one in `jax.distributed.initialize` for 5 minutes); else returns, and the caller exits 2."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_arguments(parser)
    try:
        args, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError:  # the flags of the run itself are bad: there is no run to join
        return
    if start(args, command) and jax.process_count() > 1:
        _stop.fail(message, 2)


def interrupted(message: str) -> int:
    """For a command's Ctrl-C handler: prints `message` (what was kept) and returns exit status 130; on several
    processes raises KeyboardInterrupt again instead, so that `run_command` stops the others."""
    print(message, file=sys.stderr)
    if jax.process_count() > 1:
        raise KeyboardInterrupt
    return 130


def run_command(run: Callable[[], int]) -> int:
    """`run()`'s exit status. On several processes (after `start`), a failure of this process alone, an exception or
    a refusal after the hosts compared (`Hosts.refusal`), stops every process within seconds, each naming the
    failed process: exiting alone, this process would wait in JAX's shutdown barrier for the others, and they in
    their next collective for it, until the barrier's 5-minute deadline."""
    try:
        code = run()
    except (Exception, KeyboardInterrupt) as e:
        if not _stop.watching:
            raise
        if _stop.posted() is not None:  # another process failed first: this error (gloo's lost peer) follows
            _stop.follow()
        traceback.print_exc()
        _stop.fail(f"{type(e).__name__}: {e}", 1)
    if _stop.refused is not None:
        _stop.fail(_stop.refused, code)
    return code


class _Stop:
    """The coordination service's key-value store carries the first failure (`FAILED`: its exit status and message)
    to every process: each watches for it on a thread, and a process that sees it, or fails itself, exits at once
    with that status through `os._exit`, which skips JAX's shutdown barrier; so a refusal (2) of one host is the
    whole run's status, as when the hosts refuse together. Process 0 leaves last: its exit ends the service the
    others read."""

    FAILED, LEFT = "jaxground/failed", "jaxground/left/"  # LEFT + process index: that process is exiting

    def __init__(self):
        self.watching = False
        self.refused: str | None = None  # this process's own refusal, after the comparison
        self.lock = threading.Lock()
        self.done = threading.Event()

    def watch(self, command: str, every: float = 1.0) -> None:
        self.command, self.watching = command, True
        thread = threading.Thread(target=self._poll, args=(every,), name="jaxground-stop", daemon=True)
        thread.start()

        def end() -> None:  # registered after `jax`'s own exit hook, so it runs first: no poll outlives the client
            self.done.set()
            thread.join()

        atexit.register(end)

    def posted(self) -> tuple[int, str] | None:
        """(exit status, "process N failed: ...") of the first failure of any process, if one was posted."""
        try:
            code, message = _client().key_value_try_get(self.FAILED).split(" ", 1)
        except jax.errors.JaxRuntimeError:  # NOT_FOUND
            return None
        return int(code), message

    def _poll(self, every: float) -> None:
        while not self.done.wait(every):
            if self.posted() is not None:
                self.follow()

    def fail(self, message: str, code: int) -> None:
        """Tells every process that this one failed with `message`, and exits with `code`."""
        with self.lock:
            self.done.set()
            with contextlib.suppress(jax.errors.JaxRuntimeError):  # ALREADY_EXISTS: another process failed first
                _client().key_value_set(self.FAILED, f"{code} process {jax.process_index()} failed: {message}")
            self._leave(code)

    def follow(self) -> None:
        """Exits with the failed process's status after a line naming it."""
        with self.lock:
            self.done.set()
            code, message = self.posted()
            print(f"jaxground {self.command}: stopping: {message}", file=sys.stderr, flush=True)
            self._leave(code)

    def _leave(self, code: int, wait: float = 10.0) -> None:
        client, me, n = _client(), jax.process_index(), jax.process_count()
        sys.stdout.flush()
        sys.stderr.flush()
        client.key_value_set(f"{self.LEFT}{me}", "")
        deadline = time.monotonic() + wait  # a process killed outright never leaves its key
        while me == 0 and len(client.key_value_dir_get(self.LEFT)) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(code)


def _client():
    """The coordination service's client of `jax.distributed` (JAX has no public handle on it)."""
    from jax._src.distributed import global_state

    return global_state.client


_stop = _Stop()


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


class Refused(ValueError):
    """A refusal of the whole run, for commands whose own errors have no common type (`jaxground train`)."""


class Hosts:
    """Makes the processes of a multi-host run refuse together with `error` (the command's refusal type). Each
    checks its flags and inputs alone, then, before their first collective (Orbax's, the model's), they compare
    verdicts (`agree`): a host that cannot read a file makes every host refuse with its message, where exiting
    alone would leave the others waiting for it in that collective or failing inside Orbax. On one process there is
    nothing to compare and the messages stay as they are."""

    def __init__(self, error: type[Exception]):
        self.error = error
        self.compared = False
        self.verdict: Exception | None = None  # the comparison's refusal, raised on every process

    def agree(self, inputs: dict[str, object]) -> None:
        """Raises `error` on every process when any process refused, or when one read other `inputs` than process
        0 (JSON-able values by name: `{"checkpoint": "step 3", ...}`; a string value is quoted in the message)."""
        self._compare(None, inputs)

    def refusal(self, error: Exception) -> str:
        """The message to print for `error`. Raised before the comparison, it joins the comparison the others wait
        in, and every process prints the first refusing process's message; raised after it, its own, and
        `run_command` stops the other processes."""
        if jax.process_count() == 1 or error is self.verdict:  # the verdict: every process raised it
            return str(error)
        if self.compared:
            if _stop.watching:  # the others are past the comparison: `run_command` stops them
                _stop.refused = str(error)
            return str(error)
        try:
            self._compare(str(error), {})
        except self.error as first:
            return str(first)
        return str(error)  # not reached: this process refused

    def _compare(self, error: str | None, inputs: dict) -> None:
        from jaxground.eval.gather import from_every_process

        self.compared = True
        verdicts = from_every_process({"error": error, "inputs": inputs})
        if len(verdicts) == 1:
            return
        refused = [(i, v["error"]) for i, v in enumerate(verdicts) if v["error"] is not None]
        if refused:
            self.verdict = self.error("process {}: {}".format(*refused[0]))
            raise self.verdict
        first = verdicts[0]["inputs"]
        for i, v in enumerate(verdicts):
            for name, value in v["inputs"].items():
                if value != first[name]:
                    shown = f" ({value} against {first[name]})" if isinstance(value, str) else ""
                    self.verdict = self.error(f"process {i} read other {name} than process 0{shown}: every host "
                                              "must read the same files")
                    raise self.verdict
