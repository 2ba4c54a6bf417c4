"""One process of the two-process evaluation test: `jaxground eval` on 4 CPU devices here, 8 in the global mesh,
collectives over gloo. argv: PORT PROCESS_ID [--fail-after-comparison=ERROR] OUT [eval arguments ...]
(`_processes.inject_failure`)."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from jaxground import cli

sys.path.insert(0, str(Path(__file__).parents[1]))
from _processes import inject_failure


def main() -> int:
    port, pid, *rest = sys.argv[1:]
    out, *args = inject_failure(rest)
    # a generous heartbeat: a parallel test run can starve one process of CPU for JAX's default 100 s
    return cli.main(["eval", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid,
                     "--heartbeat-timeout", "300", "--out", out, *args])


if __name__ == "__main__":
    sys.exit(main())
