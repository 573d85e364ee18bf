#!/usr/bin/env bash
# On the lent GPU: an A/B of bench/gpu_bench.py between an older tree and this one, alternating
# old/new twice, each run in its own process, so that a change to a hot path is measured beside its
# baseline on the same machine. Make the older tree here first:
#   git archive --format=tar REV server interventions kernels clients bench > .carry/old.tar
# then, there (after `eval "$(bash bench/device_setup.sh)"`, with .carry and .whl carried):
#   bash bench/gpu_ab.sh [gpu_bench args; default: --decode-only --skip-hf --batches 1,8,64]
# REPS=1 runs old/new once (for long commands within one device call; default 2).
# Writes old1/new1/old2/new2.json and ab.json under $OUT (else /tmp/gpu_ab), logs under /tmp/gpu_ab_logs,
# and prints a table.
set -euo pipefail
out="${OUT:-/tmp/gpu_ab}"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--decode-only --skip-hf --batches 1,8,64)
mkdir -p "$out" /tmp/gpu_ab_old /tmp/gpu_ab_site/actserve /tmp/gpu_ab_logs
logs=/tmp/gpu_ab_logs
tar -xf .carry/old.tar -C /tmp/gpu_ab_old
for d in server interventions kernels clients; do ln -sfn "/tmp/gpu_ab_old/$d" "/tmp/gpu_ab_site/actserve/$d"; done
here="$PWD"
reps="${REPS:-2}"
for i in $(seq 1 "$reps"); do
  (cd /tmp/gpu_ab_old && PYTHONPATH="/tmp/gpu_ab_site:$PYTHONPATH" python bench/gpu_bench.py "${args[@]}" \
    --out "$out/old$i.json" >"$logs/old$i.log" 2>&1) || { tail -30 "$logs/old$i.log"; exit 1; }
  python bench/gpu_bench.py "${args[@]}" --out "$out/new$i.json" >"$logs/new$i.log" 2>&1 || { tail -30 "$logs/new$i.log"; exit 1; }
done
python - "$out" "$here" "${args[*]}" <<'PY'
import json, statistics, sys
from pathlib import Path

out, here, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
names = [n for n in ("old1", "new1", "old2", "new2") if (out / f"{n}.json").exists()]
runs = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
keys = [k for k in runs["new1"] if k.startswith(("engine_tok_s_b", "steer_overhead", "ttft_ms", "http_"))]
table = {}
for k in keys:
    old = [runs[n].get(k) for n in names if n.startswith("old")]
    new = [runs[n].get(k) for n in names if n.startswith("new")]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in old + new):
        continue
    table[k] = {"old": old, "new": new, "new_over_old": statistics.mean(new) / statistics.mean(old)}
doc = {"command": f"bash bench/gpu_ab.sh {args}", "device": runs["new1"].get("device"), "table": table}
(out / "ab.json").write_text(json.dumps(doc, indent=1))
print(f"{'metric':<28}{'old':>22}{'new':>22}{'new/old':>9}")
for k, r in table.items():
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"{k:<28}{fmt(r['old']):>22}{fmt(r['new']):>22}{r['new_over_old']:>9.3f}")
PY
