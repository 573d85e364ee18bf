"""Model folders for GPU benchmarks: real shapes, no weights (the engine's --load-format dummy fills
them with random bf16 values on the device), and a word-level tokenizer covering the whole vocabulary
so detokenization runs as it would for a real model."""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer whose token i is the word `w{i}`: decodes any id, costs like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(path)


def make_model_dir(path: Path, config: dict[str, object] = LLAMA3_8B) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if not (path / "tokenizer.json").exists():
        write_tokenizer(path, int(config["vocab_size"]))  # type: ignore[arg-type]
    return path
