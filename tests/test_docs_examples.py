"""The examples of docs/api.md ("Examples") run as written against a live server on the embedded default
model: each code block, in order, with only the address swapped for the test server's. Docs whose
examples needed files that did not exist, or fields that had changed, fail here."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actserve.server.models.default_model import DEFAULT_MODEL_NAME
from tests.conftest import LiveServer, start_server

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def example_blocks() -> list[tuple[str, str]]:
    text = DOC.read_text()
    section = text[text.index("## Examples\n") :]
    section = section[: section.index("\n## ", 1)]
    return BLOCK.findall(section)


@pytest.fixture(scope="module")
def default_server(default_model_dir: Path) -> Iterator[LiveServer]:
    # named as `actserve serve` with no --model names it
    server = start_server(
        default_model_dir, num_kv_blocks=1024, engine_process="off", served_model_name=DEFAULT_MODEL_NAME
    )
    yield server
    server.stop()


def test_docs_examples_run_as_written(default_server: LiveServer, tmp_path: Path) -> None:
    blocks = example_blocks()
    assert {kind for kind, _ in blocks} == {"bash", "python"} and len(blocks) >= 4
    address = default_server.url.removeprefix("http://")
    for i, (kind, code) in enumerate(blocks):
        code = code.replace("localhost:8000", address)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"block {i} ({kind}) failed:\n{code}\n{run.stdout}\n{run.stderr}"
        assert '"error"' not in run.stdout, f"block {i} ({kind}) got an error:\n{run.stdout}"
