"""The CPU path must not need Triton (a plain `pip install .` may lack it: scripts/check_plain_install.sh
serves without it). Importing every server, engine, model and plugin module with `import triton` made to
fail catches a module-level kernel import in the CPU suite, where Triton is installed (one slipped
through to that check: prefill_graphs importing the paged-prefill kernel at module level)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import importlib, pkgutil, sys
sys.modules["triton"] = None  # `import triton` raises ImportError from here on
import actserve.server, actserve.interventions
failed = []
for pkg in (actserve.server, actserve.interventions):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if mod.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError as e:
            if "triton" in str(e):
                failed.append(f"{mod.name}: {e}")
print("\\n".join(failed))
"""


def test_cpu_modules_import_without_triton() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", "modules that import Triton at import time:\n" + out.stdout
