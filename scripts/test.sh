#!/usr/bin/env bash
# Install (once) and run the whole test suite: unit, S3 (moto on 127.0.0.1), local Ray and `ray job submit` tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Byte-compile the checkout first. Where PYTHONDONTWRITEBYTECODE is set (it is on the CI machines), Python never writes
# the project's .pyc files, so every process of every test job (drivers, inference actors, decode and writer workers:
# hundreds in a run) compiles the modules it imports again: 0.15-0.25 s of CPU each for a worker's imports, against
# 0.08-0.13 s from .pyc files (measured on the 2-core test machine). Compiling all of them takes about half a second.
.venv/bin/python -m compileall -q -j 0 model pipeline jobs search fixtures benchmarks tests > /dev/null
exec .venv/bin/python -m pytest "$@"
