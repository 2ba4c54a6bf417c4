"""One process of the two-process `jaxground train` tests (test_distributed.py): 4 CPU devices here, 8 in the global
mesh, collectives over gloo. argv: PORT PROCESS_ID
[--fail-after-comparison=ERROR | --fail-at-step=N] [train arguments ...] (`_processes.inject_failure`)."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from jaxground import cli

sys.path.insert(0, str(Path(__file__).parents[1]))
from _processes import inject_failure


def main() -> int:
    port, pid, *args = sys.argv[1:]
    args = inject_failure(args)
    return cli.main(["train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid,
                     "--heartbeat-timeout", "300", *args])


if __name__ == "__main__":
    sys.exit(main())
