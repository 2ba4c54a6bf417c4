"""One process of the two-process `jaxground train` tests (test_distributed.py): 4 CPU devices here, 8 in the global
mesh, collectives over gloo. argv: PORT PROCESS_ID
[--fail-after-comparison=ERROR] [train arguments ...] (`_processes.fail_after_comparison`)."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from jaxground import cli

sys.path.insert(0, str(Path(__file__).parents[1]))
from _processes import fail_after_comparison


def main() -> int:
    port, pid, *args = sys.argv[1:]
    args = fail_after_comparison(args)
    return cli.main(["train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid,
                     "--heartbeat-timeout", "300", *args])


if __name__ == "__main__":
    sys.exit(main())
