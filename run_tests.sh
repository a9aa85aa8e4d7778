#!/usr/bin/env bash
# The test command: installs what the tests need into .venv and runs the whole pytest suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh requirements-dev.txt
exec "${STAR_VENV:-.venv}/bin/python" -m pytest -q "$@"
