"""Structured outputs and logit_bias (issue 12 item 3): the `structured_output` and `logit_bias` plugins
on the logits hook, and the API fields that map to them (response_format, guided_*, logit_bias).

Outputs are checked against independent references: `jsonschema` for JSON, `re.fullmatch` for regexes,
transformers' own logits plus the bias for logit_bias, and each request's solo run for batch mixing."""

from __future__ import annotations

import json
import math
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from actserve.interventions.base import InterventionCapacityError
from actserve.interventions.structured_output.grammar import GrammarEngine, GrammarTimeout
from actserve.interventions.structured_output.schema import StructuredSpec
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import make_sequences, run_sequences
from actserve.server.engine.sampling_params import SamplingParams
from tests.conftest import ENGINE_MODES, start_server
from tests.engine_utils import capture_logits

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["Once upon a time, there was a", "The dog was happy because", "Sam saw a big tree", "Lily"]
WORDS = ["cat", "dog", "happy", "tree", "ball", "sun", "red", "big", "mom", "park", "cake", "bird"]


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))


@pytest.fixture(scope="module")
def tok(tinystories_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tinystories_dir)


@pytest.fixture(scope="module")
def prompts(tok: Any) -> list[list[int]]:
    return [tok.encode(t) for t in TEXTS]


def gen(
    eng: LLMEngine, prompts: list[list[int]], params: SamplingParams, specs: list[Any], tag: str
) -> list[tuple[list[int], str | None]]:
    seqs = make_sequences(eng, prompts, params, specs, tag)
    outs = run_sequences(eng, seqs)
    return [(o, s.finish_reason) for o, s in zip(outs, seqs, strict=True)]


def sampled(seed: int, max_tokens: int = 48) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def so(**kw: Any) -> dict[str, Any]:
    return {"structured_output": kw}


def test_guided_choice_is_always_one_of_the_choices(
    eng: LLMEngine, tok: Any, prompts: list[list[int]]
) -> None:
    rng = random.Random()
    for trial in range(3):
        choices = [" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(rng.randint(2, 5))]
        seed = rng.randrange(2**31)
        outs = gen(eng, prompts, sampled(seed), [so(choice=choices)] * len(prompts), f"c{trial}-")
        for ids, reason in outs:
            assert reason == "stop", (choices, tok.decode(ids))
            assert tok.decode(ids, skip_special_tokens=True) in choices


def test_guided_regex_output_fullmatches(eng: LLMEngine, tok: Any, prompts: list[list[int]]) -> None:
    rng = random.Random()
    patterns = [
        r"[a-z]{2,6}-[0-9]{1,3}",
        r"(cat|dog|bird)s? (is|was) (happy|sad)\.",
        r"[A-Z][a-z]{1,8}( [a-z]{1,8}){0,3}",
    ]
    for i, pattern in enumerate(patterns):
        outs = gen(eng, prompts, sampled(rng.randrange(2**31)), [so(regex=pattern)] * len(prompts), f"r{i}-")
        for ids, reason in outs:
            text = tok.decode(ids, skip_special_tokens=True)
            if reason == "stop":
                assert re.fullmatch(pattern, text), (pattern, text)
            else:  # cut at max_tokens: still a prefix the regex can complete; never an invalid character
                assert re.fullmatch(r"[A-Za-z0-9 .-]*", text), (pattern, text)


def test_complete_grammar_allows_only_eos(eng: LLMEngine, tok: Any, prompts: list[list[int]]) -> None:
    """Once the grammar is complete, the only allowed token is EOS: the output stops at it."""
    ((ids, reason),) = gen(eng, prompts[:1], greedy(32), [so(regex="the end")], "e")
    assert reason == "stop" and tok.decode(ids, skip_special_tokens=True) == "the end"
    assert ids[-1] in eng.model_info.eos_token_ids


def test_masks_are_per_row(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """A constrained and an unconstrained request in one batch each equal their solo run. In the first
    step (the same packed prompts either way) the plain rows' logits are bit-identical to a batch
    without constraints, and a constrained row keeps its logits exactly where allowed, -inf elsewhere."""
    specs = [so(choice=["cat and dog", "big tree"]), None, so(regex="[a-z ]{3,12}"), None]
    with capture_logits() as mixed_seen:
        mixed = gen(eng, prompts, greedy(), specs, "m")
    with capture_logits() as plain_seen:
        gen(eng, prompts, greedy(1), [None] * 4, "pl")
    for i, (p, spec) in enumerate(zip(prompts, specs, strict=True)):
        (solo,) = gen(eng, [p], greedy(), [spec], f"solo{i}-")
        assert mixed[i] == solo, i
        got, plain = mixed_seen[f"m{i}"][0], plain_seen[f"pl{i}"][0]
        if spec is None:
            assert torch.equal(got, plain)
        else:
            allowed = torch.isfinite(got)
            assert 0 < int(allowed.sum()) < got.numel()
            assert torch.equal(got[allowed], plain[allowed])


def test_composes_with_steering(eng: LLMEngine, tok: Any, prompts: list[list[int]]) -> None:
    """Steered + constrained in a mixed batch = the same request solo, and steering changes what the
    constrained request picks (the two interventions act together, not one instead of the other)."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    vec = {"directions": {"1": torch.randn(128, generator=g).tolist()}, "scale": 8.0}
    regex = "[a-z]{2,8}( [a-z]{2,8}){2,5}"
    both = {"steering": {"vectors": [vec]}, **so(regex=regex)}
    specs = [both, so(regex=regex), None, {"steering": {"vectors": [vec]}}]
    mixed = gen(eng, [prompts[0]] * 2 + prompts[2:], greedy(), specs, "st")
    (solo,) = gen(eng, [prompts[0]], greedy(), [both], "st-solo")
    assert mixed[0] == solo
    text = tok.decode(solo[0], skip_special_tokens=True)
    assert solo[1] == "length" or re.fullmatch(regex, text), text
    with capture_logits() as seen:
        gen(eng, [prompts[0]] * 2, greedy(1), [both, so(regex=regex)], "sd")
    assert not torch.equal(seen["sd0"][0], seen["sd1"][0])  # steering moved the constrained logits


def test_logit_bias_equals_transformers_plus_bias(eng: LLMEngine, ref: Any, prompts: list[list[int]]) -> None:
    rng = random.Random()
    # token 0 too: the hook's unused entries point at token 0 and must not overwrite its bias
    picked = [0, *rng.sample(range(1, eng.model_info.vocab_size), 19)]
    bias = {str(t): round(rng.uniform(-100, 100), 3) for t in picked}
    steps = 6
    with capture_logits() as seen:
        (ours, _), = gen(eng, prompts[:1], SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True),
                         [{"logit_bias": {"bias": bias}}], "lb")  # fmt: skip
    ids = torch.tensor([int(k) for k in bias])
    add = torch.tensor(list(bias.values()))
    seq = torch.tensor([prompts[0]])
    for step in range(steps):  # transformers' logits for the same prefix, plus the bias
        with torch.no_grad():
            want = ref(seq).logits[0, -1].float()
        want[ids] += add
        assert (seen["lb0"][step] - want).abs().max().item() < 1e-3, step
        assert int(want.argmax()) == ours[step]
        seq = torch.cat([seq, torch.tensor([[ours[step]]])], 1)


def test_overlapped_steps_bind_the_mask_late(tinystories_dir: Path, prompts: list[list[int]]) -> None:
    """With step overlap on, a batch with constrained rows chains its decode steps too: the forward runs
    ahead, the grammar's mask is bound once the previous token is on the host (`LateLogitsStep`). The
    output equals the strictly sequential engine's, the constrained row still matches its regex, and a
    plugin that also hooked the residual stream would stop the chaining (`late_logits`)."""
    seq = LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=128))
    ovl = LLMEngine(
        EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=128, overlap_steps=True)
    )
    before = ovl.chained_steps
    specs = [so(regex="[a-z ]{4,40}"), None, so(choice=["once upon a time there was a dog"]), None]
    for params in (SamplingParams(max_tokens=12, temperature=0.0), sampled(3, 12)):
        got = gen(ovl, prompts, params, specs, "q")
        assert got == gen(seq, prompts, params, specs, "q")
        assert re.fullmatch("[a-z ]{4,40}", ovl.tokenizer.decode(got[0][0], skip_special_tokens=True))
    assert ovl.chained_steps > before
    reg = ovl.registry
    plans = {"structured_output": object(), "steering": object()}
    assert reg.late_logits(plans) == frozenset({"structured_output"})
    plugin = reg.plugins["structured_output"]
    plugin.hook_points = ("logits", "residual")  # type: ignore[misc]
    try:
        assert reg.late_logits(plans) is None
    finally:
        del plugin.hook_points


@pytest.fixture(scope="module")
def default_eng(default_model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(default_model_dir), device="cpu", num_kv_blocks=512))


def test_json_schema_outputs_validate(default_eng: LLMEngine) -> None:
    """SmolLM2-135M-Instruct, sampled: every output that stops parses and validates with jsonschema."""
    items = json.loads((ROOT / "bench/data/json_schemas.json").read_text())
    picked = random.Random().sample(items, 4)
    tok = default_eng.tokenizer
    prompts = []
    for it in picked:
        msg = [{"role": "user", "content": f"Give a JSON object for: {json.dumps(it['schema'])}"}]
        prompts.append(tok.encode(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)))
    specs = [so(json_schema=it["schema"]) for it in picked]
    outs = gen(default_eng, prompts, sampled(random.randrange(2**31), 128), specs, "j")
    assert any(reason == "stop" for _, reason in outs)
    for it, (ids, reason) in zip(picked, outs, strict=True):
        if reason == "stop":
            jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), it["schema"])
    ((ids, reason),) = gen(default_eng, prompts[:1], greedy(64), [so(json_object=True)], "o")
    assert reason == "length" or isinstance(json.loads(tok.decode(ids, skip_special_tokens=True)), dict)


# the server's grammar compile limit (--max-grammar-compile-seconds), low enough for a test to wait it out
COMPILE_LIMIT_S = 0.5
# valid, 53 kB (under the 65536 limit), and slow to compile: each rule uses the next one twice (~3 s on
# the CPU of the reference machine, for TinyStories' vocabulary)
SLOW_GRAMMAR = (
    "root ::= r0\n" + "".join(f'r{i} ::= "a" | r{i + 1} r{i + 1}\n' for i in range(2000)) + 'r2000 ::= "b"'
)


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def server(tinystories_dir: Path, request: pytest.FixtureRequest) -> Any:
    options = {"structured_output": {"max_compile_seconds": COMPILE_LIMIT_S}}
    mode = ENGINE_MODES[request.param]
    s = start_server(tinystories_dir, num_kv_blocks=256, plugin_options=options, engine_process=mode)
    yield s
    s.stop()


def post(server: Any, body: dict[str, Any], route: str = "completions") -> httpx.Response:
    base = {"model": "tinystories-656k", "prompt": "Once upon a time", "max_tokens": 16}
    return httpx.post(f"{server.url}/v1/{route}", json={**base, **body}, timeout=60)


def test_http_fields(server: Any, tok: Any) -> None:
    r = post(server, {"guided_choice": ["a cat", "a dog"], "temperature": 1.0})
    assert r.status_code == 200, r.text
    assert (
        r.json()["choices"][0]["text"] in ("a cat", "a dog")
        and r.json()["choices"][0]["finish_reason"] == "stop"
    )
    r = post(server, {"guided_regex": "[0-9]{3}"})
    assert r.status_code == 200 and re.fullmatch("[0-9]{3}", r.json()["choices"][0]["text"]), r.text
    r = post(server, {"guided_grammar": 'root ::= "yes" | "no"', "temperature": 1.0})
    assert r.json()["choices"][0]["text"] in ("yes", "no"), r.text
    r = post(server, {"logit_bias": {"123": 100}, "max_tokens": 3, "temperature": 1.0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.decode([123] * 3), r.text
    r = post(server, {"response_format": {"type": "text"}})
    assert r.status_code == 200
    r = post(server, {"guided_choice": ["red", "green", "blue"], "n": 4, "temperature": 1.0})  # 4 matchers
    assert [c["text"] in ("red", "green", "blue") for c in r.json()["choices"]] == [True] * 4, r.text


def test_logprobs_of_masked_tokens_are_finite(server: Any) -> None:
    """Tokens a constraint rules out report OpenAI's -9999.0 among the top logprobs (JSON has no -inf:
    this was a 500); the chosen, allowed token keeps its true value."""
    r = post(server, {"guided_choice": ["yes", "no"], "logprobs": 10, "max_tokens": 4})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    first = lp["top_logprobs"][0]
    assert all(math.isfinite(v) and v >= -9999.0 for v in first.values())
    assert -9999.0 in first.values()  # ten alternatives, at most a few allowed
    assert lp["token_logprobs"][0] > -9999.0


def test_http_streaming(server: Any) -> None:
    body = {"model": "tinystories-656k", "prompt": "Once", "max_tokens": 16, "stream": True,
            "guided_choice": ["big red ball", "happy dog"]}  # fmt: skip
    text, reasons = "", []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reasons.append(choice["finish_reason"])
    assert text in ("big red ball", "happy dog") and reasons[-1] == "stop"


BAD_SCHEMA = {"type": "objectx"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"guided_grammar": "root ::= "}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
        ({"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos"),
        ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
        ({"guided_choice": ["a"], "interventions": {"structured_output": {"regex": "a"}}}, "guided_choice"),
        ({"logit_bias": {"99999": 1}}, "logit_bias.99999"),
        ({"logit_bias": {"x": 1}}, "logit_bias.x"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ],
)  # fmt: skip
def test_http_errors_name_the_field(server: Any, body: dict[str, Any], param: str) -> None:
    r = post(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert post(server, {"guided_choice": ["ok"]}).json()["choices"][0]["text"] == "ok"  # engine unharmed


def test_slow_compile_is_a_400_after_the_limit(server: Any) -> None:
    """A grammar that compiles longer than the limit is refused once the limit has passed, naming the
    field; its compile goes on in the background, and the server serves meanwhile and afterwards (in
    the engine-process mode too: its core prepares off the step loop, so a compile delays no request)."""
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, server, {"guided_grammar": SLOW_GRAMMAR + "\n\n"})
        time.sleep(0.1)  # its compile has started
        r = post(server, {"guided_regex": "[0-9]{3}", "max_tokens": 4})
        assert r.status_code == 200 and not slow.done(), r.text
        assert slow.result().status_code == 400
    cases = [
        ({"guided_grammar": SLOW_GRAMMAR}, "guided_grammar"),
        ({"interventions": {"structured_output": {"grammar": SLOW_GRAMMAR + "\n"}}},  # not cached
         "interventions.structured_output.grammar"),
    ]  # fmt: skip
    for body, param in cases:
        start = time.monotonic()
        r = post(server, body)
        took = time.monotonic() - start
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert f"took longer than {COMPILE_LIMIT_S:g} s" in r.json()["error"]["message"], r.text
        assert COMPILE_LIMIT_S <= took < COMPILE_LIMIT_S + 1.5, took
    r = post(server, {"guided_regex": "[0-9]{3}"})  # both slow compiles still run
    assert r.status_code == 200 and re.fullmatch("[0-9]{3}", r.json()["choices"][0]["text"]), r.text
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_abandoned_compiles_hold_their_slot(eng: LLMEngine) -> None:
    """A compile given up on keeps its slot until it ends, so they cannot pile up: with the only slot
    taken, the next compile gets a 503 (InterventionCapacityError) instead of another thread."""
    info = eng.model_info
    grammars = GrammarEngine(info.path, info.vocab_size, list(info.eos_token_ids), slots=1)
    grammars.compile_timeout_s = 0.05
    with pytest.raises(GrammarTimeout, match="took longer than 0.05 s"):
        grammars.compile(StructuredSpec(grammar=SLOW_GRAMMAR + "\n\n"))
    with pytest.raises(InterventionCapacityError, match="all 1 grammar compile slots are busy"):
        grammars.compile(StructuredSpec(regex="[0-9]+"))


def test_transformers_fallback(tinystories_dir: Path, tok: Any, prompts: list[list[int]]) -> None:
    """The transformers fallback runs the same logits hooks: choices and regexes hold there too."""
    fb = LLMEngine(
        EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=64, force_transformers=True)
    )
    specs = [so(choice=["red ball", "blue sky"]), so(regex="[a-z]{3}-[0-9]{2}"), None]
    outs = gen(fb, prompts[:3], sampled(random.randrange(2**31), 16), specs, "fb")
    assert tok.decode(outs[0][0], skip_special_tokens=True) in ("red ball", "blue sky")
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", tok.decode(outs[1][0], skip_special_tokens=True))


def test_chat_endpoint(tinystories_dir: Path, tmp_path: Path) -> None:
    """/v1/chat/completions takes the same fields (TinyStories with a chat template added)."""
    from tests.test_api_chat import copy_with_chat_template

    s = start_server(copy_with_chat_template(tinystories_dir, tmp_path), num_kv_blocks=128)
    try:
        body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 16,
                "guided_regex": "[a-z]{2,5} [a-z]{2,5}", "temperature": 1.0}  # fmt: skip
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert re.fullmatch("[a-z]{2,5} [a-z]{2,5}", choice["message"]["content"]), choice
        r = httpx.post(f"{s.url}/v1/chat/completions", json={**body, "guided_regex": "(x"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
    finally:
        s.stop()
