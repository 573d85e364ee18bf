"""Vector files: GGUF (repeng / llama.cpp control vectors) and safetensors, read and written, and files
that are not what they claim. No model needed."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from actserve.interventions.steering.formats import (
    VectorFormatError,
    detect_format,
    read_gguf,
    read_safetensors,
    read_vector,
    write_gguf,
    write_safetensors,
)

HIDDEN = 16


def dirs(*layers: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(layers))
    return {layer: torch.randn(HIDDEN, generator=g) for layer in layers}


def repeng_gguf(path: Path, directions: dict[int, np.ndarray], model_type: str = "llama") -> Path:
    """Exactly what repeng's ControlVector.export_gguf does."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_bytes(tmp_path: Path, arch: str, tensors: dict[str, np.ndarray], **raw: Any) -> bytes:
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(path, arch)
    for name, t in tensors.items():
        w.add_tensor(name, t, **raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_gguf_round_trip_ours_and_gguf_package(tmp_path: Path) -> None:
    d = dirs(0, 1, 5)
    data = write_gguf(d, "llama", "happy", 8, {"source": "test"})
    assert detect_format(data) == "gguf"
    back = read_vector(data)
    assert back.directions.keys() == d.keys() and back.format == "gguf"
    assert all(torch.equal(back.directions[k], d[k]) for k in d)
    assert (back.model_hint, back.name, back.num_layers, back.layer_count) == ("llama", "happy", 8, 3)
    assert back.metadata == {"source": "test"}
    # the reference reader sees the control-vector layout of repeng / llama.cpp, bit for bit
    (tmp_path / "v.gguf").write_bytes(data)
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.0", "direction.1", "direction.5"}
    for layer, vec in d.items():
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [HIDDEN]
        assert np.array_equal(np.asarray(t.data), vec.numpy())


def test_repeng_layout_keeps_layer_indices(tmp_path: Path) -> None:
    """repeng's key L is model.layers[L]'s output, which is our layer L: no offset on load."""
    d = {layer: v.numpy() for layer, v in dirs(1, 2, 3).items()}
    vf = read_gguf(repeng_gguf(tmp_path / "r.gguf", d, "mistral"))
    assert sorted(vf.directions) == [1, 2, 3]
    assert all(np.array_equal(vf.directions[k].numpy(), d[k]) for k in d)
    assert vf.model_hint == "mistral" and vf.layer_count == 3 and vf.num_layers is None and vf.name is None


def test_llama_cpp_generator_layout(tmp_path: Path) -> None:
    """cvector-generator writes layer_count as int32; half-precision tensors are accepted too."""
    path = tmp_path / "c.gguf"
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", 2)
    w.add_tensor("direction.1", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("direction.2", np.full(HIDDEN, 0.5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    vf = read_vector(path.read_bytes())
    assert vf.layer_count == 2 and torch.equal(vf.directions[2], torch.full((HIDDEN,), 0.5))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    d = dirs(0, 3)
    data = write_safetensors(d, "llama", "calm", 4, {"k": "v"})
    assert detect_format(data) == "safetensors"
    back = read_vector(data)
    assert all(torch.equal(back.directions[k], d[k]) for k in d)
    assert (back.name, back.num_layers, back.layer_count, back.metadata) == ("calm", 4, 2, {"k": "v"})
    (tmp_path / "v.safetensors").write_bytes(data)
    with safe_open(tmp_path / "v.safetensors", "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"direction.0", "direction.3"}
    assert meta["model_hint"] == "llama" and meta["hidden_size"] == str(HIDDEN) and meta["layer_count"] == "2"


def test_plain_safetensors_without_metadata() -> None:
    vf = read_safetensors(save({"direction.1": torch.ones(HIDDEN, dtype=torch.bfloat16)}))
    assert vf.name is None and vf.directions[1].dtype == torch.float32


def _nan() -> np.ndarray:
    a = np.ones(HIDDEN, dtype=np.float32)
    a[3] = np.nan
    return a


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("junk", "not a safetensors or GGUF"),
        ("empty", "not a safetensors or GGUF"),
        ("truncated", "not a valid GGUF"),
        ("model_gguf", "not a control vector"),
        ("int_tensor", "not a float type"),
        ("quantized", "not a float type"),
        ("nan", "NaN"),
        ("matrix", "1-D"),
        ("other_name", "unexpected tensor 'token_embd.weight'"),
        ("lengths", "differ in length"),
        ("no_tensors", "no 'direction.<layer>' tensors"),
        ("st_int", "not a float type"),
        ("st_nan", "NaN"),
        ("st_bad_header", "not a safetensors file"),
        ("st_claims_hidden", "hidden_size: the file claims 99"),
    ],
)
def test_files_that_are_not_what_they_claim(tmp_path: Path, case: str, match: str) -> None:
    ones = np.ones(HIDDEN, dtype=np.float32)
    cv = "controlvector"
    if case == "junk":
        data = b"this is certainly not a vector file"
    elif case == "empty":
        data = b""
    elif case == "truncated":
        data = write_gguf(dirs(1), "llama", "x", 2)[:60]
    elif case == "model_gguf":
        data = gguf_bytes(tmp_path, "llama", {"token_embd.weight": np.ones((4, HIDDEN), dtype=np.float32)})
    elif case == "int_tensor":
        data = gguf_bytes(tmp_path, cv, {"direction.1": np.ones(HIDDEN, dtype=np.int32)})
    elif case == "quantized":
        raw = np.zeros(34 * (HIDDEN // 32 + 1), dtype=np.uint8)
        data = gguf_bytes(tmp_path, cv, {"direction.1": raw}, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif case == "nan":
        data = gguf_bytes(tmp_path, cv, {"direction.1": _nan()})
    elif case == "matrix":
        data = gguf_bytes(tmp_path, cv, {"direction.1": np.ones((2, HIDDEN), dtype=np.float32)})
    elif case == "other_name":
        data = gguf_bytes(tmp_path, cv, {"token_embd.weight": ones})
    elif case == "lengths":
        data = gguf_bytes(tmp_path, cv, {"direction.1": ones, "direction.2": np.ones(8, dtype=np.float32)})
    elif case == "no_tensors":
        data = gguf_bytes(tmp_path, cv, {})
    elif case == "st_int":
        data = save({"direction.1": torch.ones(HIDDEN, dtype=torch.int64)})
    elif case == "st_nan":
        data = save({"direction.1": torch.from_numpy(_nan())})
    elif case == "st_bad_header":
        data = struct.pack("<Q", 10**9) + b"{}"
    else:  # st_claims_hidden
        data = save({"direction.1": torch.ones(HIDDEN)}, metadata={"hidden_size": "99"})
    with pytest.raises(VectorFormatError, match=match):
        read_vector(data)


# -- hostile and damaged files: always VectorFormatError, with a message that says what is wrong -------
def st_raw(header: bytes, body: bytes = b"") -> bytes:
    """A safetensors file from a raw JSON header (for headers the writer would refuse to make)."""
    return struct.pack("<Q", len(header)) + header + body


def deep_header(depth: int) -> bytes:
    return b'{"direction.1": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("st_superscript", "unexpected tensor 'direction.²'"),
        ("gguf_superscript", "unexpected tensor 'direction.²'"),
        ("st_arabic_digit", "unexpected tensor 'direction.٣'"),
        ("st_leading_zero_twice", "a second tensor for layer 1"),
        ("gguf_twice", "a second tensor for layer 1"),
        ("st_deep_header", "recursion limit"),
        ("st_deep_metadata", "metadata: JSON nested too deeply"),
        ("st_huge_metadata", "metadata: 70000 bytes of JSON; at most 65536"),
        ("st_huge_header", "header: .* bytes; a vector file's header is at most"),
        ("st_long_hint", "model_hint: 300 characters; at most 256"),
        ("st_float_count", "layer_count: not an integer"),
        ("st_count_mismatch", "layer_count: the header says 30 direction tensors, the file has 1"),
        (
            "gguf_count_mismatch",
            "controlvector.layer_count: the header says 30 direction tensors, the file has 2",
        ),
        ("gguf_many_tensors", "lists 1000000000 tensors; a control vector has at most 1024"),
        ("gguf_many_kv", "lists 4294967296 key/value pairs"),
        ("gguf_version", "version 7"),
        ("gguf_inf_count", "not an integer"),
    ],
)
def test_hostile_files_say_what_is_wrong(tmp_path: Path, case: str, match: str) -> None:
    ones = torch.ones(HIDDEN)
    cv = "controlvector"
    if case == "st_superscript":
        data = save({"direction.²": ones})
    elif case == "gguf_superscript":
        data = gguf_bytes(tmp_path, cv, {"direction.²": ones.numpy()})
    elif case == "st_arabic_digit":
        data = save({"direction.٣": ones})
    elif case == "st_leading_zero_twice":
        data = save({"direction.1": ones, "direction.01": ones.clone()})
    elif case == "gguf_twice":
        data = gguf_bytes(tmp_path, cv, {"direction.1": ones.numpy(), "direction.001": ones.numpy()})
    elif case == "st_deep_header":
        data = st_raw(deep_header(50_000))
    elif case == "st_deep_metadata":
        data = save(
            {"direction.1": ones}, metadata={"metadata": '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}"}
        )
    elif case == "st_huge_metadata":
        data = save({"direction.1": ones}, metadata={"metadata": " " * 70_000})
    elif case == "st_huge_header":
        data = save({"direction.1": ones}, metadata={"x": "y" * (2**20 + 10)})
    elif case == "st_long_hint":
        data = save({"direction.1": ones}, metadata={"model_hint": "h" * 300})
    elif case == "st_float_count":
        data = save({"direction.1": ones}, metadata={"layer_count": "1.5"})
    elif case == "st_count_mismatch":
        data = save({"direction.1": ones}, metadata={"layer_count": "30"})
    elif case == "gguf_count_mismatch":
        data = gguf_with_layer_count(tmp_path, 30)
    elif case in ("gguf_many_tensors", "gguf_many_kv", "gguf_version"):
        good = bytearray(write_gguf(dirs(1), "llama", "x", 4))
        if case == "gguf_many_tensors":
            good[8:16] = struct.pack("<Q", 10**9)
        elif case == "gguf_many_kv":
            good[16:24] = struct.pack("<Q", 2**32)
        else:
            good[4:8] = struct.pack("<I", 7)
        data = bytes(good)
    else:  # gguf_inf_count: a float where an integer belongs
        path = tmp_path / "f.gguf"
        w = gguf.GGUFWriter(path, cv)
        w.add_float32(f"{cv}.layer_count", float("inf"))
        w.add_tensor("direction.1", ones.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = path.read_bytes()
    with pytest.raises(VectorFormatError, match=match):
        read_vector(data)


def gguf_with_layer_count(tmp_path: Path, layer_count: int) -> bytes:
    """A repeng-style file with two direction tensors whose header claims `layer_count`."""
    path = tmp_path / "lc.gguf"
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", layer_count)
    for layer in (1, 2):
        w.add_tensor(f"direction.{layer}", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Damaged copies of a valid file: truncations, flipped bytes, overwritten runs, bytes inserted into
    and cut out of the header, and the header's length or count fields set to extreme values."""
    out = [data[:n] for n in sorted({int(x) for x in rng.integers(0, len(data), count // 4)})]
    head = min(len(data), 400)
    for _ in range(count):
        b = bytearray(data)
        kind = int(rng.integers(0, 5))
        at = int(rng.integers(0, head))
        if kind == 0:
            for i in rng.integers(0, len(b), int(rng.integers(1, 6))):
                b[int(i)] = int(rng.integers(0, 256))
        elif kind == 1:
            b[at : at + 8] = bytes(rng.integers(0, 256, 8, dtype=np.uint8))
        elif kind == 2:
            b[at:at] = rng.choice([b"[" * 64, b"\xff\xfe", b"\x00" * 9, "²".encode(), b'"'])
        elif kind == 3:
            del b[at : at + int(rng.integers(1, 16))]
        else:
            b[0 if data[:4] != b"GGUF" else 8 * int(rng.integers(1, 3)) : 8 + at % 16] = struct.pack(
                "<Q", int(rng.choice([0, 1, 2**31, 2**63 - 1, len(data)]))
            )[:8]
        out.append(bytes(b))
    return out


def test_fuzzed_files_raise_only_vector_format_error(tmp_path: Path) -> None:
    """Whatever the damage, reading either succeeds with finite 1-D float32 directions or raises
    VectorFormatError: never RecursionError, ValueError, KeyError, struct.error, ... from a parser."""
    rng = np.random.default_rng(1234)
    valid = [
        write_gguf(dirs(0, 1, 5), "llama", "happy", 8, {"source": "test"}),
        repeng_gguf(tmp_path / "r.gguf", {1: np.ones(HIDDEN, np.float32), 2: np.zeros(HIDDEN, np.float32)})
        .read_bytes(),
        write_safetensors(dirs(0, 3), "llama", "calm", 4, {"k": "v"}),
        save({"direction.1": torch.ones(HIDDEN, dtype=torch.bfloat16)}),
        st_raw(deep_header(5_000)),
    ]  # fmt: skip
    outcomes = {"ok": 0, "refused": 0}
    for data in valid:
        for bad in mutations(data, rng, 120):
            try:
                vf = read_vector(bad)
            except VectorFormatError as e:
                assert str(e) and len(str(e)) < 1000
                outcomes["refused"] += 1
                continue
            assert all(t.dtype == torch.float32 and t.dim() == 1 for t in vf.directions.values())
            assert all(bool(torch.isfinite(t).all()) for t in vf.directions.values())
            outcomes["ok"] += 1
    assert outcomes["refused"] > 300  # the mutations do damage; and a few leave a readable file
