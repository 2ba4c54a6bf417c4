"""Two processes of one multi-host run on this machine (collectives over gloo on 127.0.0.1), for the tests of
training, evaluation and prediction on several hosts: the runner, a failure injected into one process, and the
assertions on how both ended."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(script: Path, *args, timeout: float = 300) -> list[tuple[int, str, str]]:
    """SCRIPT PORT PROCESS_ID ARGS as processes 0 and 1 of one run (`args`: each process's own list) -> each one's
    (exit status, stdout, stderr). Both are killed after `timeout` seconds and the test fails: one process left
    waiting for the other hangs."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), *map(str, a)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, a in enumerate(args)]
    deadline = time.monotonic() + timeout
    try:
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{script.name} still running after {timeout:.0f} s: " + " | ".join(p.communicate()[1][-2000:]
                                                                                        for p in procs))
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def start_command(command: str, *args, timeout: float = 300) -> list[tuple[int, str, str]]:
    """`jaxground COMMAND` as processes 0 and 1 of one run (`start_two` of tests/run_command_process.py), each with its
    own list of arguments, a failure flag of `inject_failure` first where one is given."""
    return start_two(REPO / "tests" / "run_command_process.py", *[[command, *a] for a in args], timeout=timeout)


def assert_refused_together(results, line: str, *, contains: str = "", stream: str = "stderr") -> None:
    """Both processes of `start_two` exited with status 2, printed no result (no JSON line on stdout), and printed one
    line of the command's (`jaxground CMD:`) on `stream`, which starts with `line` and holds `contains`."""
    command = line.split(":")[0] + ":"
    for code, out, err in results:
        assert code == 2, out[-2000:] + err[-3000:]
        assert not [s for s in out.splitlines() if s.startswith("{")], out[-2000:]
        shown = [s for s in (err if stream == "stderr" else out).splitlines() if s.startswith(command)]
        assert len(shown) == 1 and shown[0].startswith(line) and contains in shown[0], out[-2000:] + err[-3000:]


INJECTED = "disk error (injected)"


def inject_failure(args: list[str]) -> list[str]:
    """For the process scripts: `args` led by `--fail-after-comparison=OSError` (or `ValueError`) make this process
    raise that error right after the hosts compared (`distributed.Hosts.agree`), as a failure of one host alone
    would (its disk, say); led by `--fail-at-step=N`, train raises OSError reading the batch of step N + 1, while
    the others are inside step N's collectives. Returns the rest of `args`."""
    flag, _, value = args[0].partition("=") if args else ("", "", "")
    if flag == "--fail-after-comparison":
        from jaxground import distributed

        error, agree = {"OSError": OSError, "ValueError": ValueError}[value], distributed.Hosts.agree

        def failing(self, inputs):
            agree(self, inputs)
            raise error(INJECTED)

        distributed.Hosts.agree = failing
    elif flag == "--fail-at-step":
        from jaxground.train import loop

        next_rows = loop._next_rows

        def failing_rows(task, step):
            if step == int(value):
                raise OSError(INJECTED)
            return next_rows(task, step)

        loop._next_rows = failing_rows
    else:
        return args
    return args[1:]


def assert_stopped_together(results, command: str, *, code: int, line: str, failure: str) -> None:
    """Process 1 failed alone after its start: it exited with status `code`, and printed `line` (the last of a
    traceback, or the command's own); process 0 stopped with the same status and a line naming process 1's `failure`.
    Neither printed a result (a JSON line)."""
    (code0, out0, err0), (code1, out1, err1) = results
    assert code1 == code and line in (out1 + "\n" + err1).splitlines(), out1[-2000:] + err1[-3000:]
    stopping = f"jaxground {command}: stopping: process 1 failed: {failure}"
    assert code0 == code and stopping in err0.splitlines(), out0[-2000:] + err0[-3000:]
    assert not [s for s in out0.splitlines() + out1.splitlines() if s.startswith("{")]


def assert_injected_stopped_together(results, command: str, error: str) -> None:
    """`assert_stopped_together` for `inject_failure`: an exception ("OSError") exits with status 1 and its
    traceback, a refusal ("ValueError", the command's refusal type) with status 2 and the command's line."""
    if error == "OSError":
        assert_stopped_together(results, command, code=1, line=f"OSError: {INJECTED}", failure=f"OSError: {INJECTED}")
    else:
        assert_stopped_together(results, command, code=2, line=f"jaxground {command}: {INJECTED}", failure=INJECTED)
