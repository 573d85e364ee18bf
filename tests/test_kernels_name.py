"""The source folder kernels/ (installed as actserve.kernels) never shadows Hugging Face's `kernels`
distribution, which transformers >= 5.25 imports on start, even with the repository root first on sys.path
(`python -m` from the checkout, a Ray worker started there): kernels/__init__.py hands the import over."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
try:
    import kernels
except ModuleNotFoundError as e:
    print("missing", e.name)
else:
    print("found", kernels.__file__)
import actserve.kernels.gemv_ref as g
print("ours", g.__file__)
"""


def _distribution_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_top_level_kernels_is_never_the_source_folder() -> None:
    # `-c` from the repository root: the root ('') leads sys.path, as under `python -m actserve.server`
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split("\n")
    kind, where = out[0].split(" ", 1)
    if _distribution_installed():
        assert kind == "found"
        assert Path(where).resolve() != ROOT / "kernels" / "__init__.py", where
    else:  # the source folder, empty under that name (what transformers' probe imports)
        assert kind == "found" and Path(where).resolve() == ROOT / "kernels" / "__init__.py", where
    assert Path(out[1].split(" ", 1)[1]).resolve() == ROOT / "kernels" / "gemv_ref.py"


def test_transformers_imports_from_the_repository_root() -> None:
    code = "import transformers.integrations.hub_kernels, transformers; print(transformers.__version__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
