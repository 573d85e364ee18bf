"""How many actserve files a request field crosses from the route to where it takes effect.

A live server (thread engine, TinyStories on the CPU) serves a request carrying the field; a profile
function records the Python call stack each time a *sink* of that field runs (the functions where the
value is handed across a thread or consumed: for `interventions` the plan preparation, the per-step hook
and the fused steering kernel; for `temperature` the sampling-parameter conversion and the sampler). The
union of the actserve files on those stacks is the path a newcomer follows for that field.

    python bench/field_path.py [--out bench/results/field_path.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "interventions", "kernels", "clients")

# (file, function, predicate on the frame's locals or None): where a field's value crosses or is used
Sink = tuple[str, str, Callable[[dict[str, Any]], bool] | None]
SINKS: dict[str, list[Sink]] = {
    "interventions": [
        ("server/engine/async_engine.py", "prepare_interventions", None),  # API side, before the hop
        ("interventions/steering/plugin.py", "prepare", None),  # worker thread: validation to a plan
        ("interventions/steering/plugin.py", "residual_hook", None),  # engine thread: plan to step hook
        ("kernels/steer_rmsnorm_ref.py", "add_steer_rmsnorm_ref", lambda loc: loc.get("steer") is not None),
    ],
    "temperature": [
        ("server/api/protocol.py", "sampling_params", None),
        ("server/engine/sampler.py", "_filter_", None),
    ],
}


def _rel(filename: str) -> str | None:
    if not filename.startswith(str(ROOT)):
        return None
    rel = Path(filename).relative_to(ROOT).as_posix()
    return rel if rel.split("/")[0] in PACKAGES else None


class Recorder:
    """A profile function installed before the server's threads start (Python < 3.12 cannot add one to
    running threads); while `sinks` is set, it adds the actserve files of the stack at each sink call."""

    def __init__(self) -> None:
        self.sinks: list[Sink] = []
        self.files: set[str] = set()

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if not self.sinks or event != "call":
            return
        rel = _rel(frame.f_code.co_filename)
        for file, func, pred in self.sinks:
            if rel == file and frame.f_code.co_name == func and (pred is None or pred(frame.f_locals)):
                f = frame
                while f is not None:
                    r = _rel(f.f_code.co_filename)
                    if r is not None:
                        self.files.add(r)
                    f = f.f_back

    def trace(self, url: str, body: dict[str, Any], sinks: list[Sink]) -> list[str]:
        self.files, self.sinks = set(), sinks
        try:
            httpx.post(f"{url}/v1/completions", json=body, timeout=120).raise_for_status()
        finally:
            self.sinks = []
        return sorted(self.files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/field_path.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import start_server

    rec = Recorder()
    threading.setprofile(rec)
    sys.setprofile(rec)
    server = start_server(ROOT / "tests/data/tinystories-656k", device="cpu", num_kv_blocks=64)
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    base = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    bodies = {
        "interventions": {
            **base,
            "interventions": {"steering": {"vectors": [{"directions": {"1": [0.5] * 128}}]}},
        },
        "temperature": {**base, "temperature": 0.8, "seed": 1},
    }
    result: dict[str, Any] = {"command": "python bench/field_path.py"}
    for field, body in bodies.items():
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).raise_for_status()  # warm-up
        files = rec.trace(server.url, body, SINKS[field])
        result[field] = {"files": len(files), "paths": files}
        print(f"{field:<14}{len(files):>3} files: {', '.join(files)}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
