#!/usr/bin/env bash
# The README's run command: sets up .venv and runs the embedded default on this machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
echo "[local] training pipeline not built yet: nothing to run"
exit 2
