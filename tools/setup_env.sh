#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv, install STAR's requirements into it, then STAR itself (editable).
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
# STAR itself, editable (pyproject.toml): this checkout on the venv's import path, so tools/ and bench/ scripts import
# its modules from any folder. Skipped when the venv already imports this checkout (re-runs work offline).
if ! (cd / && "$venv/bin/python" -c 'import importlib.util as u, pathlib, sys
s = u.find_spec("video")
sys.exit(not s or pathlib.Path(s.origin).resolve().parent != pathlib.Path(sys.argv[1]).resolve())' "$root"); then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root"
fi
