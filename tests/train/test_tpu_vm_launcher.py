"""launch/tpu_vm.sh run against a fake `gcloud` that executes each `--command` in a local "worker" directory, and
a fake `python3` whose venv's `pip` and `jaxground` only record how they were called: what the script installs,
which commit it checks out, and the train command it starts."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "tpu_vm.sh"

FAKE_GCLOUD = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --command ] && { cd "$WORKER" && exec bash -c "$2"; }; shift; done
exit 97
"""
# `python3 -m venv .venv` makes a venv whose tools log their arguments, one call per line
FAKE_PYTHON = """#!/usr/bin/env bash
[ "$1 $2" = "-m venv" ] || exit 98
mkdir -p "$3/bin"
for tool in pip jaxground; do
  printf '#!/usr/bin/env bash\\necho "MULTIHOST=${JAXGROUND_MULTIHOST:-} $(printf " %%q" "$@")" >> "$LOG/%s"\\n' \
    "$tool" > "$3/bin/$tool"
  chmod +x "$3/bin/$tool"
done
"""


def _git(cwd, *args) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, text: str) -> str:
    (repo / "file.txt").write_text(text)
    _git(repo, "add", "file.txt")
    _git(repo, "commit", "-q", "-m", text)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def cluster(tmp_path):
    """(run(*args) -> CompletedProcess, the upstream repo, the worker's checkout, the log directory)."""
    bin_dir, worker, log, repo = (tmp_path / d for d in ("bin", "worker", "log", "upstream"))
    for d in (bin_dir, worker, log, repo):
        d.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    _git(repo, "init", "-q", "-b", "main")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKER": str(worker), "LOG": str(log)}

    def run(*args):
        return subprocess.run(["bash", str(SCRIPT), "--tpu", "t", "--zone", "z", "--repo", str(repo), *args],
                              check=False, env=env, capture_output=True, text=True)

    return run, repo, worker / "jaxground", log


def _calls(log: Path, tool: str) -> list[list[str]]:
    path = log / tool
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_installs_the_branch_and_starts_train_on_every_worker(cluster):
    run, repo, checkout, log = cluster
    first = _commit(repo, "one")
    r = run("--", "--config", "configs/a b.py", "--workdir", "/mnt/x", "train.steps=3")
    assert r.returncode == 0, r.stderr
    assert _git(checkout, "rev-parse", "HEAD") == first
    assert _calls(log, "pip") == [["MULTIHOST=", "install", "-q", "-U", "pip"],
                                  ["MULTIHOST=", "install", "-q", "-e", ".", "jax[tpu]==0.10.2"]]
    assert _calls(log, "jaxground") == [["MULTIHOST=1", "train", "--config", "configs/a b.py", "--workdir", "/mnt/x",
                                         "train.steps=3"]]
    second = _commit(repo, "two")  # a rerun fast-forwards the worker's branch
    assert run("--", "--config", "c.py").returncode == 0
    assert _git(checkout, "rev-parse", "HEAD") == second


def test_a_tag_or_commit_ref_is_checked_out(cluster):
    run, repo, checkout, log = cluster
    tagged = _commit(repo, "one")
    _git(repo, "tag", "v1")
    _commit(repo, "two")
    assert run("--", "--config", "c.py").returncode == 0
    r = run("--ref", "v1", "--", "--config", "c.py")
    assert r.returncode == 0, r.stderr
    assert _git(checkout, "rev-parse", "HEAD") == tagged
    assert len(_calls(log, "jaxground")) == 2


def test_a_ref_that_does_not_exist_stops_before_training(cluster):
    """Before 2026-12-05 a failing checkout was swallowed (`... && git pull || true`) and the old code trained."""
    run, repo, checkout, log = cluster
    first = _commit(repo, "one")
    assert run("--", "--config", "c.py").returncode == 0
    r = run("--ref", "no-such-branch", "--", "--config", "c.py")
    assert r.returncode != 0
    assert _git(checkout, "rev-parse", "HEAD") == first
    assert len(_calls(log, "jaxground")) == 1


def test_data_path_is_linked_and_arguments_are_checked(cluster, tmp_path):
    run, repo, checkout, _ = cluster
    _commit(repo, "one")
    data = tmp_path / "my data"
    data.mkdir()
    assert run("--data-path", str(data), "--", "--config", "c.py").returncode == 0
    assert (checkout / "data").resolve() == data
    r = run("--config", "c.py")
    assert r.returncode == 2 and "train arguments go after --" in r.stdout
    r = run()
    assert r.returncode == 2 and "need train arguments after --" in r.stdout
