#!/usr/bin/env bash
# Sets everything up and runs the server in the foreground on the shipped defaults:
# 127.0.0.1:2525, mail for localhost and example.com into ./var/maildir, no relaying.
# Extra arguments go to the haraka command, e.g. --config /etc/haraka.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/twistd -n haraka "$@"
