#!/usr/bin/env bash
# The README's test command: sets up .venv with the torch and dev extras and runs the whole suite.
# Extra arguments go to pytest (e.g. `bash launch/test.sh tests/models -k llama`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" torch,dev
exec python -m pytest -n 2 --dist loadfile "$@"
