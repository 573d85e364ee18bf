"""The committed text of bench/fp4_quality.py: files match the manifest's sha256, calibration and held-out
sets share no document and no 20-word span, and the committed results were made from these files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "fp4_quality"
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "fp4_quality.json"
SPAN = 20  # words


def manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text())


def docs(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (DATA / name).read_text().splitlines()]


def spans(texts: list[str]) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        words = t.split()
        out.update(tuple(words[i : i + SPAN]) for i in range(len(words) - SPAN + 1))
    return out


def test_files_match_manifest() -> None:
    files = manifest()["files"]
    assert set(files) == {p.name for p in DATA.glob("*.jsonl")}
    for name, info in files.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == info["sha256"], name
        assert len(docs(name)) == info["documents"]


@pytest.mark.parametrize("model", ["smollm2", "tinystories"])
def test_calibration_and_heldout_disjoint(model: str) -> None:
    split = manifest()["split"][model]
    calib, heldout = docs(split["calibration"]), docs(split["heldout"])
    assert calib and heldout and all(d.strip() for d in calib + heldout)
    assert not set(calib) & set(heldout)
    assert not spans(calib) & spans(heldout)


def test_results_used_the_committed_data() -> None:
    files = manifest()["files"]
    results = json.loads(RESULTS.read_text())
    for model in ("smollm2", "tinystories"):
        used = results["models"][model]["data"]
        assert used == {name: files[name]["sha256"] for name in used}
        assert set(used) == set(manifest()["split"][model].values())
