#!/usr/bin/env bash
# The first measurement on a GPU machine, as one command: writes ONE JSON (see jobs/gpu_check.py for its sections).
#
#   scripts/gpu_check.sh --out "$OUT/gpu_check.json"      # on the GPU machine: ~1 min start-up + < 6 min
#   scripts/gpu_check.sh --dry-run --out /tmp/check.json  # tiny config on the CPU, the CI smoke test
#
# Needs only python3 with torch (CUDA build), numpy, pyarrow, pillow, safetensors, fsspec; scikit-image for real
# photographs (synthetic pictures otherwise); Ray if present (the end-to-end section runs the job's stages in-process
# without it). Nothing is installed and nothing is downloaded. PYTHON picks the interpreter (default: .venv's python
# when it has torch, else python3). The whole run is capped at GPU_CHECK_TIMEOUT_S seconds (default 470, under the
# 8 minutes it is allowed); the JSON is rewritten after every section, so a cap loses only the section it hit.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout -k 15 "${GPU_CHECK_TIMEOUT_S:-470}" "$PYTHON" -m jobs.gpu_check "$@"
