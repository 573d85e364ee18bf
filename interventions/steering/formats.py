"""Steering-vector files: safetensors and the GGUF control-vector format of repeng and llama.cpp.

Both hold one float tensor per layer, named `direction.{L}`, of length hidden_size.

Layer numbering. In both formats `direction.{L}` is added to the output of decoder block L, counted
from 0, which is exactly our layer L (DESIGN.md §5: what a forward hook on `model.layers[L]` sees), so
files map 1:1 with no offset. Evidence, read in the sources:
- llama.cpp applies a control vector in every model graph as `cur = ggml_add(ctx0, cur, ffn_inp);
  cur = build_cvec(cur, il); cb(cur, "l_out", il);`: tensor `il` is added to block il's output (after
  the FFN residual add). Its loader (`common_control_vector_load_one`) refuses `direction.0` ("invalid
  (zero) direction tensor layer index") and keeps layer il at offset n_embd*(il-1); `llama_set_adapter_cvec`
  copies that into `tensors[il]` for il = 1..n_layer-1. So llama.cpp never steers block 0's output.
- repeng `ControlModel` wraps `model_layer_list(model)[layer_id]` and adds `control.directions[layer_id]`
  to that module's output; `read_representations` trains layer L on `hidden_states[L + 1]` (the same
  point) and by default on layers n-1 .. 1 (`range(-1, -num_hidden_layers, -1)`); `export_gguf` writes
  `direction.{layer}` with that same index, `controlvector.layer_count = len(directions)`.
- (llama.cpp's own `cvector-generator` reads `l_out-{il}` for il = 0..n-2 and writes it as
  `direction.{il+1}`, so its vectors act one block after where they were measured. That is a property of
  those vectors, not of the format: we load them as the format says, like llama.cpp does.)

Consequences: a vector with a layer-0 direction is written as `direction.0` (repeng and we read it back);
llama.cpp refuses such a file. `controlvector.layer_count` is the number of direction tensors (what
both writers store), not the model's layer count; our own files add the model's layer count
(`actserve.num_layers` / `num_layers`) so a mismatch can be refused exactly.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ARCH = "controlvector"
GGUF_MAGIC = b"GGUF"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class VectorFormatError(ValueError):
    """A file that is not a valid steering-vector file (the message says what is wrong)."""


@dataclass
class VectorFile:
    """What a vector file holds, before it is checked against a model."""

    directions: dict[int, torch.Tensor]  # layer -> float32 [hidden] on the CPU
    model_hint: str = ""
    name: str | None = None
    num_layers: int | None = None  # the model's decoder-layer count, when the file says it
    layer_count: int | None = None  # GGUF/repeng `layer_count`: number of direction tensors written
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = ""

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).numel()


def _layer_of(tensor_name: str) -> int:
    prefix, _, index = tensor_name.partition(".")
    if prefix != "direction" or not index.isdigit():
        raise VectorFormatError(
            f"unexpected tensor {tensor_name!r}: a vector file holds only 'direction.<layer>' tensors"
        )
    return int(index)


def _check_directions(directions: dict[int, torch.Tensor], claimed_hidden: int | None) -> None:
    """Shapes, one common length and finite values; raises VectorFormatError naming the tensor."""
    if not directions:
        raise VectorFormatError("the file holds no 'direction.<layer>' tensors")
    sizes = {t.numel() for t in directions.values()}
    for layer, t in directions.items():
        if t.dim() != 1 or t.numel() == 0:
            raise VectorFormatError(f"direction.{layer}: shape {list(t.shape)}, expected a 1-D [hidden_size]")
        if not bool(torch.isfinite(t).all()):
            raise VectorFormatError(f"direction.{layer}: holds NaN or infinite values")
    if len(sizes) != 1:
        raise VectorFormatError(f"direction tensors differ in length: {sorted(sizes)}")
    if claimed_hidden is not None and claimed_hidden not in sizes:
        raise VectorFormatError(
            f"hidden_size: the file claims {claimed_hidden}, its tensors have {sizes.pop()}"
        )


def _int_or_none(value: object, key: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        out = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise VectorFormatError(f"{key}: not an integer: {value!r}") from None
    if out <= 0:
        raise VectorFormatError(f"{key}: must be positive, got {out}")
    return out


# -- safetensors ------------------------------------------------------------------------------------
def read_safetensors(data: bytes) -> VectorFile:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8:
        raise VectorFormatError("not a safetensors file: too short")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or data[8:9] != b"{":
        raise VectorFormatError("not a safetensors file: bad header")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except (ValueError, SafetensorError) as e:
        raise VectorFormatError(f"not a valid safetensors file: {e}") from None
    meta = (header.get("__metadata__") if isinstance(header, dict) else None) or {}
    if not isinstance(meta, dict):
        raise VectorFormatError("not a valid safetensors file: __metadata__ is not an object")
    directions: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        layer = _layer_of(key)
        if t.dtype not in FLOAT_DTYPES:
            raise VectorFormatError(f"{key}: dtype {t.dtype} is not a float type")
        directions[layer] = t.detach().to(torch.float32).contiguous()
    _check_directions(directions, _int_or_none(meta.get("hidden_size"), "hidden_size"))
    try:
        extra = json.loads(meta.get("metadata") or "{}")
    except ValueError:
        extra = {}
    return VectorFile(
        directions=dict(sorted(directions.items())),
        model_hint=str(meta.get("model_hint", "")),
        name=meta.get("name") or None,
        num_layers=_int_or_none(meta.get("num_layers"), "num_layers"),
        layer_count=_int_or_none(meta.get("layer_count"), "layer_count"),
        metadata={str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {},
        format="safetensors",
    )


def write_safetensors(
    directions: dict[int, torch.Tensor],
    model_hint: str,
    name: str,
    num_layers: int,
    metadata: dict[str, str] | None = None,
) -> bytes:
    from safetensors.torch import save

    tensors = {
        f"direction.{layer}": d.detach().float().cpu().contiguous() for layer, d in sorted(directions.items())
    }
    hidden = next(iter(tensors.values())).numel()
    meta = {
        "model_hint": model_hint,
        "layer_count": str(len(tensors)),
        "hidden_size": str(hidden),
        "name": name,
        "num_layers": str(num_layers),
        "metadata": json.dumps(metadata or {}),
    }
    return save(tensors, metadata=meta)


# -- GGUF (repeng / llama.cpp control vectors) ------------------------------------------------------
def _field(reader: object, key: str) -> object:
    f = reader.fields.get(key)  # type: ignore[attr-defined]
    if f is None or not len(f.types):
        return None
    try:
        if hasattr(f, "contents"):  # gguf >= 0.11
            return f.contents()
        from gguf import GGUFValueType

        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0] == GGUFValueType.STRING else value.tolist()[0]
    except Exception:  # noqa: BLE001 - a malformed field reads as absent, then is reported as such
        return None


def _gguf_tensor(t: object) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q

    kind = t.tensor_type  # type: ignore[attr-defined]
    name = t.name  # type: ignore[attr-defined]
    data = np.asarray(t.data)  # type: ignore[attr-defined]
    shape = [int(x) for x in t.shape]  # type: ignore[attr-defined]
    if kind in (Q.F32, Q.F16, Q.F64):
        out = torch.from_numpy(data.astype(np.float32).reshape(-1).copy())
    elif kind == Q.BF16:
        raw = np.ascontiguousarray(data).view(np.int16).reshape(-1).copy()
        out = torch.from_numpy(raw).view(torch.bfloat16).float()
    else:
        raise VectorFormatError(f"{name}: tensor type {Q(kind).name} is not a float type (F32 expected)")
    if len(shape) != 1:
        raise VectorFormatError(f"{name}: shape {shape}, expected a 1-D [hidden_size]")
    return out


def read_gguf(source: bytes | Path) -> VectorFile:
    """A GGUF control vector from bytes or a path; refuses other GGUF files (e.g. a model)."""
    from gguf import GGUFReader

    if isinstance(source, bytes):
        if source[:4] != GGUF_MAGIC:
            raise VectorFormatError("not a GGUF file: bad magic")
        with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
            f.write(source)
        try:
            return read_gguf(Path(f.name))
        finally:
            os.unlink(f.name)
    with open(source, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise VectorFormatError("not a GGUF file: bad magic")
    try:
        reader = GGUFReader(source)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not what it claims
        raise VectorFormatError(f"not a valid GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise VectorFormatError(
            f"general.architecture is {arch!r}, not {ARCH!r}: this GGUF file is not a control vector"
        )
    directions: dict[int, torch.Tensor] = {}
    try:
        tensors = list(reader.tensors)
    except Exception as e:  # noqa: BLE001
        raise VectorFormatError(f"not a valid GGUF file: {e}") from None
    for t in tensors:
        layer = _layer_of(t.name)
        if layer in directions:
            raise VectorFormatError(f"{t.name}: appears twice")
        directions[layer] = _gguf_tensor(t)
    hint = _field(reader, f"{ARCH}.model_hint")
    extra = _field(reader, "actserve.metadata")
    try:
        meta = json.loads(extra) if isinstance(extra, str) else {}
    except ValueError:
        meta = {}
    _check_directions(directions, _int_or_none(_field(reader, "actserve.hidden_size"), "hidden_size"))
    return VectorFile(
        directions=dict(sorted(directions.items())),
        model_hint=hint if isinstance(hint, str) else "",
        name=(n if isinstance(n := _field(reader, "actserve.name"), str) and n else None),
        num_layers=_int_or_none(_field(reader, "actserve.num_layers"), "num_layers"),
        layer_count=_int_or_none(_field(reader, f"{ARCH}.layer_count"), "layer_count"),
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        format="gguf",
    )


def write_gguf(
    directions: dict[int, torch.Tensor],
    model_hint: str,
    name: str,
    num_layers: int,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Laid out as repeng's `export_gguf` writes it, plus `actserve.*` keys that other readers ignore."""
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vector.gguf"
        writer = GGUFWriter(path, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        writer.add_string("actserve.name", name)
        writer.add_uint32("actserve.num_layers", num_layers)
        writer.add_uint32("actserve.hidden_size", next(iter(directions.values())).numel())
        writer.add_string("actserve.metadata", json.dumps(metadata or {}))
        for layer, d in sorted(directions.items()):
            writer.add_tensor(f"direction.{layer}", d.detach().float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


# -- either ------------------------------------------------------------------------------------------
def detect_format(data: bytes) -> str:
    """'gguf' or 'safetensors' from the first bytes (names and content types can lie)."""
    if data[:4] == GGUF_MAGIC:
        return "gguf"
    if len(data) >= 9 and data[8:9] == b"{":
        return "safetensors"
    raise VectorFormatError("not a safetensors or GGUF control-vector file (unrecognised header)")


def read_vector(data: bytes) -> VectorFile:
    return read_gguf(data) if detect_format(data) == "gguf" else read_safetensors(data)


def read_vector_path(path: Path) -> VectorFile:
    if path.suffix == ".gguf":
        return read_gguf(path)
    return read_vector(path.read_bytes())


def norms(directions: dict[int, torch.Tensor]) -> dict[int, float]:
    return {layer: float(d.double().norm()) for layer, d in directions.items()}
