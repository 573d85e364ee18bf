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
