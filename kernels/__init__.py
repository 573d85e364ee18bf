"""Triton kernels, each beside its plain-torch reference (docs/architecture.md §1).

This folder is installed as `actserve.kernels`. Where the repository root is on sys.path (`python -m`
from the checkout, a Ray worker started there, pytest's rootdir) Python also finds it as a top-level
`kernels`, the name of Hugging Face's `kernels` distribution, which transformers >= 5.25 imports on
start. Imported under that name, this module hands the import to the installed distribution, so the
checkout never shadows it. Without one it stays this empty module: transformers (<= 5.24 probes the name
by importing it where no distribution metadata exists) must not see that import fail.
"""

import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this
        _spec.loader.exec_module(_module)
