#!/usr/bin/env bash
# Creates .venv and installs haraka_tw into it (editable, in compat mode so twistd's plugin
# scan sees twisted/plugins/), with the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
# Regenerate Twisted's plugin cache so `twistd haraka` is found.
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
