"""Load a decoder-only model from an HF folder (or hub id): config, tokenizer, memory-mapped safetensors.

Native families get our paged implementation; anything else goes through transformers on the fallback
path. Pickle checkpoints (.bin/.pt) are refused unless the caller opts in, since loading them runs code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from actserve.server.layers.parallel import SINGLE, Communicator
from actserve.server.layers.parallel import use as use_comm
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
    model_class: type | None = None,
    weight_format: Any = None,
    prepare: Callable[[torch.nn.Module], object] | None = None,
    comm: Communicator | None = None,
) -> torch.nn.Module:
    """Build on the meta device, allocate once on the target, then load tensors in (no random init).

    `model_class` defaults to the registry's class for `spec.family`; `weight_format` (a factory of
    `WeightFormat`s, None = dense) is passed to it. `prepare(model)` runs on the model still on the meta
    device, before anything is allocated (expert offloading moves the experts to host memory there).
    `comm`: tensor parallelism, this rank's group (its layers hold and load their shards only)."""
    from actserve.server.layers.rotary import RotaryEmbedding
    from actserve.server.models.registry import model_class_for_family

    cls = model_class or model_class_for_family(spec.family)
    rotary = RotaryEmbedding(config, spec.head_dim, max_positions).to(device)
    with torch.device("meta"), use_comm(comm or SINGLE):
        model = cls(spec, torch.nn.Module(), weight_format=weight_format)
    if prepare is not None:
        prepare(model)
    model = cast_to_model_dtype(model.to_empty(device=device), dtype)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = rotary  # built outside the meta context: its tables are computed, not loaded
    if random_init:
        _random_init(model)
    else:
        load_weights(model, files, tied=spec.tie_word_embeddings)
    after_loading(model)
    return model.eval()


def cast_to_model_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, except parameters a layer's weight format keeps in their own dtype."""
    for module in model.modules():
        owner = getattr(module, "owner", None)
        for pname, p in module.named_parameters(recurse=False):
            if not p.is_floating_point() or p.dtype == dtype:
                continue
            fmt = owner(pname) if owner is not None else None
            if fmt is not None and pname.removeprefix(fmt.prefix) in fmt.fixed_dtype:
                continue
            p.data = p.data.to(dtype)
        for bname, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                module._buffers[bname] = b.to(dtype)
    return model


def after_loading(model: torch.nn.Module) -> None:
    for module in model.modules():
        hook = getattr(module, "after_loading", None)
        if hook is not None:
            hook()


def _checkpoint_targets(model: torch.nn.Module) -> dict[str, tuple[str, Any]]:
    """Checkpoint module name -> (the model's module name, shard id), from `packed_modules_mapping`."""
    mapping: dict[str, list[tuple[str, Any]]] = getattr(model, "packed_modules_mapping", {})
    return {ckpt: (packed, shard) for packed, parts in mapping.items() for ckpt, shard in parts}


def _reads(module: torch.nn.Module) -> Collection[str]:
    """The checkpoint tensors (names within the module) a module takes: a layer that owns its weights says
    (`LinearBase.checkpoint_names`, `FusedExperts.checkpoint_names`: names that may have dots, e.g.
    `3.gate_proj.weight`), any other module its own parameters."""
    names = getattr(module, "checkpoint_names", None)
    if names is not None:
        return names().keys()
    return {n for n, _ in module.named_parameters(recurse=False)}


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        name = name.replace(old, new)
    return name


def _locate(
    name: str, modules: dict[str, torch.nn.Module], targets: dict[str, tuple[str, Any]]
) -> tuple[torch.nn.Module, str, Any] | None:
    """The module that reads checkpoint tensor `name`, the name within it and the shard id: its parent
    module (renamed to a packed layer through `targets`), else the closest enclosing module that reads the
    rest of the name (e.g. an experts layer reading `3.gate_proj.weight`); None when no module does."""
    module_name, _, pname = name.rpartition(".")
    parent, _, leaf = module_name.rpartition(".")
    shard_id = None
    if leaf in targets:
        leaf, shard_id = targets[leaf]
        module_name = f"{parent}.{leaf}" if parent else leaf
    module = modules.get(module_name)
    if module is not None and pname in _reads(module):
        return module, pname, shard_id
    cut = name.rfind(".", 0, len(name) - len(pname) - 1)
    while cut > 0:
        module = modules.get(name[:cut])
        if module is not None and name[cut + 1 :] in _reads(module):
            return module, name[cut + 1 :], None
        cut = name.rfind(".", 0, cut)
    return None


def _expected_checkpoint_names(model: torch.nn.Module) -> set[str]:
    """Every checkpoint tensor the model needs: what its modules read, a packed layer's as its parts'."""
    mapping: dict[str, list[tuple[str, Any]]] = getattr(model, "packed_modules_mapping", {})
    names: set[str] = set()
    for module_name, module in model.named_modules():
        parent, _, leaf = module_name.rpartition(".")
        parts = mapping.get(leaf)
        for pname in _reads(module):
            if parts is None:
                names.add(f"{module_name}.{pname}" if module_name else pname)
            else:
                names |= {f"{parent}.{ckpt}.{pname}" if parent else f"{ckpt}.{pname}" for ckpt, _ in parts}
    return names


def load_weights(model: torch.nn.Module, files: list[Path], tied: bool = False) -> None:
    """One pass over the checkpoint: each tensor goes to its layer's `load_tensor(name, tensor,
    shard_id)` (a plain copy into the parameter for modules without one), checkpoint names renamed to
    packed layers through the model's `packed_modules_mapping`."""
    modules = dict(model.named_modules())
    targets = _checkpoint_targets(model)
    renames: tuple[tuple[str, str], ...] = getattr(model, "checkpoint_renames", ())
    missing = _expected_checkpoint_names(model)
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=total < 2**26) as bar:
        for raw_name, tensor in iter_checkpoint(files):
            name = _rename(raw_name, renames)
            missing.discard(name)
            found = _locate(name, modules, targets)
            if found is None:
                if not name.endswith("rotary_emb.inv_freq"):
                    log.debug("ignoring checkpoint tensor %s", raw_name)
                continue
            module, pname, shard_id = found
            load_tensor = getattr(module, "load_tensor", None)
            try:
                if load_tensor is not None:
                    load_tensor(pname, tensor, shard_id)
                else:
                    param = module.get_parameter(pname)
                    if param.shape != tensor.shape:
                        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                    with torch.no_grad():
                        param.copy_(tensor)
            except ValueError as e:
                raise ModelLoadError(f"{raw_name}: {e}") from e
            bar.update(tensor.numel() * tensor.element_size())
    if tied and ({"lm_head.weight", "model.embed_tokens.weight"} - missing):
        missing -= {"lm_head.weight", "model.embed_tokens.weight"}  # tied: either name fills both
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


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
    depend on the values, and this avoids reading gigabytes of checkpoint. A layer whose format converts
    the dense `weight` as it loads (FP4 quantized at load) is given a random dense matrix to convert."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for module in model.modules():  # offloaded experts' host copies: drawn on the device, copied over
        host = getattr(module, "host_weights", None)
        for t in host() if host is not None else []:
            for e in range(t.shape[0]):
                t[e].copy_(
                    torch.randn(t.shape[1:], generator=gen, device=gen.device, dtype=t.dtype).mul_(std)
                )
    converted: set[int] = set()
    for module in model.modules():
        if "weight" in _reads(module) and module._parameters.get("weight") is None:
            out, k = module.output_size, module.input_size  # a LinearBase (only its formats convert)
            module.load_tensor("weight", torch.randn(out, k, generator=gen, device=gen.device) * std)
            converted |= {id(p) for n, p in module.named_parameters(recurse=False) if n != "bias"}
    for name, p in model.named_parameters():
        if id(p) in converted or not p.is_floating_point():
            continue  # packed data of a quantized format: filled above or derived by its after_loading
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    return model
