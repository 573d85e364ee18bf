"""End-to-end tests of POST /v1/chat/completions on a live server.

TinyStories has no chat template, so the module serves a copy of its folder with a small Jinja template
added to tokenizer_config.json. References: the tokenizer's own `apply_chat_template`, transformers'
greedy generate and forward pass on the templated ids, and the server's non-streamed answers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI

from tests.conftest import LiveServer, start_server
from tests.engine_utils import text_after

MODEL = "tinystories-656k"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Once upon a time there was a little dog"},
]
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def copy_with_chat_template(tinystories_dir: Path, parent: Path) -> Path:
    """TinyStories (which has no chat template) copied under `parent` with TEMPLATE added."""
    out = parent / MODEL
    out.mkdir()
    for name in FILES:
        if (tinystories_dir / name).exists():
            shutil.copy(tinystories_dir / name, out / name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def chat_dir(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_chat_template(tinystories_dir, tmp_path_factory.mktemp("tinystories-chat"))


@pytest.fixture(scope="module")
def chat_server(chat_dir: Path) -> Iterator[LiveServer]:
    server = start_server(chat_dir, num_kv_blocks=128)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(chat_server: LiveServer) -> Iterator[OpenAI]:
    c = OpenAI(base_url=f"{chat_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


class Reference:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos = self.model.config.eos_token_id

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        out = self.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.eos,
        )
        return out[0, len(prompt_ids) :].tolist()

    def text_after(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        return text_after(self.tokenizer, prompt_ids, new_ids)

    @torch.inference_mode()
    def log_softmax(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def ref(chat_dir: Path) -> Reference:
    return Reference(chat_dir)


def chat(client: OpenAI, messages: list[dict[str, Any]] = MESSAGES, **kw: Any) -> Any:
    extra = {k: kw.pop(k) for k in list(kw) if k in ("ignore_eos", "interventions")}
    return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra or None, **kw)


def test_chat_template_is_applied(client: OpenAI, ref: Reference) -> None:
    ids = ref.chat_ids(MESSAGES)
    r = chat(client, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    plain = sum(len(ref.tokenizer.encode(m["content"], add_special_tokens=False)) for m in MESSAGES)
    assert r.usage.prompt_tokens > plain + 1  # role markers were added
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"


def test_chat_greedy_equals_transformers_on_template_ids(client: OpenAI, ref: Reference) -> None:
    ids = ref.chat_ids(MESSAGES)
    gen = ref.greedy(ids, 20)
    r = chat(client, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == ref.text_after(ids, gen)
    assert r.usage.completion_tokens == len(gen)
    assert r.choices[0].finish_reason == ("stop" if gen[-1] == ref.eos else "length")
    # the same ids through /v1/completions give the same text
    c = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert c.choices[0].text == r.choices[0].message.content


def test_text_parts_and_multi_turn(client: OpenAI, ref: Reference) -> None:
    text_parts = [{"type": "text", "text": "You tell "}, {"type": "text", "text": "short stories."}]
    parts = [{"role": "system", "content": text_parts}, MESSAGES[1]]
    assert chat(client, parts, max_tokens=8, temperature=0).choices[0].message.content == (
        chat(client, max_tokens=8, temperature=0).choices[0].message.content
    )
    turns = [
        *MESSAGES,
        {"role": "assistant", "content": "The dog was happy."},
        {"role": "user", "content": "More"},
    ]
    r = chat(client, turns, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(ref.chat_ids(turns))


def test_chat_logprobs_match_transformers(client: OpenAI, ref: Reference) -> None:
    ids = ref.chat_ids(MESSAGES)
    gen = ref.greedy(ids, 10)
    r = chat(client, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(gen)
    table = ref.log_softmax(ids + gen)
    for i, (entry, tok) in enumerate(zip(content, gen, strict=True)):
        row = table[len(ids) + i - 1]
        assert entry.logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3
        assert tops == sorted(tops, reverse=True)
        assert tops == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the best
    if gen[-1] != ref.eos:
        assert "".join(e.token for e in content) == r.choices[0].message.content
    # logprobs without top_logprobs: the chosen token only
    bare = chat(client, max_tokens=3, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], [], []]
    assert chat(client, max_tokens=3, temperature=0).choices[0].logprobs is None


def test_max_completion_tokens(client: OpenAI) -> None:
    r = chat(client, max_completion_tokens=5, temperature=0, ignore_eos=True)
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    # max_completion_tokens wins over the deprecated max_tokens
    r = chat(client, max_completion_tokens=3, max_tokens=9, temperature=0, ignore_eos=True)
    assert r.usage.completion_tokens == 3


def test_chat_n_and_seed(client: OpenAI) -> None:
    a = chat(client, n=3, max_tokens=10, temperature=1.0, seed=11)
    b = chat(client, n=3, max_tokens=10, temperature=1.0, seed=11)
    texts = lambda r: [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]  # noqa: E731
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert texts(a) == texts(b)
    assert len(set(texts(a))) > 1


def test_chat_stop_string(client: OpenAI) -> None:
    full = chat(client, max_tokens=24, temperature=0, ignore_eos=True).choices[0].message.content
    words = [w for w in full.split()[2:] if len(w) >= 3 and full.find(w) > 3]
    assert words, full
    r = chat(client, max_tokens=24, temperature=0, ignore_eos=True, stop=[words[0]])
    assert r.choices[0].message.content == full[: full.find(words[0])]
    assert r.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------- streaming


def _stream(client: OpenAI, **kw: Any) -> tuple[dict[int, str], list[Any]]:
    extra = {k: kw.pop(k) for k in list(kw) if k in ("ignore_eos",)}
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body=extra or None, **kw
        )
    )
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    return texts, chunks


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tokens": 20, "temperature": 0},
        {"max_tokens": 12, "temperature": 0.9, "seed": 3, "n": 2},
        {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "stop": ["dog", "."]},
    ],
    ids=["greedy", "n2-seeded", "stop"],
)
def test_stream_concatenates_to_non_streamed(client: OpenAI, kw: dict[str, Any]) -> None:
    full = chat(client, **dict(kw))
    texts, chunks = _stream(client, stream_options={"include_usage": True}, **dict(kw))
    for c in full.choices:
        assert texts[c.index] == c.message.content
        mine = [x for ch in chunks for x in ch.choices if x.index == c.index]
        assert mine[0].delta.role == "assistant"
        assert [x.finish_reason for x in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1].finish_reason == c.finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


@pytest.mark.parametrize("stop", [None, ["a string that never comes"]])
def test_stream_logprobs_equal_non_streamed(client: OpenAI, stop: list[str] | None) -> None:
    """With a stop string the server holds text back; the held tokens' logprobs must still arrive."""
    kw: dict[str, Any] = {
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "stop": stop,
    }
    full = chat(client, **kw)
    _, chunks = _stream(client, **kw)
    streamed = [e.model_dump() for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == [e.model_dump() for e in full.choices[0].logprobs.content]


def test_raw_sse_ends_with_done(chat_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{chat_server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert sum(1 for e in events if e == "data: [DONE]") == 1


# ---------------------------------------------------------------------------- tokenize and steering


def test_tokenize_messages_equals_template(chat_server: LiveServer, ref: Reference) -> None:
    r = httpx.post(f"{chat_server.url}/tokenize", json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 200
    assert r.json()["tokens"] == ref.chat_ids(MESSAGES)


def test_chat_steering_scale_zero_and_large(client: OpenAI) -> None:
    g = torch.Generator().manual_seed(1)
    d = torch.randn(128, generator=g)
    vec = (d / d.norm()).tolist()

    def steer(scale: float) -> dict[str, Any]:
        return {"steering": {"vectors": [{"directions": {"0": vec, "1": vec}, "scale": scale}]}}

    base = chat(client, max_tokens=12, temperature=0, ignore_eos=True).choices[0].message.content
    zero = chat(client, max_tokens=12, temperature=0, ignore_eos=True, interventions=steer(0.0))
    assert zero.choices[0].message.content == base
    big = chat(client, max_tokens=12, temperature=0, ignore_eos=True, interventions=steer(30.0))
    assert big.choices[0].message.content != base
