#!/usr/bin/env bash
# Install (once) and run the classification job end to end on the embedded default: Ray in-process, local storage,
# a generated sample data set. Extra flags go to `python -m jobs.demo` (e.g. --model /path/to/checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m jobs.demo "$@"
