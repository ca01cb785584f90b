#!/usr/bin/env bash
# Sets everything up (.venv, the package, the test tools) and runs every check:
# ruff (lint and format), mypy strict, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check haraka_tw twisted tests docs/examples bench
.venv/bin/ruff format --check haraka_tw twisted tests docs/examples bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest -p no:cacheprovider "$@"
