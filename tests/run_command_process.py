"""One process of the two-process tests of `jaxground train`, `eval` and `predict` (`_processes.start_command`): 4 CPU
devices here, 8 in the global mesh, collectives over gloo. argv: PORT PROCESS_ID COMMAND [--fail-after-comparison=ERROR
| --fail-at-step=N] [command arguments ...] (`_processes.inject_failure`)."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py, for the one-process runs

from jaxground import cli

sys.path.insert(0, str(Path(__file__).parent))
from _processes import inject_failure


def main() -> int:
    port, pid, command, *args = sys.argv[1:]
    # a generous heartbeat: a parallel test run can starve one process of CPU for JAX's default 100 s
    return cli.main([command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid,
                     "--heartbeat-timeout", "300", *inject_failure(args)])


if __name__ == "__main__":
    sys.exit(main())
