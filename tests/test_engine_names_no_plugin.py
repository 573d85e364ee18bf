"""The engine and everything below it name no intervention plugin (issue 11, docs/architecture.md §6).

import-linter's "engine, models, layers and contract name no plugin" contract forbids the imports; this
test forbids the names: identifiers, attributes, arguments, imported names and string literals (not
comments or docstrings) in server/engine, server/models, server/layers and server/contract must not
contain a word of a plugin's vocabulary. Plugins reach the engine only through the registry (options,
services, fused tables and graph widths that plugins declare).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["server/engine", "server/models", "server/layers", "server/contract"]
# words (split at "_", non-alphanumerics and camelCase) of the in-tree plugins' names and APIs
FORBIDDEN = {
    "steering",
    "steer",
    "cot",
    "compression",
    "asc",
    "library",
    "vectorlibrary",
    "vector",
    "structured",
    "grammar",
    "xgrammar",
    "matcher",
    "bitmask",
    "retrieval",
    "actqkv",
    "infllm",
    "quest",
}
# The one generic exception: the fused residual-add + per-row table add + RMSNorm kernel of
# actserve.kernels (below the contract; named for its first user) and StepHooks.steer, the slot that
# carries its per-row tensors to the layers. Any plugin with a fused table (`fused_table`) uses them.
ALLOWED = {
    "actserve.kernels.steer_rmsnorm",
    "actserve.kernels.steer_rmsnorm_ref",
    "SteeringTensors",
    "add_steer_rmsnorm",
    "add_steer_rmsnorm_ref",
    "apply_steering_ref",
    "steer",
}


def words(name: str) -> set[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return {w.lower() for w in re.split(r"[^A-Za-z0-9]+", name) if w}


def docstring_ids(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, name) of every identifier and non-docstring string literal."""
    docs = docstring_ids(tree)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name):
            yield line, node.id
        elif isinstance(node, ast.Attribute):
            yield line, node.attr
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield line, node.name
        elif isinstance(node, ast.arg):
            yield line, node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.value.lineno, node.arg
        elif isinstance(node, ast.ImportFrom):
            yield line, node.module or ""
            for alias in node.names:
                yield line, alias.name
                if alias.asname:
                    yield line, alias.asname
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield line, alias.name
                if alias.asname:
                    yield line, alias.asname
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield line, node.value


def plugin_names_in(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in names(ast.parse(path.read_text(encoding="utf-8"))):
            if name not in ALLOWED and words(name) & FORBIDDEN:
                found.append(f"{path.relative_to(ROOT)}:{line}: {name[:80]!r}")
    return found


def test_engine_models_layers_contract_name_no_plugin() -> None:
    found = [hit for folder in SCANNED for hit in plugin_names_in(folder)]
    assert not found, "plugin names below the registry:\n" + "\n".join(found)


def test_the_scan_sees_plugin_names() -> None:
    """The scan itself: a name, an attribute and a string literal are caught; docstrings are not."""
    src = '"""steering docstring"""\nx = eng.vector_library\ny = p["cot_compression"]\nMAX_STEERING = 8\n'
    hits = [name for _, name in names(ast.parse(src)) if words(name) & FORBIDDEN]
    assert hits.count("vector_library") == 1 and "cot_compression" in hits and "MAX_STEERING" in hits
    assert "steering docstring" not in hits


def test_source_tree_declares_the_installed_plugins() -> None:
    """Running from a checkout without metadata (the GPU machine) finds the same built-in plugins as the
    installed package's entry points."""
    from importlib.metadata import entry_points

    from actserve.interventions.registry import GROUP, source_tree_plugins

    installed = {
        e.name: e.value for e in entry_points(group=GROUP) if e.value.startswith("actserve.interventions.")
    }
    assert installed and source_tree_plugins() == installed
