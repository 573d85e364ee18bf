"""bench/tp_bench.py's --cpu-smoke runs every part end to end on the CPU (gloo, tiny shapes): all-reduce
timing in two processes, decode with one and two ranks, the 70B stand-in against its roofline, greedy
agreement on TinyStories; its JSON holds the issue's keys with finite values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes of their own: seconds each

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "bench" / "tp_bench.py"), "--cpu-smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("tp2_speedup_b1_8b", "tp2_roofline_frac_b1_70b", "allreduce_us_8KB", "allreduce_us_512KB"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["decode_8b"]["tp2"]["tp"] == 2 and res["decode_70b"]["tp"] == 2
    # the split model holds the whole model's weights between its ranks (each about half)
    one, two = res["decode_8b"]["tp1"]["weight_bytes"], res["decode_8b"]["tp2"]["weight_bytes_per_rank"]
    assert len(two) == 2 and abs(sum(two) - one) < 0.01 * one and abs(two[0] - two[1]) < 0.05 * one
    assert res["tp2_greedy_agreement_tinystories"] == 1.0  # float32 on the CPU: the same greedy tokens
