"""Subprocess entry for the loop tests: trains the toy task in WORKDIR; `--kill-at N` SIGKILLs itself at
step N once the checkpoint of step N-1 is on disk (a crash, not a clean stop)."""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import toy_run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kill-at", type=int, default=0)
    args = p.parse_args()

    def kill(step, state, metrics):
        if step == args.kill_at:
            while not (Path(args.workdir) / "checkpoints" / str(step - 1) / "meta").exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    toy_run.fit(args.workdir, steps=args.steps, hooks=[kill])


if __name__ == "__main__":
    main()
