#!/usr/bin/env bash
# The quality gate CI runs before the tests (settings in pyproject.toml): ruff (lint + import order), then mypy.
# Fast: about a minute on a cold cache. `scripts/lint.sh --fix` lets ruff fix what it can first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check "$@" .
.venv/bin/mypy
