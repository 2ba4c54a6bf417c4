"""Two processes (4 CPU devices each, gloo over 127.0.0.1) take the same step as one process with 8."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_step import flat, run_steps

from jaxground import distributed

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port, out = free_port(), tmp_path / "two.npz"
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "run_distributed.py"), str(port), str(i), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    two = np.load(out)
    _, one, metrics, _ = run_steps((1, 4, 2), jax.devices())
    np.testing.assert_allclose(two["loss"], metrics[0]["loss"], atol=1e-5, rtol=0)
    ref = flat(one.model)
    assert set(ref) == set(two.files) - {"loss"}
    for k, v in ref.items():
        np.testing.assert_allclose(two[k], v, atol=1e-5, rtol=0, err_msg=k)


def test_initialize_flags_and_single_process(monkeypatch):
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() == "single"
    with pytest.raises(ValueError, match="--num-processes"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="--coordinator"):
        distributed.initialize(num_processes=2, process_id=0)
