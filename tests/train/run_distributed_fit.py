"""One process of the two-process resume test: trains the toy task in WORKDIR for STEPS steps (resuming from
its latest checkpoint), 4 CPU devices here and 8 in the global mesh, collectives over gloo."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).parent))

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import toy_run

from jaxground import distributed


def main():
    port, pid, workdir, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    distributed.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout=300)  # see tests/run_command_process.py
    toy_run.fit(workdir, steps=steps)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
