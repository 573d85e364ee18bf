#!/usr/bin/env bash
# On the lent GPU, one call: the GPU tests, then benches, each under its own time limit so one slow part
# does not take the rest down. Writes logs and JSON under $OUT (default /tmp/gpu_session).
#   bash bench/gpu_session.sh "TEST FILES" "BENCH COMMAND; ..."   (after: eval "$(bash bench/device_setup.sh)")
set -uo pipefail
out="${OUT:-/tmp/gpu_session}"
mkdir -p "$out"
# the test plugins' metadata, for the tests only (the benches must not load them)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/test-plugins \
  tests/plugins/actserve_test_plugins >/dev/null 2>&1
tests="${1:-tests/test_gpu.py}"
# shellcheck disable=SC2086
PYTHONPATH="/tmp/test-plugins:$PYTHONPATH" timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu $tests \
  >"$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$?: $(tail -1 "$out/gpu_tests.log")"
IFS=';' read -ra benches <<<"${2:-}"
for b in "${benches[@]}"; do
  name=$(echo "$b" | awk '{print $2}' | xargs basename | sed 's/\.py$//')
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-200}" $b >"$out/$name.log" 2>&1
  echo "$name rc=$? in $(( $(date +%s) - start )) s"
  tail -12 "$out/$name.log"
done
