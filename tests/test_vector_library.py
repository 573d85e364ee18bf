"""VectorLibrary: checks against the model, names, persistence in a folder, preload that skips bad files."""

from __future__ import annotations

import logging
import struct
import threading
from pathlib import Path

import pytest
import torch

from actserve.interventions.steering.formats import write_gguf, write_safetensors
from actserve.interventions.steering.library import (
    LibraryError,
    VectorExists,
    VectorLibrary,
    VectorNotFound,
)
from actserve.server.contract import ModelInfo

LAYERS, HIDDEN = 4, 16


@pytest.fixture
def info() -> ModelInfo:
    return ModelInfo(
        name="m", path="", architecture="LlamaForCausalLM", implementation="native", num_layers=LAYERS,
        hidden_size=HIDDEN, vocab_size=32, max_model_len=64, dtype=torch.float32,
        device=torch.device("cpu"), model_type="llama",
    )  # fmt: skip


def d(seed: int, n: int = HIDDEN) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_add_get_list_delete(info: ModelInfo) -> None:
    lib = VectorLibrary(info)
    vec = lib.add(lib.build("happy", {1: d(1), 3: d(3)}))
    assert lib.get("happy") is vec and [v.name for v in lib.list()] == ["happy"]
    assert vec.model_hint == "llama" and vec.layers == [1, 3] and vec.num_layers == LAYERS
    assert vec.norms[1] == pytest.approx(float(d(1).norm()))
    summary = vec.summary()
    assert summary["norms"].keys() == {"1", "3"} and summary["hidden_size"] == HIDDEN
    with pytest.raises(VectorExists):
        lib.add(lib.build("happy", {0: d(0)}))
    lib.add(lib.build("happy", {0: d(0)}), replace=True)
    assert lib.get("happy").layers == [0]
    lib.delete("happy")
    with pytest.raises(VectorNotFound):
        lib.get("happy")
    with pytest.raises(VectorNotFound):
        lib.delete("happy")


@pytest.mark.parametrize(
    ("kwargs", "param", "match"),
    [
        ({"directions": {}}, "directions", "at least one layer"),
        ({"directions": {LAYERS: d(0)}}, f"directions.{LAYERS}", "out of range"),
        ({"directions": {-1: d(0)}}, "directions.-1", "out of range"),
        ({"directions": {1: d(0, 12)}}, "directions.1", "hidden_size: directions.1 has 12 values"),
        ({"directions": {1: torch.full((HIDDEN,), float("inf"))}}, "directions.1", "finite"),
        ({"directions": {1: d(0)}, "num_layers": 30}, "num_layers", "made for a model with 30"),
        ({"directions": {1: d(0)}, "layer_count": 29}, "layer_count", "29 direction tensors"),
        ({"directions": {1: d(0)}, "name": "../etc"}, "name", "vector name"),
        ({"directions": {1: d(0)}, "name": ""}, "name", "vector name"),
    ],
)
def test_mismatches_name_the_field(info: ModelInfo, kwargs: dict, param: str, match: str) -> None:
    lib = VectorLibrary(info)
    name = kwargs.pop("name", "v")
    with pytest.raises(LibraryError, match=match) as e:
        lib.build(name, **kwargs)
    assert e.value.param == param and e.value.status == 400


def test_combine(info: ModelInfo) -> None:
    lib = VectorLibrary(info)
    lib.add(lib.build("a", {0: d(0), 1: d(1)}))
    lib.add(lib.build("b", {1: d(2), 2: d(3)}))
    c = lib.combine("a_minus_b", [("a", 1.0), ("b", -2.0)])
    assert c.layers == [0, 1, 2]
    assert torch.allclose(c.directions[1], d(1) - 2 * d(2)) and torch.allclose(c.directions[2], -2 * d(3))
    with pytest.raises(VectorNotFound) as e:
        lib.combine("x", [("a", 1.0), ("nope", 1.0)])
    assert e.value.param == "combine[1].name"


def test_persistence_and_preload(info: ModelInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lib = VectorLibrary(info, tmp_path)
    lib.add(lib.build("kept", {2: d(2)}))
    lib.add(lib.build("gone", {1: d(1)}))
    lib.delete("gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]
    # files placed by hand: a repeng-style GGUF, one for another model, one that is junk
    (tmp_path / "repeng.gguf").write_bytes(write_gguf({1: d(5), 3: d(6)}, "llama", "ignored", LAYERS))
    (tmp_path / "wide.safetensors").write_bytes(write_safetensors({1: d(0, 64)}, "llama", "wide", LAYERS))
    (tmp_path / "deep.gguf").write_bytes(write_gguf({1: d(0)}, "llama", "deep", 32))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    (tmp_path / "notes.txt").write_text("ignored: not a vector suffix")
    with caplog.at_level(logging.WARNING):
        again = VectorLibrary(info, tmp_path)
    assert [v.name for v in again.list()] == ["kept", "repeng"]  # named by file stem
    assert torch.equal(again.get("kept").directions[2], d(2))
    assert again.get("repeng").layers == [1, 3]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert all(f in skipped for f in ("wide.safetensors", "deep.gguf", "junk.gguf"))
    assert "hidden_size" in skipped and "num_layers" in skipped
    # replacing a GGUF-loaded vector saves it as safetensors and drops the old file
    again.add(again.build("repeng", {0: d(7)}), replace=True)
    assert not (tmp_path / "repeng.gguf").exists() and (tmp_path / "repeng.safetensors").exists()


def test_concurrent_adds(info: ModelInfo, tmp_path: Path) -> None:
    lib = VectorLibrary(info, tmp_path)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                lib.add(lib.build(f"v{i}-{j}", {j % LAYERS: d(i * 10 + j)}))
                lib.add(lib.build("shared", {0: d(i)}), replace=True)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(lib) == 41
    assert len(list(tmp_path.glob("*.safetensors"))) == 41 and not list(tmp_path.glob(".*tmp"))


def test_preload_skips_each_bad_file_with_one_warning(
    info: ModelInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files the parsers cannot read never stop the start: each is skipped with one warning that names
    the file and the reason; the good ones load."""
    from safetensors.torch import save

    ones = torch.ones(HIDDEN)
    good = write_safetensors({1: d(1)}, "llama", "good", LAYERS)
    bad = {
        "superscript.safetensors": (save({"direction.²": ones}), "unexpected tensor 'direction.²'"),
        "deep.safetensors": (
            struct.pack("<Q", 100_012) + b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}" + b" " * 6,
            "recursion limit",
        ),
        "truncated.safetensors": (good[: len(good) - 9], "not a valid safetensors file"),
        "ints.safetensors": (
            save({"direction.1": torch.ones(HIDDEN, dtype=torch.int32)}),
            "not a float type",
        ),
        "nan.safetensors": (save({"direction.1": torch.full((HIDDEN,), float("nan"))}), "NaN"),
        "truncated.gguf": (write_gguf({1: d(1)}, "llama", "c", LAYERS)[:-3], "not a valid GGUF file"),
        "meta.safetensors": (
            write_safetensors({1: d(1)}, "llama", "m", LAYERS, {"k": "v" * 70_000}),
            "metadata: ",
        ),
    }
    for name, (data, _) in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "good.safetensors").write_bytes(good)
    with caplog.at_level(logging.WARNING):
        lib = VectorLibrary(info, tmp_path)
    assert [v.name for v in lib.list()] == ["good"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, (_, reason) in bad.items():
        mine = [w for w in warnings if name in w]
        assert len(mine) == 1 and reason in mine[0], (name, mine)


def test_model_hint_of_another_family_is_accepted_with_a_warning(
    info: ModelInfo, caplog: pytest.LogCaptureFixture
) -> None:
    lib = VectorLibrary(info)
    assert lib.build("same", {1: d(1)}, model_hint="llama").warnings == ()
    assert lib.build("arch", {1: d(1)}, model_hint="LlamaForCausalLM").warnings == ()
    assert lib.build("none", {1: d(1)}, model_hint="").warnings == ()
    with caplog.at_level(logging.WARNING):
        vec = lib.add(lib.build("other", {1: d(1)}, model_hint="qwen2"))
    (warning,) = vec.warnings
    assert "'qwen2'" in warning and "model_hint" in warning
    assert vec.summary()["warnings"] == [warning] and warning in caplog.text


def test_metadata_and_hint_caps(info: ModelInfo) -> None:
    lib = VectorLibrary(info)
    with pytest.raises(LibraryError, match="at most 65536") as e:
        lib.build("v", {1: d(1)}, metadata={"k": "x" * 70_000})
    assert e.value.param == "metadata"
    with pytest.raises(LibraryError, match="at most 256") as e:
        lib.build("v", {1: d(1)}, model_hint="h" * 257)
    assert e.value.param == "model_hint"
    with pytest.raises(LibraryError, match=f"5 layers; this model .* has {LAYERS}"):
        lib.build("v", {i: d(i) for i in range(5)})
    with pytest.raises(LibraryError) as e:
        lib.build("x" * 10_000, {1: d(1)})
    assert len(str(e.value)) < 300  # a huge name is not echoed back


def test_pages_and_list_summary_without_metadata(info: ModelInfo) -> None:
    lib = VectorLibrary(info)
    for i in range(5):
        lib.add(lib.build(f"v{i}", {1: d(i)}, metadata={"k": "v" * 1000}))
    first, more = lib.page(2)
    assert [v.name for v in first] == ["v0", "v1"] and more
    rest, more = lib.page(10, after="v1")
    assert [v.name for v in rest] == ["v2", "v3", "v4"] and not more
    assert "metadata" not in first[0].summary(metadata=False) and first[0].summary()["metadata"]["k"]


def test_servers_sharing_the_folder_see_each_others_changes(info: ModelInfo, tmp_path: Path) -> None:
    """Two libraries on one folder (two replicas on a shared volume): an add, a replace and a delete
    through one are seen by the other at its next read; an add of a name the other stored first is a 409
    even when the other's in-memory view is stale (the file is created only if absent)."""
    a, b = VectorLibrary(info, tmp_path), VectorLibrary(info, tmp_path)
    a.add(a.build("calm", {1: d(1)}))
    assert torch.equal(b.get("calm").directions[1], d(1)) and "calm" in b and len(b) == 1
    a.add(a.build("calm", {2: d(2)}), replace=True)
    assert b.get("calm").layers == [2] and torch.equal(b.get("calm").directions[2], d(2))
    b.add(b.build("brief", {0: d(3)}))
    assert [v.name for v in a.list()] == ["brief", "calm"]
    a.delete("calm")
    with pytest.raises(VectorNotFound):
        b.get("calm")
    with pytest.raises(VectorNotFound):
        b.delete("calm")
    with pytest.raises(VectorExists):
        a.add(a.build("brief", {1: d(4)}))
    # the race: b stores "late" after a's last look; a's add without replace must not overwrite it
    a.list()
    b.add(b.build("late", {1: d(5)}))
    assert not a._write(tmp_path / "late.safetensors", b"x", exclusive=True)
    assert torch.equal(a.get("late").directions[1], d(5)) and not list(tmp_path.glob(".*tmp"))
