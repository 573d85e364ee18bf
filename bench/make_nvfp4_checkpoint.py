"""Write an NVFP4 weight-only checkpoint of a dense HF model with compressed-tensors (PyPI), the library
llm-compressor saves through, so the result is the "nvfp4-pack-quantized" layout other servers load.

llm-compressor is not needed for NVFP4 weight-only ("NVFP4A16"): its observers reduce the weights to
min/max statistics and hand them to compressed-tensors' `generate_gparam` / `calculate_qparams`, which
this script calls directly: the tensor's global scale, then the per-16 block scales from each block's
min/max (`compute_dynamic_scales_and_zp`); `ModelCompressor` then packs the weights and writes
`quantization_config`. (A min-max weight observer gives these scales; another observer, e.g. an MSE
search, would give other scales in the same layout.) `check` then compares compressed-tensors' own
decompression of every matrix with kernels/fp4_ref.py's reading of the layout. The decoder projections
are quantized; `lm_head` (tied to the embedding in TinyStories) stays dense (`ignore=["lm_head"]`, as in
llm-compressor's NVFP4 examples).

The committed test checkpoint (tests/data/tinystories-656k-nvfp4, used by tests/test_fp4_load.py) was made
with compressed-tensors 0.20.1 (plus loguru), torch 2.13 (CPU) and transformers 5.24:

    pip install compressed-tensors==0.20.1 --no-deps && pip install loguru
    python bench/make_nvfp4_checkpoint.py tests/data/tinystories-656k tests/data/tinystories-656k-nvfp4

The model is cast to bfloat16 first (a bf16 model is the usual input; it also halves the dense embedding).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def quantize(model: torch.nn.Module) -> None:
    """Attach compressed-tensors' NVFP4A16 scheme to every Linear but lm_head and fill its scales."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("NVFP4A16", ["Linear"])},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        w = module.weight.detach()
        gs = generate_gparam(w.amin(), w.amax())
        scale, zero = compute_dynamic_scales_and_zp(w, scheme.weights, module, global_scale=gs)
        with torch.no_grad():
            module.weight_global_scale.data = gs.to(module.weight_global_scale.dtype)
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype)
        module.quantization_status = QuantizationStatus.CALIBRATION


def check(out: Path) -> None:
    """Our reading of the layout (kernels/fp4_ref.dequantize, float32) against compressed-tensors' own
    decompression (which rounds to bfloat16): equal after that rounding, for every quantized matrix."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from safetensors.torch import load_file

    from actserve.kernels.fp4_ref import Fp4Weight, dequantize

    sd = load_file(out / "model.safetensors")
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    names = ("weight_packed", "weight_scale", "weight_global_scale")
    for prefix in sorted(k.removesuffix(".weight_packed") for k in sd if k.endswith(".weight_packed")):
        part = {n: sd[f"{prefix}.{n}"] for n in names}
        theirs = NVFP4PackedCompressor.decompress(dict(part), scheme)["weight"]
        ours = dequantize(Fp4Weight("nvfp4", *part.values()))
        if not torch.equal(theirs, ours.to(theirs.dtype)):
            raise SystemExit(f"{prefix}: compressed-tensors and kernels/fp4_ref.py disagree")
    print("compressed-tensors' decompression equals kernels/fp4_ref.dequantize on every matrix")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="dense HF model folder")
    ap.add_argument("out", type=Path, help="output folder (replaced)")
    args = ap.parse_args()
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16)
    quantize(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="nvfp4-pack-quantized")
    compressor.compress_model(model)
    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out)
    compressor.update_config(str(args.out))
    for name in COPIED:
        if (args.src / name).exists():
            shutil.copy(args.src / name, args.out / name)
    check(args.out)
    for f in sorted(args.out.iterdir()):
        print(f"{f.stat().st_size:>9}  {f}")


if __name__ == "__main__":
    main()
