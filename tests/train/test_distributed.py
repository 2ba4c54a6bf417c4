"""Two processes (4 CPU devices each, gloo over 127.0.0.1) take the same step as one process with 8, and
save and resume a run."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import toy_run
from test_loop import losses
from test_step import flat, run_steps

from jaxground import checkpoint, distributed

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(script: str, *args) -> None:
    """Runs `script PORT PROCESS_ID *args` as processes 0 and 1 of one run."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    procs = [
        subprocess.Popen([sys.executable, str(HERE / script), str(port), str(i), *map(str, args)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "two.npz"
    run_two("run_distributed.py", out)
    two = np.load(out)
    _, one, metrics, _ = run_steps((1, 4, 2), jax.devices())
    np.testing.assert_allclose(two["loss"], metrics[0]["loss"], atol=1e-5, rtol=0)
    ref = flat(one.model)
    assert set(ref) == set(two.files) - {"loss"}
    for k, v in ref.items():
        np.testing.assert_allclose(two[k], v, atol=1e-5, rtol=0, err_msg=k)


def test_two_processes_save_and_resume_each_its_own_data_state(tmp_path):
    work = tmp_path / "two"
    run_two("run_distributed_fit.py", work, 2)
    run_two("run_distributed_fit.py", work, 4)  # resumes at step 2: each host must get its own shard's state
    files = sorted((work / "checkpoints" / "4" / "data").glob("*.json"))
    assert [json.loads(f.read_text()) for f in files] == [{"index": 4, "shard": [0, 2]}, {"index": 4, "shard": [1, 2]}]
    for steps in (2, 4):
        toy_run.fit(tmp_path / "one", steps=steps)
    two, one = (losses(tmp_path / d) for d in ("two", "one"))
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]  # the same batches as one process reading them all
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), atol=1e-5, rtol=0)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"process_0-of-2.json.*none for this run's process_0-of-1"):
        toy_run.fit(work, steps=6)


def test_initialize_flags_and_single_process(monkeypatch):
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "JAXGROUND_MULTIHOST"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() == "single"
    with pytest.raises(ValueError, match="--num-processes"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="--coordinator"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="--heartbeat-timeout"):
        distributed.initialize("127.0.0.1:1234", 2, 0, heartbeat_timeout=0)


def test_heartbeat_timeout_reaches_jax(monkeypatch, capsys):
    """`--heartbeat-timeout` of train and eval reaches `jax.distributed.initialize`; without it JAX's default holds."""
    from jaxground import cli

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append(kw))
    distributed.initialize("127.0.0.1:1234", 2, 0, cpu_collectives=False, heartbeat_timeout=300)
    distributed.initialize("127.0.0.1:1234", 2, 0, cpu_collectives=False)
    assert calls == [{"num_processes": 2, "process_id": 0, "heartbeat_timeout_seconds": 300},
                     {"num_processes": 2, "process_id": 0}]
    for command in (["train"], ["eval", "--checkpoint", "none"]):
        assert cli.main([*command, "--config", "no_such_config.py", "--coordinator", "127.0.0.1:1234",
                         "--num-processes", "2", "--process-id", "0", "--heartbeat-timeout", "0"]) == 2
        assert "--heartbeat-timeout must be at least 1 second" in capsys.readouterr().err


def test_tpu_vm_launcher_opts_in_to_jax_detection(monkeypatch):
    """A Cloud TPU VM slice sets no variable to detect: launch/tpu_vm.sh asks for JAX's detection explicitly."""
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    script = (HERE.parents[1] / "launch" / "tpu_vm.sh").read_text()
    opt_in = re.search(r"(\w+)=(\S+) \.venv/bin/jaxground train", script)
    monkeypatch.setenv(opt_in[1], opt_in[2])
    assert distributed.initialize(cpu_collectives=False) == "auto" and calls == [((), {})]


def slurm_task(monkeypatch, *, tasks_per_node: int, gpus: int, localid: int, nodes: int = 2) -> list[int]:
    """The GPUs one simulated srun task of node 0 would drive: our arguments, then JAX's own SLURM detection."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": str(nodes * tasks_per_node),
           "SLURM_PROCID": str(localid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": "0",
           "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})", "SLURM_GPUS_ON_NODE": str(gpus)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    assert distributed.initialize(cpu_collectives=False) == "slurm"
    from jax._src import clusters

    *_, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, seen.get("local_device_ids"), "slurm", 300)
    return devices


def test_slurm_tasks_drive_every_gpu_of_a_node(monkeypatch):
    script = (HERE.parents[1] / "launch" / "gpu_slurm.sbatch").read_text()
    tasks, gpus = (int(re.search(rf"#SBATCH --{k}=(\d+)", script)[1]) for k in ("ntasks-per-node", "gpus-per-node"))
    used = [slurm_task(monkeypatch, tasks_per_node=tasks, gpus=gpus, localid=i) for i in range(tasks)]
    assert sorted(d for ds in used for d in ds) == list(range(gpus)), used  # the script: each GPU driven by exactly one task
    assert slurm_task(monkeypatch, tasks_per_node=1, gpus=8, localid=0) == list(range(8))
    assert slurm_task(monkeypatch, tasks_per_node=8, gpus=8, localid=5) == [5]
    with pytest.raises(ValueError, match="2 tasks on a node with 8 GPUs"):
        slurm_task(monkeypatch, tasks_per_node=2, gpus=8, localid=0)
