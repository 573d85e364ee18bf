"""Load a decoder-only model from an HF folder (or hub id): config, tokenizer, memory-mapped safetensors.

Native families get our paged implementation; anything else goes through transformers on the fallback
path. Pickle checkpoints (.bin/.pt) are refused unless the caller opts in, since loading them runs code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from actserve.server.models.spec import ModelSpec

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says what to change."""


def resolve_model_dir(model: str) -> Path:
    """A local folder as is; otherwise a hub id downloaded (safetensors + configs only) into the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"--model {model!r} is a file; pass the folder that holds config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ModelLoadError(f"--model {model!r} is not a local folder and could not be fetched: {e}") from e


def resolve_dtype(dtype: str, device: torch.device, config: Any) -> torch.dtype:
    """auto: float32 on CPU (exactness, speed of CPU matmuls), the checkpoint's half type on GPU."""
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(
                f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}"
            ) from None
    if device.type == "cpu":
        return torch.float32
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if cfg in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16


def weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{model_dir} has only pickle checkpoints ({pickles[0].name}); loading them can run code. "
            "Convert to safetensors, or pass --allow-pickle-weights if you trust the source."
        )
    if not pickles:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    return pickles


def iter_checkpoint(files: list[Path]) -> Any:
    """(name, tensor) pairs, memory-mapped for safetensors."""
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, sf.get_tensor(name)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def load_native(
    spec: ModelSpec,
    config: Any,
    files: list[Path],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    random_init: bool = False,
) -> torch.nn.Module:
    """Build on the meta device, allocate once on the target, then copy tensors in (no random init)."""
    from actserve.server.layers.rotary import RotaryEmbedding
    from actserve.server.models.llama import LlamaForCausalLM

    rotary = RotaryEmbedding(config, spec.head_dim, max_positions).to(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, torch.nn.Module())
    model = model.to_empty(device=device).to(dtype)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = rotary  # built outside the meta context: its tables are computed, not loaded
    if random_init:
        return _random_init(model).eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = {n for n in params if ".qkv_proj." not in n and ".gate_up_proj." not in n}
    for n in params:  # fused parameters are complete when each of their checkpoint parts arrived
        if ".qkv_proj." in n:
            missing |= {n.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")}
        elif ".gate_up_proj." in n:
            missing |= {n.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")}
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=total < 2**26) as bar:
        for name, tensor in iter_checkpoint(files):
            fused = model.fused_slices(name)
            if fused is not None:
                target, lo, hi = fused
                dest = params[target][lo:hi] if target in params else None
                missing.discard(name)
            else:
                dest = params.get(name)
                missing.discard(name)
            if dest is None:
                if not name.endswith("rotary_emb.inv_freq"):
                    log.debug("ignoring checkpoint tensor %s", name)
                continue
            if dest.shape != tensor.shape:
                raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(tensor)
            bar.update(tensor.numel() * tensor.element_size())
    if spec.tie_word_embeddings and ({"lm_head.weight", "model.embed_tokens.weight"} - missing):
        missing -= {"lm_head.weight", "model.embed_tokens.weight"}  # tied: either name fills both
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model.eval()


def read_generation_eos(model_dir: Path, config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: generation_config's eos list, the config's, the tokenizer's."""
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources: list[Any] = []
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    sources += [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


@torch.no_grad()
def _random_init(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Benchmark weights (--load-format dummy): normal(0, std) matrices, unit norms; speed does not
    depend on the values, and this avoids reading gigabytes of checkpoint."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    return model
