#!/usr/bin/env bash
# The benchmark suite, one command: bash bench/run.sh [--quick|--full] [options]
# Sets up the project venv if needed, fetches the bench's own tools into bench/.tools/
# (Postfix's smtp-source and smtp-sink from the Debian package, aiosmtpd and matplotlib in
# venvs of their own), runs every scenario against every server interleaved, and writes
# bench/results/results.md, results.png and results.json. --help lists the options.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/twistd ] || bash scripts/setup.sh
exec .venv/bin/python -m bench "$@"
