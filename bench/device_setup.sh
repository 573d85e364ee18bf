#!/usr/bin/env bash
# On the lent GPU machine: install carried wheels (.whl) and make `actserve.*` importable from this tree
# without a build (its image has torch, triton and transformers but not the web stack).
set -e
trap 'echo false' ERR  # a failed step stops `eval "$(bash bench/device_setup.sh)" && ...` too
# .whl is git-ignored: a device call must name it in `carry`, or nothing of the web stack is installed
ls .whl/*.whl >/dev/null 2>&1 || { echo "device_setup: no wheels in .whl (the run's carry must list .whl)" >&2; false; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/actserve
for d in server interventions kernels clients; do ln -sfn "$PWD/$d" "/tmp/site/actserve/$d"; done
# tests/conftest.py finds the third-party test plugins' entry points in .venv/test-plugins (scripts/setup.sh
# writes it; git ignores it): GPU tests that load them fail unless the device call carries that path
[ -d .venv/test-plugins ] || echo "device_setup: .venv/test-plugins not carried: tests using the test plugins will fail" >&2
echo "export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1"
