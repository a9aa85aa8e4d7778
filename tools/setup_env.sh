#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install STAR's requirements into it.
# Usage: source tools/setup_env.sh [requirements file]   (default: requirements.txt)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-$root/requirements.txt}"
venv="${STAR_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
