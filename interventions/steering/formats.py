"""Steering-vector files: safetensors and the GGUF control-vector format of repeng and llama.cpp.

Both hold one float tensor per layer, named `direction.{L}`, of length hidden_size.

Layer numbering. In both formats `direction.{L}` is added to the output of decoder block L, counted
from 0, which is exactly our layer L (docs/api.md, "Interventions: steering": what a forward hook
on `model.layers[L]` sees), so
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
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ARCH = "controlvector"
GGUF_MAGIC = b"GGUF"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() then refuses or reads differently
LAYER_NAME = re.compile(r"direction\.([0-9]{1,9})")
# Caps checked before any parsing work, so a hostile file costs little. A control vector has one tensor
# per decoder layer (no served model has 1024) and a few short strings.
MAX_TENSORS = 1024
MAX_KV_PAIRS = 256  # GGUF key/value pairs (ours writes 7, repeng 3)
MAX_HEADER_BYTES = 2**20  # safetensors JSON header
MAX_METADATA_BYTES = 64 * 2**10  # the vector's metadata as JSON (also the library's cap)
MAX_MODEL_HINT_CHARS = 256
MAX_FILE_BYTES = 64 * 2**20  # as the upload route's body limit
# errors of third-party parsers on malformed input: reported as VectorFormatError, never leaked
PARSE_ERRORS = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, struct.error
)  # fmt: skip


class VectorFormatError(ValueError):
    """A file that is not a valid steering-vector file (the message says what is wrong)."""


@contextmanager
def _parse_guard(kind: str) -> Iterator[None]:
    """Any parser failure on malformed bytes becomes a VectorFormatError (a 400, a skipped file)."""
    try:
        yield
    except VectorFormatError:
        raise
    except PARSE_ERRORS as e:
        raise VectorFormatError(f"not a valid {kind} file: {type(e).__name__}: {cut(str(e))}") from None


def cut(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters: error messages never echo a huge input back."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def preview(value: object) -> str:
    return cut(repr(value), 60)


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
    m = LAYER_NAME.fullmatch(tensor_name)
    if m is None:
        raise VectorFormatError(
            f"unexpected tensor {preview(tensor_name)}: a vector file holds only 'direction.<layer>' "
            "tensors (<layer>: 1 to 9 ASCII digits)"
        )
    return int(m.group(1))


def _add_direction(
    directions: dict[int, torch.Tensor], name: str, tensor: Callable[[], torch.Tensor]
) -> None:
    """directions[layer of `name`] = tensor(), refusing a second tensor for one layer (direction.01)."""
    layer = _layer_of(name)
    if layer in directions:
        raise VectorFormatError(f"{preview(name)}: a second tensor for layer {layer}")
    if len(directions) >= MAX_TENSORS:
        raise VectorFormatError(f"more than {MAX_TENSORS} direction tensors")
    directions[layer] = tensor()


def _check_layer_count(layer_count: int | None, directions: dict[int, torch.Tensor], key: str) -> None:
    """layer_count is the number of direction tensors (repeng, llama.cpp): a mismatch means a damaged
    or hand-edited file, and naming both numbers says so (not 'the vector has N layers')."""
    if layer_count is not None and layer_count != len(directions):
        raise VectorFormatError(
            f"{key}: the header says {layer_count} direction tensors, the file has {len(directions)} "
            f"(layers {sorted(directions)[:8]}{'...' if len(directions) > 8 else ''})"
        )


def _metadata(raw: object) -> dict[str, str]:
    """The vector's free-form metadata from its JSON text: capped in size; text that is not a JSON
    object (another tool's note) reads as no metadata."""
    if not isinstance(raw, str) or not raw:
        return {}
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise VectorFormatError(f"metadata: {size} bytes of JSON; at most {MAX_METADATA_BYTES}")
    try:
        extra = json.loads(raw)
    except RecursionError:
        raise VectorFormatError("metadata: JSON nested too deeply") from None
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {}


def _model_hint(raw: object) -> str:
    hint = raw if isinstance(raw, str) else ""
    if len(hint) > MAX_MODEL_HINT_CHARS:
        raise VectorFormatError(f"model_hint: {len(hint)} characters; at most {MAX_MODEL_HINT_CHARS}")
    return hint


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
    if isinstance(value, str) and not re.fullmatch(r"[+-]?[0-9]{1,12}", value.strip()):
        raise VectorFormatError(f"{key}: not an integer: {preview(value)}")
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer, str)):
        raise VectorFormatError(f"{key}: not an integer: {preview(value)}")
    out = int(value)
    if out <= 0:
        raise VectorFormatError(f"{key}: must be positive, got {out}")
    return out


# -- safetensors ------------------------------------------------------------------------------------
def read_safetensors(data: bytes) -> VectorFile:
    """A safetensors vector from its bytes; any malformed input raises VectorFormatError."""
    with _parse_guard("safetensors"):
        return _read_safetensors(data)


def _read_safetensors(data: bytes) -> VectorFile:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8:
        raise VectorFormatError("not a safetensors file: too short")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or data[8:9] != b"{":
        raise VectorFormatError("not a safetensors file: bad header")
    if header_len > MAX_HEADER_BYTES:
        raise VectorFormatError(
            f"header: {header_len} bytes; a vector file's header is at most {MAX_HEADER_BYTES}"
        )
    try:
        tensors = load(data)  # parses the header first, with a nesting limit
        header = json.loads(data[8 : 8 + header_len])  # accepted above, so shallow
    except (ValueError, RecursionError, SafetensorError) as e:
        raise VectorFormatError(f"not a valid safetensors file: {cut(str(e))}") from None
    meta = (header.get("__metadata__") if isinstance(header, dict) else None) or {}
    if not isinstance(meta, dict):
        raise VectorFormatError("not a valid safetensors file: __metadata__ is not an object")
    directions: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise VectorFormatError(f"{preview(key)}: dtype {t.dtype} is not a float type")
        _add_direction(directions, key, lambda t=t: t.detach().to(torch.float32).contiguous())
    _check_directions(directions, _int_or_none(meta.get("hidden_size"), "hidden_size"))
    layer_count = _int_or_none(meta.get("layer_count"), "layer_count")
    _check_layer_count(layer_count, directions, "layer_count")
    name = meta.get("name")
    return VectorFile(
        directions=dict(sorted(directions.items())),
        model_hint=_model_hint(meta.get("model_hint", "")),
        name=name if isinstance(name, str) and name else None,
        num_layers=_int_or_none(meta.get("num_layers"), "num_layers"),
        layer_count=layer_count,
        metadata=_metadata(meta.get("metadata")),
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
    name = preview(t.name)  # type: ignore[attr-defined]
    shape = [int(x) for x in t.shape]  # type: ignore[attr-defined]
    if kind not in (Q.F32, Q.F16, Q.F64, Q.BF16):
        try:
            kind_name = Q(kind).name
        except ValueError:
            kind_name = str(kind)
        raise VectorFormatError(f"{name}: tensor type {kind_name} is not a float type (F32 expected)")
    if len(shape) != 1:
        raise VectorFormatError(f"{name}: shape {shape}, expected a 1-D [hidden_size]")
    data = np.asarray(t.data)  # type: ignore[attr-defined]
    if kind == Q.BF16:
        raw = np.ascontiguousarray(data).view(np.int16).reshape(-1).copy()
        return torch.from_numpy(raw).view(torch.bfloat16).float()
    return torch.from_numpy(data.astype(np.float32).reshape(-1).copy())


def _check_gguf_counts(head: bytes) -> None:
    """Refuse before parsing a header that lists more tensors or keys than a control vector has: the
    reader walks each one in Python, so a crafted count would cost seconds."""
    if len(head) < 24:
        raise VectorFormatError("not a valid GGUF file: truncated header")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise VectorFormatError(f"not a valid GGUF file: version {version} (2 or 3 expected)")
    tensors, kv = struct.unpack("<QQ", head[8:24])
    if tensors > MAX_TENSORS:
        raise VectorFormatError(
            f"the header lists {tensors} tensors; a control vector has at most {MAX_TENSORS}"
        )
    if kv > MAX_KV_PAIRS:
        raise VectorFormatError(f"the header lists {kv} key/value pairs; at most {MAX_KV_PAIRS}")


def read_gguf(source: bytes | Path) -> VectorFile:
    """A GGUF control vector from bytes or a path; refuses other GGUF files (e.g. a model). Any
    malformed input raises VectorFormatError."""
    if isinstance(source, bytes):
        if source[:4] != GGUF_MAGIC:
            raise VectorFormatError("not a GGUF file: bad magic")
        _check_gguf_counts(source[:24])
        with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
            f.write(source)
        try:
            return read_gguf(Path(f.name))
        finally:
            os.unlink(f.name)
    with open(source, "rb") as fh:
        head = fh.read(24)
    if head[:4] != GGUF_MAGIC:
        raise VectorFormatError("not a GGUF file: bad magic")
    _check_gguf_counts(head)
    with _parse_guard("GGUF"):
        return _read_gguf(source)


def _read_gguf(source: Path) -> VectorFile:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(source)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not what it claims
        raise VectorFormatError(f"not a valid GGUF file: {cut(str(e))}") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise VectorFormatError(
            f"general.architecture is {preview(arch)}, not {ARCH!r}: this GGUF file is not a control vector"
        )
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        _add_direction(directions, t.name, lambda t=t: _gguf_tensor(t))
    _check_directions(directions, _int_or_none(_field(reader, "actserve.hidden_size"), "hidden_size"))
    layer_count = _int_or_none(_field(reader, f"{ARCH}.layer_count"), f"{ARCH}.layer_count")
    _check_layer_count(layer_count, directions, f"{ARCH}.layer_count")
    name = _field(reader, "actserve.name")
    return VectorFile(
        directions=dict(sorted(directions.items())),
        model_hint=_model_hint(_field(reader, f"{ARCH}.model_hint")),
        name=name if isinstance(name, str) and name else None,
        num_layers=_int_or_none(_field(reader, "actserve.num_layers"), "num_layers"),
        layer_count=layer_count,
        metadata=_metadata(_field(reader, "actserve.metadata")),
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
    """A vector file from disk (the folder of --steering-vectors); larger than any vector is refused."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise VectorFormatError(f"{size} bytes; a vector file is at most {MAX_FILE_BYTES}")
    if path.suffix == ".gguf":
        return read_gguf(path)
    return read_vector(path.read_bytes())


def norms(directions: dict[int, torch.Tensor]) -> dict[int, float]:
    return {layer: float(d.double().norm()) for layer, d in directions.items()}
