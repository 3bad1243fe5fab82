#!/usr/bin/env bash
# Create ./.venv with the project and its test extra, at the exact versions of requirements.lock (scripts/lock.sh
# writes it; README: Reproducible installs). Safe to rerun: it reinstalls only when pyproject.toml or the lock
# changed. torch is installed first as the CPU wheel, so that resolving the project does not pull gigabytes of CUDA
# wheels; on a GPU machine install the CUDA build of the same torch version yourself (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="${LOCK:-requirements.lock}"
EXTRAS="${EXTRAS:-test}"
stamp="$VENV/.installed-$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
# The lock names torch without its build tag, so this takes the CPU wheel where one is offered (TORCH_INDEX, or
# pip's configured wheel cache) and the default build elsewhere.
"${pip[@]}" install --quiet -c "$LOCK" torch ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"${pip[@]}" install --quiet -c "$LOCK" -e ".[$EXTRAS]"
"${pip[@]}" check
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "installed into $VENV from $LOCK" >&2
