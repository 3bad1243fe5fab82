#!/usr/bin/env bash
# Create ./.venv with the project and its test extra. Safe to rerun: it reinstalls only when pyproject.toml changed.
# torch is pinned to the CPU wheel first, so that resolving the project does not pull gigabytes of CUDA wheels;
# on a GPU machine install the CUDA build of torch into the environment yourself (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "installed into $VENV" >&2
