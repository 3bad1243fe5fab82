#!/usr/bin/env bash
# Install (once) and run the whole test suite: unit, S3 (moto on 127.0.0.1), local Ray and `ray job submit` tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
