"""The server's named steering vectors, checked against the loaded model, optionally kept in a folder.

Requests name vectors (`{"name": "happy", "scale": 4}`); the steering plugin copies a vector's data
into its plan at `prepare`, so deleting or replacing a vector never changes a request already running.
With a folder (`--steering-vectors DIR`) every *.safetensors / *.gguf in it loads at start (files that
do not fit the model are skipped with a log line) and vectors added later are saved there as
`<name>.safetensors`; deleting a vector deletes its file, so the folder is the library across restarts.

Several servers may share the folder (replicas on Ray Serve or Kubernetes, on a shared volume): each
looks at the folder's modification time before it reads the library and re-reads what changed (files
added, replaced or removed), so a vector uploaded, trained or deleted through one is seen by all. Files
are written to a temporary name and renamed into place, which changes the folder's time. A folder
changed less than `SETTLE_S` before the last look is looked at again (file systems with coarse
timestamps can give two changes the same time). An add without `replace` that races another server's
add of the same name loses with a 409 (the file is created only if absent).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actserve.interventions.steering import formats
from actserve.interventions.steering.formats import (
    MAX_METADATA_BYTES,
    MAX_MODEL_HINT_CHARS,
    VectorFile,
    VectorFormatError,
    preview,
)
from actserve.server.contract import ModelInfo

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUFFIXES = (".safetensors", ".gguf")
# llama.cpp converts some HF model types to another GGUF architecture: its control vectors say that one
HINT_ALIASES = {"mistral": ("llama",), "mixtral": ("llama",)}
SETTLE_S = 2.0


class LibraryError(ValueError):
    """A library operation that cannot be done; `status` is the HTTP status, `param` the field."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class VectorNotFound(LibraryError):
    status = 404


class VectorExists(LibraryError):
    status = 409


class VectorStorageError(LibraryError):
    status = 500


@dataclass(frozen=True)
class StoredVector:
    """One named vector. Directions are float32 CPU tensors that nobody mutates after `add`."""

    name: str
    directions: dict[int, torch.Tensor]
    model_hint: str
    hidden_size: int
    num_layers: int
    created: float = field(default_factory=time.time)
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # accepted, but worth telling (e.g. a model_hint of another family)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def norms(self) -> dict[int, float]:
        return formats.norms(self.directions)

    def summary(self, metadata: bool = True) -> dict[str, Any]:
        """The JSON of one vector without its directions; the list leaves out `metadata` (up to 64 KiB
        each), so a page of the list stays small."""
        out = {
            "object": "steering.vector",
            "name": self.name,
            "layers": self.layers,
            "norms": {str(k): v for k, v in sorted(self.norms.items())},
            "model_hint": self.model_hint,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "created": int(self.created),
            "warnings": list(self.warnings),
        }
        if metadata:
            out["metadata"] = dict(self.metadata)
        return out

    def to_bytes(self, fmt: str) -> bytes:
        write = formats.write_gguf if fmt == "gguf" else formats.write_safetensors
        return write(self.directions, self.model_hint, self.name, self.num_layers, self.metadata)


def check_name(name: object, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LibraryError(
            f"{param}: a vector name is 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit; got {preview(name)}",
            param,
        )
    return name


def check_metadata(metadata: dict[str, str] | None, model_hint: str | None) -> dict[str, str]:
    """Caps on what a vector carries besides its directions (the list and every file repeat it)."""
    if model_hint is not None and len(model_hint) > MAX_MODEL_HINT_CHARS:
        raise LibraryError(
            f"model_hint: {len(model_hint)} characters; at most {MAX_MODEL_HINT_CHARS}", "model_hint"
        )
    meta = dict(metadata or {})
    size = len(json.dumps(meta).encode())
    if size > MAX_METADATA_BYTES:
        raise LibraryError(
            f"metadata: {size} bytes as JSON; at most {MAX_METADATA_BYTES} (64 KiB)", "metadata"
        )
    return meta


def hint_warnings(model_hint: str | None, info: ModelInfo) -> tuple[str, ...]:
    """A model_hint naming another model family than the served one: accepted (the shapes were checked
    and fit), with a warning, since a direction learned on another model is rarely meaningful here."""
    hint = (model_hint or "").strip().lower()
    served = {x.lower() for x in (info.model_type, info.architecture) if x}
    served |= {a for x in served for a in HINT_ALIASES.get(x, ())}
    if not hint or not served or hint in served:
        return ()
    return (
        f"model_hint: the vector was made for a {model_hint!r} model; this server runs {info.name} "
        f"({info.model_type or info.architecture}). Its shapes fit, so it was accepted; check that it "
        "steers as intended.",
    )


class VectorLibrary:
    """Thread-safe: the API thread adds, lists and deletes while request validation reads."""

    def __init__(self, model_info: ModelInfo, directory: Path | str | None = None) -> None:
        self.model_info = model_info
        self.directory = Path(directory) if directory is not None else None
        self._vectors: dict[str, StoredVector] = {}
        self._files: dict[str, Path] = {}
        self._seen: dict[Path, tuple[int, int, int]] = {}  # file -> (mtime_ns, size, inode) when read
        self._rejected: dict[Path, tuple[int, int, int]] = {}  # files skipped as they were then
        self._folder_time: int | None = None  # the folder's mtime_ns at the last scan
        self._scanned_at = 0.0
        self._lock = threading.RLock()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._sync()
            log.info("steering vectors: %d loaded from %s", len(self._vectors), self.directory)

    # -- building -------------------------------------------------------------------------------------
    def build(
        self,
        name: str,
        directions: dict[int, torch.Tensor],
        model_hint: str | None = None,
        metadata: dict[str, str] | None = None,
        num_layers: int | None = None,
        layer_count: int | None = None,
        param: str = "directions",
    ) -> StoredVector:
        """A StoredVector checked against the model; errors name the field (hidden_size, num_layers, ...)."""
        check_name(name)
        info = self.model_info
        if not directions:
            raise LibraryError(f"{param}: give at least one layer", param)
        if num_layers is not None and num_layers != info.num_layers:
            raise LibraryError(
                f"num_layers: the vector was made for a model with {num_layers} decoder layers; this model "
                f"({info.name}) has {info.num_layers}",
                "num_layers",
            )
        if layer_count is not None and layer_count > info.num_layers:
            raise LibraryError(
                f"layer_count: the file has {layer_count} direction tensors; this model ({info.name}) has "
                f"only {info.num_layers} decoder layers",
                "layer_count",
            )
        meta = check_metadata(metadata, model_hint)
        if len(directions) > info.num_layers:
            raise LibraryError(
                f"{param}: {len(directions)} layers; this model ({info.name}) has {info.num_layers}", param
            )
        clean: dict[int, torch.Tensor] = {}
        for layer, d in sorted(directions.items()):
            where = f"{param}.{layer}"
            if not 0 <= layer < info.num_layers:
                raise LibraryError(
                    f"{where}: layer {layer} out of range [0, {info.num_layers - 1}] for this model "
                    f"({info.num_layers} decoder layers)",
                    where,
                )
            d = d.detach().to("cpu", torch.float32).reshape(-1).clone()
            if d.numel() != info.hidden_size:
                raise LibraryError(
                    f"hidden_size: {where} has {d.numel()} values; this model's hidden_size is "
                    f"{info.hidden_size}",
                    where,
                )
            if not bool(torch.isfinite(d).all()):
                raise LibraryError(f"{where}: values must be finite numbers", where)
            clean[layer] = d
        return StoredVector(
            name=name,
            directions=clean,
            model_hint=model_hint if model_hint is not None else (info.model_type or info.architecture),
            hidden_size=info.hidden_size,
            num_layers=info.num_layers,
            metadata=meta,
            warnings=hint_warnings(model_hint, info),
        )

    def from_file(self, file: VectorFile, name: str | None = None) -> StoredVector:
        """A vector read from a file, named `name`, else by the name stored in the file."""
        chosen = name or file.name
        if not chosen:
            raise LibraryError("name: give a name for the vector (the file does not carry one)", "name")
        return self.build(
            chosen,
            file.directions,
            file.model_hint,
            file.metadata,
            num_layers=file.num_layers,
            layer_count=file.layer_count,
        )

    def combine(self, name: str, terms: Iterable[tuple[str, float]], param: str = "combine") -> StoredVector:
        """sum(scale_i * vector_i) over the union of their layers (a layer one lacks counts as zero)."""
        total: dict[int, torch.Tensor] = {}
        parts: list[str] = []
        hint = None
        for i, (other, scale) in enumerate(terms):
            vec = self.get(other, f"{param}[{i}].name")
            hint = hint or vec.model_hint
            for layer, d in vec.directions.items():
                total[layer] = total.get(layer, torch.zeros_like(d)) + float(scale) * d
            parts.append(f"{scale:g}*{other}")
        if not parts:
            raise LibraryError(f"{param}: give at least one vector", param)
        return self.build(name, total, hint, {"combine": " + ".join(parts)})

    # -- store ----------------------------------------------------------------------------------------
    def add(self, vector: StoredVector, replace: bool = False) -> StoredVector:
        """Store (and persist) a built vector; an existing name is refused unless replace=True."""
        with self._lock:
            self._sync()
            exists = VectorExists(
                f"name: a vector named {vector.name!r} already exists; delete it or pass replace=true", "name"
            )
            if vector.name in self._vectors and not replace:
                raise exists
            if self.directory is not None:
                path = self.directory / f"{vector.name}.safetensors"
                if not self._write(path, vector.to_bytes("safetensors"), exclusive=not replace):
                    raise exists
                old = self._files.get(vector.name)
                if old is not None and old != path:
                    old.unlink(missing_ok=True)
                    self._seen.pop(old, None)
                self._files[vector.name] = path
                self._remember(path)
            self._vectors[vector.name] = vector
        log.info("steering vector %r stored (layers %s)", vector.name, vector.layers)
        for warning in vector.warnings:
            log.warning("steering vector %r: %s", vector.name, warning)
        return vector

    def get(self, name: str, param: str = "name") -> StoredVector:
        with self._lock:
            self._sync()
            vec = self._vectors.get(name)
        if vec is None:
            raise VectorNotFound(f"{param}: no stored steering vector named {name!r}", param)
        return vec

    def list(self) -> builtins.list[StoredVector]:
        with self._lock:
            self._sync()
            return [self._vectors[k] for k in sorted(self._vectors)]

    def page(self, limit: int, after: str | None = None) -> tuple[builtins.list[StoredVector], bool]:
        """Up to `limit` vectors in name order after the name `after` (a cursor: the last name of the
        previous page), and whether more follow."""
        with self._lock:
            self._sync()
            names = sorted(n for n in self._vectors if after is None or n > after)
            return [self._vectors[n] for n in names[:limit]], len(names) > limit

    def delete(self, name: str) -> StoredVector:
        with self._lock:
            vec = self.get(name)
            del self._vectors[name]
            path = self._files.pop(name, None)
            if path is not None:
                self._seen.pop(path, None)
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("could not delete %s: %s", path, e)
        return vec

    def __contains__(self, name: object) -> bool:
        with self._lock:
            self._sync()
            return name in self._vectors

    def __len__(self) -> int:
        with self._lock:
            self._sync()
            return len(self._vectors)

    # -- disk -----------------------------------------------------------------------------------------
    @staticmethod
    def _write(path: Path, data: bytes, exclusive: bool = False) -> bool:
        """Atomic: a crash leaves the old file or the new one, never half of one. `exclusive`: only if no
        file is there (False when one is: another server stored that name first)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            if not exclusive:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # fails if the name exists, unlike a rename
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: a rename (last writer wins)
                os.replace(tmp, path)
            return True
        except OSError as e:
            raise VectorStorageError(f"could not save the vector to {path}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _remember(self, path: Path) -> None:
        st = path.stat()
        self._seen[path] = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _sync(self) -> None:
        """Under the lock: re-read the folder if it may have changed since the last scan."""
        if self.directory is None:
            return
        try:
            folder_time = self.directory.stat().st_mtime_ns
        except OSError as e:
            log.warning("steering vectors: cannot read %s: %s", self.directory, e)
            return
        settled = self._scanned_at - folder_time / 1e9 > SETTLE_S
        if folder_time == self._folder_time and settled:
            return
        self._scanned_at = time.time()
        self._folder_time = folder_time
        self._scan(self.directory)

    def _scan(self, directory: Path) -> None:
        """Load every vector file that is new or changed and fits the model (log and skip the others,
        never fail); drop the vectors whose file is gone."""
        present: dict[str, Path] = {}
        for path in sorted(
            p for p in directory.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".")
        ):
            name = path.stem
            try:
                st = path.stat()
            except OSError:
                continue  # removed while listing
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if name in present:
                if self._rejected.get(path) != key:
                    log.warning("steering vectors: skipping %s: %r is in %s", path, name, present[name])
                    self._rejected[path] = key
                continue
            if self._files.get(name) == path and self._seen.get(path) == key:
                present[name] = path
                continue
            if self._rejected.get(path) == key:
                continue  # told once already
            try:
                vec = self.from_file(formats.read_vector_path(path), name)
            except (LibraryError, VectorFormatError, OSError) as e:
                log.warning("steering vectors: skipping %s: %s", path, e)
                self._rejected[path] = key
                continue
            except Exception as e:  # noqa: BLE001 - a parser bug must not stop the server from starting
                log.warning("steering vectors: skipping %s: unreadable (%s: %s)", path, type(e).__name__, e)
                self._rejected[path] = key
                continue
            self._rejected.pop(path, None)
            for warning in vec.warnings:
                log.warning("steering vectors: %s loaded with a warning: %s", path, warning)
            self._vectors[name] = vec
            self._files[name] = path
            self._seen[path] = key
            present[name] = path
        for name in [n for n in self._files if n not in present]:
            self._seen.pop(self._files.pop(name), None)
            self._vectors.pop(name, None)
