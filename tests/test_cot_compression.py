"""CoT compression (ASC): problems, the two traps (sign, layer off-by-one) against transformers, the plugin
as steering at generation positions, KL calibration, bad specs, the CLI and the HTTP surface."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from actserve.interventions.base import InterventionError
from actserve.interventions.cot_compression.artifact import (
    ArtifactError,
    AscArtifact,
    Onset,
    load_artifact,
    save_artifact,
)
from actserve.interventions.cot_compression.build import (
    BRIEF_INSTRUCTION,
    asc_directions,
    brief_solutions,
    common_prefix,
    default_layer,
    default_onset_layer,
    model_solutions,
    prompt_ids,
    solution_ids,
)
from actserve.interventions.cot_compression.measure import Continuation, KLMeter, answer_stats, generate
from actserve.interventions.cot_compression.plugin import (
    NOT_CONFIGURED,
    SHIPPED_ARTIFACT,
    resolve_artifact_path,
)
from actserve.interventions.cot_compression.problems import (
    OPS,
    cut_after_answer,
    dev_problems,
    heldout_problems,
    parse_answer,
    train_problems,
)
from actserve.server.cli import main
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import LiveServer, start_server
from tests.engine_utils import capture_logits, greedy, run

LAYER = 0  # of TinyStories' 2: hidden_states[1] is a plain residual there (hidden_states[2] is final-normed)
STEPS = 12
PY_OPS = {"+": lambda a, b: a + b, "−": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}


# -- generated problems ----------------------------------------------------------------------------
def test_problems_deterministic_correct_and_disjoint() -> None:
    train, held, dev = train_problems(), heldout_problems(), dev_problems()
    assert train == train_problems() and held == heldout_problems() and dev == dev_problems()
    assert len(train) >= 100 and len(held) >= 50 and len(dev) >= 100
    assert len({p.template for p in train}) >= 8
    assert not {p.key for p in train} & {p.key for p in held}
    assert not {p.question for p in train} & {p.question for p in held}
    for other in (train, heldout_problems(400)):  # the dev split tunes; it shares nothing with either
        assert not {p.key for p in dev} & {p.key for p in other}
        assert not {p.question for p in dev} & {p.question for p in other}
    for p in train + held + dev:
        eqs = re.findall(r"(\d+)([+−×÷])(\d+)=(\d+)", p.concise())
        assert len(eqs) == len(p.steps) >= 2
        for a, op, b, c in eqs:  # evaluate the written arithmetic, not the generator's own numbers
            assert PY_OPS[op](int(a), int(b)) == int(c), p.concise()
        assert int(eqs[-1][3]) == p.answer and p.concise().endswith(f"Answer: {p.answer}")
        words = "|".join(OPS.values())
        said = re.findall(rf"(\d+) ({words}) (\d+) gives us (\d+)", p.verbose())
        assert len(said) == len(p.steps)
        inverse = {w: o for o, w in OPS.items()}
        for a, w, b, c in said:
            assert PY_OPS[inverse[w]](int(a), int(b)) == int(c)
        assert p.verbose().endswith(f"The answer is {p.answer}.")
        assert len(p.verbose()) > 3 * len(p.concise())  # English-heavy vs notation-heavy
        assert parse_answer(p.verbose()) == parse_answer(p.concise()) == p.answer


def test_parse_answer() -> None:
    assert parse_answer("so 3+4=7.\n#### 7\nThe answer is: 1,234.") == 1234
    assert parse_answer("Tom has 12 apples and eats 5, leaving 7") == 7
    assert parse_answer("no numbers") is None


def test_cut_after_answer() -> None:
    run_on = "2*3=6.\n#### 6\nThe answer is: 6\n#### 6\n#### 6"
    assert cut_after_answer(run_on) == "2*3=6.\n#### 6"
    assert (
        cut_after_answer("So it is 7. The answer is 7 apples.\nMore.")
        == "So it is 7. The answer is 7 apples."
    )
    assert cut_after_answer("3 and 4 make 7\nok") == "3 and 4 make 7\nok"  # no final-answer marker: unchanged
    for p in train_problems()[:20]:  # the templates end on their answer
        assert cut_after_answer(p.concise()) == p.concise() and cut_after_answer(p.verbose()) == p.verbose()


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tinystories_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tinystories_dir)


@pytest.fixture(scope="module")
def plain(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=256))


@pytest.fixture(scope="module")
def artifact_path(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pipeline through the CLI: 100 pairs, direction at LAYER, a small KL calibration."""
    out = tmp_path_factory.mktemp("asc") / "tiny.safetensors"
    argv = ["cot", "build", "--model", str(tinystories_dir), "--layer", str(LAYER), "--out", str(out)]
    argv += ["--pairs", "100", "--calib-prompts", "6", "--calib-tokens", "24", "--budgets", "0.02,0.05,0.1"]
    assert main([*argv, "--no-onset"]) == 0
    return out


ONSET_LAYER, ONSET_TOKENS, ONSET_WEIGHT = 1, 4, 2.5


@pytest.fixture(scope="module")
def onset_art(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AscArtifact:
    """The same build with an onset push at the other layer (the CLI's default has one)."""
    out = tmp_path_factory.mktemp("asc_onset") / "onset.safetensors"
    argv = ["cot", "build", "--model", str(tinystories_dir), "--layer", str(LAYER), "--out", str(out)]
    argv += ["--pairs", "100", "--calib-prompts", "6", "--calib-tokens", "24", "--budgets", "0.02,0.05,0.1"]
    argv += ["--onset-layer", str(ONSET_LAYER), "--onset-tokens", str(ONSET_TOKENS)]
    assert main([*argv, "--onset-weight", str(ONSET_WEIGHT)]) == 0
    return load_artifact(out)


@pytest.fixture(scope="module")
def onset_eng(
    tinystories_dir: Path, onset_art: AscArtifact, tmp_path_factory: pytest.TempPathFactory
) -> LLMEngine:
    path = tmp_path_factory.mktemp("asc_onset_copy") / "onset.safetensors"
    save_artifact(onset_art, path)
    return LLMEngine(
        EngineConfig(
            model=str(tinystories_dir),
            num_kv_blocks=256,
            plugin_options={"cot_compression": {"artifact": str(path)}},
        )
    )


@pytest.fixture(scope="module")
def art(artifact_path: Path) -> AscArtifact:
    return load_artifact(artifact_path)


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path, artifact_path: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(tinystories_dir),
            num_kv_blocks=256,
            plugin_options={"cot_compression": {"artifact": str(artifact_path)}},
        )
    )


@pytest.fixture(scope="module")
def prompts(tok: Any) -> list[list[int]]:
    return [prompt_ids(tok, p.question) for p in heldout_problems()[:3]]


def cot(**kw: float) -> dict[str, Any]:
    return {"cot_compression": kw}


# -- the two traps, against transformers -----------------------------------------------------------
def hf_last(ref: Any, texts: list[list[int]], layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per text, at the last token: hidden_states[layer+1], hidden_states[layer], and what a forward hook
    on model.layers[layer] sees."""
    hooked: list[torch.Tensor] = []
    handle = ref.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: hooked.append((out[0] if isinstance(out, tuple) else out)[0, -1])
    )
    after, before = [], []
    try:
        with torch.no_grad():
            for ids in texts:
                hs = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states
                after.append(hs[layer + 1][0, -1])
                before.append(hs[layer][0, -1])
    finally:
        handle.remove()
    return torch.stack(after).double(), torch.stack(before).double(), torch.stack(hooked).double()


def test_direction_layer_and_sign_match_transformers(plain: LLMEngine, ref: Any, tok: Any) -> None:
    probs = train_problems()[:12]
    got = asc_directions(plain.runner, tok, probs, [0, 1], progress=False)
    concise = [solution_ids(tok, p.question, p.concise()) for p in probs]
    verbose = [solution_ids(tok, p.question, p.verbose()) for p in probs]
    for layer in (0, 1):
        c_after, c_before, c_hook = hf_last(ref, concise, layer)
        v_after, v_before, v_hook = hf_last(ref, verbose, layer)
        want = c_hook.mean(0) - v_hook.mean(0)  # concise - verbose, at the output of model.layers[L]
        d = got[layer].direction.double()
        assert (d - want).abs().max() < 1e-4 * want.abs().max(), f"layer {layer}"
        # the sign: concise - verbose, not verbose - concise
        assert torch.nn.functional.cosine_similarity(d, want, dim=0) > 0.9999
        off_by_one = c_before.mean(0) - v_before.mean(0)  # hidden_states[L]: the input of layer L
        assert (d - off_by_one).norm() > 0.1 * d.norm()
        if layer + 1 < len(ref.model.layers):  # hidden_states[L+1] is layer L's output but for the last
            assert (d - (c_after.mean(0) - v_after.mean(0))).abs().max() < 1e-4 * want.abs().max()
    assert got[0].stats["pair_accuracy"] > 0.5  # concise texts project higher along +d


def test_solution_mean_direction_matches_transformers(plain: LLMEngine, ref: Any, tok: Any) -> None:
    """The "solution_mean" build option: per text, model.layers[L]'s output averaged over the tokens after
    the prompt (computed here token by token from one transformers forward each), concise − verbose."""
    probs = train_problems()[20:30]
    got = asc_directions(plain.runner, tok, probs, [0, 1], progress=False, position="solution_mean")
    last = asc_directions(plain.runner, tok, probs, [0, 1], progress=False)
    for layer in (0, 1):
        means: dict[str, list[torch.Tensor]] = {"concise": [], "verbose": []}
        for p in probs:
            prompt = prompt_ids(tok, p.question)
            for style, text in (("concise", p.concise()), ("verbose", p.verbose())):
                ids = solution_ids(tok, p.question, text)
                k = common_prefix(ids, prompt)
                assert 0 < k < len(ids) and ids[:k] == prompt[:k]
                seen: list[torch.Tensor] = []
                handle = ref.model.layers[layer].register_forward_hook(
                    lambda _m, _i, out, seen=seen: seen.append(out[0] if isinstance(out, tuple) else out)
                )
                try:
                    with torch.no_grad():
                        ref(torch.tensor([ids]))
                finally:
                    handle.remove()
                means[style].append(seen[0][0, k:].double().mean(0))
        want = torch.stack(means["concise"]).mean(0) - torch.stack(means["verbose"]).mean(0)
        d = got[layer].direction.double()
        assert got[layer].position == "solution_mean"
        assert (d - want).abs().max() < 1e-4 * want.abs().max(), f"layer {layer}"
        assert torch.nn.functional.cosine_similarity(d, want, dim=0) > 0.9999  # the sign
        assert (d - last[layer].direction.double()).norm() > 0.1 * d.norm()  # the option changes something
    with pytest.raises(ValueError, match="position"):
        asc_directions(plain.runner, tok, probs, [0], position="first")  # type: ignore[arg-type]


def hf_answer(ref: Any, tok: Any, prompt: list[int], max_tokens: int) -> str:
    """transformers' greedy answer (EOS or `max_tokens`) as text, surrounding whitespace cut."""
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=0,
        )  # fmt: skip
    return tok.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True).strip()


def test_model_verbose_pairs_are_the_models_answers(plain: LLMEngine, ref: Any, tok: Any) -> None:
    """The "model" verbose source: each pair's verbose side is the model's own greedy answer to the
    question (transformers' greedy decode here), and the direction is concise − those answers."""
    probs, cap = train_problems()[40:48], 24
    texts = model_solutions(plain, probs, cap)
    assert texts == [hf_answer(ref, tok, prompt_ids(tok, p.question), cap) for p in probs]
    assert all(t and t != p.verbose() for t, p in zip(texts, probs, strict=True))
    got = asc_directions(plain.runner, tok, probs, [0, 1], progress=False, verbose=texts)
    template = asc_directions(plain.runner, tok, probs, [0, 1], progress=False)
    concise = [solution_ids(tok, p.question, p.concise()) for p in probs]
    verbose = [solution_ids(tok, p.question, t) for p, t in zip(probs, texts, strict=True)]
    for layer in (0, 1):
        want = hf_last(ref, concise, layer)[2].mean(0) - hf_last(ref, verbose, layer)[2].mean(0)
        d = got[layer].direction.double()
        assert got[layer].verbose_source == "model" and template[layer].verbose_source == "template"
        assert (d - want).abs().max() < 1e-4 * want.abs().max(), f"layer {layer}"
        assert (d - template[layer].direction.double()).norm() > 0.1 * d.norm()  # the option changes it
    cut = [t + "\nThe answer is 5" for t in texts]  # concise side given as text: model_cut
    both = asc_directions(plain.runner, tok, probs, [0], progress=False, verbose=texts, concise=cut)[0]
    ids = [solution_ids(tok, p.question, t) for p, t in zip(probs, cut, strict=True)]
    want = hf_last(ref, ids, 0)[2].mean(0) - hf_last(ref, verbose, 0)[2].mean(0)
    assert (both.verbose_source, both.concise_source) == ("model", "model_cut")
    assert (both.direction.double() - want).abs().max() < 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="verbose solutions"):
        asc_directions(plain.runner, tok, probs, [0], verbose=texts[:-1])
    with pytest.raises(ValueError, match="concise solutions"):
        asc_directions(plain.runner, tok, probs, [0], concise=texts[:-1])


def test_model_brief_pairs(plain: LLMEngine, ref: Any, tok: Any) -> None:
    """The "model_brief" concise side: the model's greedy answer to the question with BRIEF_INSTRUCTION
    appended (transformers' greedy decode here), read after the plain question; labelled as such."""
    probs, cap = train_problems()[48:54], 16
    brief = brief_solutions(plain, probs, cap)
    asked = [hf_answer(ref, tok, prompt_ids(tok, p.question + BRIEF_INSTRUCTION), cap) for p in probs]
    assert brief == asked
    assert brief != model_solutions(plain, probs, cap)  # the instruction changes what it writes
    own = model_solutions(plain, probs, cap)
    got = asc_directions(
        plain.runner,
        tok,
        probs,
        [0],
        progress=False,
        verbose=own,
        concise=brief,
        concise_source="model_brief",
    )[0]
    plain_ids = [solution_ids(tok, p.question, t) for p, t in zip(probs, brief, strict=True)]
    verbose = [solution_ids(tok, p.question, t) for p, t in zip(probs, own, strict=True)]
    want = hf_last(ref, plain_ids, 0)[2].mean(0) - hf_last(ref, verbose, 0)[2].mean(0)
    assert (got.verbose_source, got.concise_source) == ("model", "model_brief")
    assert (got.direction.double() - want).abs().max() < 1e-4 * want.abs().max()


def test_default_layers_are_the_measured_ones() -> None:
    """A default build must be what the README measured: main push at half the depth (15 of SmolLM2's
    30; the earlier 2/3, layer 20, made answers only 1.7 % shorter), onset at 2/5 (12)."""
    assert (default_layer(30), default_onset_layer(30)) == (15, 12)
    assert (default_layer(2), default_onset_layer(2)) == (1, 1)  # TinyStories: in range
    assert default_layer(32) == 16 and default_layer(1) == 0


def test_cli_onset_options_conflict(tinystories_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "x.safetensors"
    argv = ["cot", "build", "--model", str(tinystories_dir), "--out", str(out), "--no-onset"]
    assert main([*argv, "--onset-layer", "1"]) == 2
    assert "--no-onset" in capsys.readouterr().err and not out.exists()


def test_cli_model_verbose_source(
    tinystories_dir: Path, tmp_path: Path, plain: LLMEngine, art: AscArtifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cot build --verbose-source model [--concise-source model_cut]`: the artifact's direction is built
    from the model's answers (capped at --verbose-tokens) and says so; the template artifact differs."""
    out = tmp_path / "model.safetensors"
    argv = ["cot", "build", "--model", str(tinystories_dir), "--layer", str(LAYER)]
    argv += ["--pairs", "100", "--calib-prompts", "4", "--calib-tokens", "16", "--budgets", "0.05"]
    assert main([*argv, "--out", str(out), "--verbose-source", "model", "--verbose-tokens", "20"]) == 0
    got = load_artifact(out)
    assert got.info["verbose_source"] == "model" and art.info["verbose_source"] == "template"
    assert got.info["concise_source"] == art.info["concise_source"] == "template"
    probs = train_problems(100)
    own = model_solutions(plain, probs, 20)
    want = asc_directions(plain.runner, plain.tokenizer, probs, [LAYER], progress=False, verbose=own)
    d = want[LAYER].direction
    assert torch.allclose(got.direction, d, rtol=1e-4, atol=1e-5 * float(d.abs().max()))
    assert (got.direction - art.direction).norm() > 0.1 * got.direction.norm()
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(out), "--verbose-source", "mine"])
    brief_out = tmp_path / "brief.safetensors"
    assert (
        main([*argv, "--out", str(brief_out), "--concise-source", "model_brief", "--verbose-tokens", "20"])
        == 0
    )
    got_brief = load_artifact(brief_out)
    assert (got_brief.info["verbose_source"], got_brief.info["concise_source"]) == ("template", "model_brief")
    d_brief = asc_directions(
        plain.runner, plain.tokenizer, probs, [LAYER], progress=False,
        concise=brief_solutions(plain, probs, 20), concise_source="model_brief",
    )[LAYER].direction  # fmt: skip
    assert torch.allclose(got_brief.direction, d_brief, rtol=1e-4, atol=1e-5 * float(d_brief.abs().max()))

    # TinyStories never writes a final-answer line (its cut answers would equal the full ones): give its
    # answers one, with a run-on after it, so model_cut has something to cut
    def run_on(engine: Any, problems: list[Any], max_tokens: int) -> list[str]:
        return [
            f"{a}\n#### 5\nThe answer is: 5 and so on" for a in model_solutions(engine, problems, max_tokens)
        ]

    monkeypatch.setattr("actserve.interventions.cot_compression.build.model_solutions", run_on)
    cut_args = ["--verbose-source", "model", "--verbose-tokens", "20", "--concise-source", "model_cut"]
    assert main([*argv, "--out", str(tmp_path / "cut.safetensors"), *cut_args]) == 0
    cut = load_artifact(tmp_path / "cut.safetensors")
    assert (cut.info["verbose_source"], cut.info["concise_source"]) == ("model", "model_cut")
    full = [f"{a}\n#### 5\nThe answer is: 5 and so on" for a in own]
    d_cut = asc_directions(
        plain.runner, plain.tokenizer, probs, [LAYER], progress=False, verbose=full,
        concise=[f"{a}\n#### 5" for a in own],
    )[LAYER].direction  # fmt: skip
    assert torch.allclose(cut.direction, d_cut, rtol=1e-4, atol=1e-5 * float(d_cut.abs().max()))


def test_answer_stats(tok: Any) -> None:
    texts = ["So 4 times 2 is 8.\nThe answer is 8.\nThen we say 8 and 8 again", "I do not know", "Answer: 13"]
    outs = [tok.encode(t, add_special_tokens=False) for t in texts]
    got = answer_stats(tok, outs, [8, 3, 12], cap=len(outs[0]))
    lens = [len(o) for o in outs]
    first = len(tok.encode("So 4 times 2 is 8.\nThe answer is 8.", add_special_tokens=False))
    assert first < lens[0]
    assert got["mean_tokens"] == sum(lens) / 3 and got["median_tokens"] == sorted(lens)[1]
    assert got["hit_cap"] == 1  # only the first reaches the cap given
    assert got["first_answer_mean"] == (first + lens[1] + lens[2]) / 3
    assert got["accuracy"] == 1 / 3 and got["answered"] == 2 / 3  # 13 != 12; no number in the second
    assert got["samples"] == [tok.decode(o, skip_special_tokens=True) for o in outs]


def load_eval() -> Any:
    """bench/cot_compression_eval.py as a module (its sweep syntax and headline rule)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "cot_compression_eval.py"
    spec = importlib.util.spec_from_file_location("cot_compression_eval", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_sweep_and_headline_carry_the_pair_sources() -> None:
    ev = load_eval()
    got = ev.sweep("15:0.1 model@15:0.1,0.3 model@solution_mean@12:0.5 solution_mean@model@model_cut@20:0.2")
    assert got == {
        ("template", "template", "last", 15, None): [0.1],
        ("model", "template", "last", 15, None): [0.1, 0.3],
        ("model", "template", "solution_mean", 12, None): [0.5],
        ("model", "model_cut", "solution_mean", 20, None): [0.2],
    }
    assert ev.label(("model", "template", "solution_mean", 12, None)) == "L12 solution_mean model-verbose"
    assert ev.label(("model", "model_cut", "last", 12, None)) == "L12 model-verbose model_cut-concise"
    assert ev.label(("template", "template", "last", 15, None)) == "L15"
    assert ev.sweep("model@model_brief@15:0.2") == {("model", "model_brief", "last", 15, None): [0.2]}
    onset = ev.sweep("on12w16x2.5@15:0.05,0.1 model@on9w8x2@15:0.1")
    assert onset == {
        ("template", "template", "last", 15, (12, 16, 2.5)): [0.05, 0.1],
        ("model", "template", "last", 15, (9, 8, 2.0)): [0.1],
    }
    assert ev.label(("template", "template", "last", 15, (12, 16, 2.5))) == "L15 +onset L12 t<16 x2.5"
    for bad in ("mine@15:0.1", "on12w16@15:0.1", "on12x2@15:0.1"):
        with pytest.raises(Exception, match="prefix"):
            ev.sweep(bad)

    def row(source: str | None, budget: float, red: float, ok: bool = True) -> dict[str, Any]:
        r = {
            "position": "last",
            "layer": 15,
            "kl_budget": budget,
            "reduction_pct": red,
            "kl_within_budget": ok,
        }
        return r if source is None else {**r, "verbose_source": source, "concise_source": "template"}

    unsteered = {"position": None, "layer": None, "kl_budget": None, "reduction_pct": 0.0,
                 "kl_within_budget": None, "verbose_source": None}  # fmt: skip
    rows = [unsteered, row(None, 0.1, 28.0), row("model", 0.3, 35.0), row("model", 0.1, 31.0, ok=False)]
    model_03 = ("model", "template", "last", 15, None, 0.3)
    model_01 = ("model", "template", "last", 15, None, 0.1)
    plain_01 = ("template", "template", "last", 15, None, 0.1)
    swept = {plain_01, model_03, model_01}
    assert ev.choose_headline(rows, swept) == model_03  # the >= 30% one within budget
    assert ev.choose_headline(rows, swept - {model_03}) == plain_01
    assert ev.choose_headline(rows, {("model", "template", "last", 15, None, 0.5)}) is None
    # an onset row as the JSON holds it (a list): the smallest budget reaching 30 % wins
    with_onset = [{**row(None, b, red), "onset": [12, 16, 2.0]} for b, red in ((0.05, 31.0), (0.1, 40.0))]
    onset_005 = ("template", "template", "last", 15, (12, 16, 2.0), 0.05)
    assert ev.choose_headline(rows + with_onset, swept | {onset_005}) == onset_005


def test_common_prefix_random() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randint(0, 3, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g).tolist()
        b = torch.randint(0, 3, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g).tolist()
        want = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def hf_generate(
    ref: Any,
    prompt: list[int],
    layer: int,
    add: torch.Tensor | None,
    onset: tuple[int, torch.Tensor, int] | None = None,
) -> tuple[list[int], list]:
    """Greedy transformers decode; `add` is added to model.layers[layer]'s output at generated tokens
    (decode forwards: one new token each; the prefill forward holds the prompt); `onset` (layer, add,
    tokens): added at that layer's output in the first `tokens` decode forwards only."""
    handles = []

    def pushing(vec: torch.Tensor, tokens: int | None) -> Any:
        seen = [0]  # decode forwards so far: generated token k is processed by the k-th one

        def hook(_m: Any, _i: Any, out: Any) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            if h.shape[1] == 1:
                h = h + vec if tokens is None or seen[0] < tokens else h
                seen[0] += 1
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    pushes = [] if add is None else [(layer, add, None)]
    pushes += [] if onset is None else [onset]
    for at, vec, tokens in pushes:
        handles.append(ref.model.layers[at].register_forward_hook(pushing(vec, tokens)))
    try:
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    return out.sequences[0, len(prompt) :].tolist(), [x[0] for x in out.logits]


def test_request_adds_direction_at_layer_output(
    eng: LLMEngine, ref: Any, art: AscArtifact, prompts: list[list[int]]
) -> None:
    """Serving side of both traps: +γ·v (not −) at the output of model.layers[L] (not its input)."""
    gamma = 4.0
    with capture_logits() as seen:
        (tokens,) = run(eng, [prompts[0]], greedy(STEPS, min_tokens=STEPS), [cot(strength=gamma)], tag="t")
    want, want_logits = hf_generate(ref, prompts[0], art.layer, gamma * art.direction)
    for step, (a, b) in enumerate(zip(seen["t0"], want_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == want
    assert tokens != hf_generate(ref, prompts[0], art.layer, -gamma * art.direction)[0]
    assert tokens != hf_generate(ref, prompts[0], art.layer, None)[0]  # it does act


def test_onset_push_on_the_first_tokens_matches_transformers(
    onset_eng: LLMEngine, onset_art: AscArtifact, ref: Any, prompts: list[list[int]]
) -> None:
    """With an onset: +γ·v at layer L on every generated token and +γ·w·u at the onset layer on the
    first T generated tokens only, in one request, beside plain and zero-strength neighbours."""
    o = onset_art.onset
    assert o is not None and (o.layer, o.tokens, o.weight) == (ONSET_LAYER, ONSET_TOKENS, ONSET_WEIGHT)
    assert onset_art.info["onset"]["layer"] == ONSET_LAYER and o.direction.norm() > 0
    gamma = 3.0
    with capture_logits() as seen:
        got = run(onset_eng, prompts, greedy(STEPS, min_tokens=STEPS),
                  [cot(strength=gamma), None, cot(strength=0.0)], tag="o")  # fmt: skip
    main_push = gamma * onset_art.direction
    want, want_logits = hf_generate(
        ref, prompts[0], LAYER, main_push, (o.layer, gamma * o.weight * o.direction, o.tokens)
    )
    for step, (a, b) in enumerate(zip(seen["o0"], want_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert got[0] == want
    for i in (1, 2):
        assert got[i] == hf_generate(ref, prompts[i], LAYER, None)[0]
    # the window matters: the same onset on every token, or none, decodes otherwise
    always = hf_generate(ref, prompts[0], LAYER, main_push, (o.layer, gamma * o.weight * o.direction, STEPS))
    assert want != always[0] and want != hf_generate(ref, prompts[0], LAYER, main_push)[0]


def test_onset_kl_meter_matches_transformers(
    onset_eng: LLMEngine, onset_art: AscArtifact, ref: Any, tok: Any
) -> None:
    """Calibration covers both pushes: teacher-forced KL with the onset on positions [p, p + T)."""
    o = onset_art.onset
    assert o is not None
    ps = [prompt_ids(tok, p.question) for p in train_problems()[:3]]
    seqs = [Continuation(p, out) for p, out in zip(ps, generate(onset_eng, ps, 20), strict=True)]
    gamma = 2.0
    meter = KLMeter(onset_eng.runner, onset_eng.model_info, onset_art, seqs, batch_tokens=64)
    total, count = 0.0, 0
    for s in seqs:
        ids, p = torch.tensor([s.prompt + s.output]), len(s.prompt)

        def at(lo: int, hi: int | None, vec: torch.Tensor) -> Any:
            def hook(_m: Any, _i: Any, out: Any) -> Any:
                h = (out[0] if isinstance(out, tuple) else out).clone()
                h[:, lo:hi] += vec
                return (h, *out[1:]) if isinstance(out, tuple) else h

            return hook

        with torch.no_grad():
            base = torch.log_softmax(ref(ids).logits[0, p : len(ids[0]) - 1].float(), -1)
            handles = [
                ref.model.layers[LAYER].register_forward_hook(at(p, None, gamma * onset_art.direction)),
                ref.model.layers[o.layer].register_forward_hook(
                    at(p, p + o.tokens, gamma * o.weight * o.direction)
                ),
            ]
            steered = torch.log_softmax(ref(ids).logits[0, p : len(ids[0]) - 1].float(), -1)
            for h in handles:
                h.remove()
        total += float((steered.exp() * (steered - base)).sum())
        count += base.shape[0]
    assert meter.kl(gamma) == pytest.approx(total / count, rel=1e-3)
    assert onset_art.max_kl >= 0.1 and len(onset_art.gammas) >= 3


# -- the plugin is steering at generation positions ------------------------------------------------
def test_equals_steering_request(eng: LLMEngine, art: AscArtifact, prompts: list[list[int]]) -> None:
    gamma = 2.5
    steer = {"steering": {"vectors": [{"directions": {str(art.layer): art.direction.tolist()}, "scale": gamma,
                                        "phases": ["generation"]}]}}  # fmt: skip
    with capture_logits() as seen:
        a = run(eng, prompts, greedy(STEPS), [cot(strength=gamma)] * 3, tag="c")
        b = run(eng, prompts, greedy(STEPS), [steer] * 3, tag="s")
    assert a == b
    for i in range(3):
        assert all(torch.equal(x, y) for x, y in zip(seen[f"c{i}"], seen[f"s{i}"], strict=True))


def test_shares_the_steering_table_with_steering_requests(
    eng: LLMEngine, art: AscArtifact, prompts: list[list[int]]
) -> None:
    """A request carrying steering and CoT compression = one steering request with both vectors (the
    CoT direction takes the next column of its row), beside a CoT-only and a steering-only neighbour."""
    gamma, hidden = 2.5, eng.model_info.hidden_size
    other = (torch.randn(hidden, generator=torch.Generator().manual_seed(5)) * 3).tolist()
    mine = {"directions": {"1": other}, "scale": 1.5}
    asc = {"directions": {str(art.layer): art.direction.tolist()}, "scale": gamma, "phases": ["generation"]}
    both = {"steering": {"vectors": [mine]}, **cot(strength=gamma)}
    as_one = {"steering": {"vectors": [mine, asc]}}
    with capture_logits() as seen:
        a = run(
            eng, prompts, greedy(STEPS), [both, cot(strength=gamma), {"steering": {"vectors": [mine]}}], "b"
        )
        b = run(
            eng,
            prompts,
            greedy(STEPS),
            [as_one, {"steering": {"vectors": [asc]}}, {"steering": {"vectors": [mine]}}],
            "o",
        )
    assert a == b
    for i in range(3):
        assert all(torch.equal(x, y) for x, y in zip(seen[f"b{i}"], seen[f"o{i}"], strict=True))
    shared = eng.registry.plugins["cot_compression"]._reserved(0)[0]  # type: ignore[attr-defined]
    assert shared is eng.registry.plugins["steering"]


def test_strength_zero_is_bit_identical(eng: LLMEngine, prompts: list[list[int]]) -> None:
    with capture_logits() as seen:
        plain_out = run(eng, prompts, greedy(STEPS), None, tag="p")
        zero_out = run(eng, prompts, greedy(STEPS), [cot(strength=0.0), cot(kl_budget=0.0), None], tag="z")
        mixed = run(eng, prompts, greedy(STEPS), [cot(strength=0.0), None, cot(strength=6.0)], tag="m")
    assert zero_out == plain_out and mixed[:2] == plain_out[:2] and mixed[2] != plain_out[2]
    for i in range(3):
        assert all(torch.equal(x, y) for x, y in zip(seen[f"p{i}"], seen[f"z{i}"], strict=True))
    for i in range(2):  # beside a steered neighbour too
        assert all(torch.equal(x, y) for x, y in zip(seen[f"p{i}"], seen[f"m{i}"], strict=True))


# -- calibration -----------------------------------------------------------------------------------
def test_kl_budget_maps_monotonically(eng: LLMEngine, art: AscArtifact) -> None:
    assert len(art.gammas) >= 3 and art.max_kl >= 0.1
    means = art.info["calibration"]["mean_kl"]  # the table holds upper bounds, above these means
    assert len(means) == len(art.kls) and all(0 < m < k for m, k in zip(means, art.kls, strict=True))
    assert all(g1 < g2 for g1, g2 in zip(art.gammas, art.gammas[1:], strict=False))
    assert art.kls == sorted(set(art.kls))
    budgets = [art.max_kl * f for f in (0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0)]
    gammas = [eng.registry.prepare(cot(kl_budget=b))["cot_compression"].gamma for b in budgets]
    assert gammas[0] == 0.0 and all(a < b for a, b in zip(gammas, gammas[1:], strict=False))
    for g, k in zip(art.gammas, art.kls, strict=True):  # a table point maps to itself
        assert art.gamma_for(k) == pytest.approx(g)
    assert eng.registry.prepare(cot(strength=1.5))["cot_compression"].gamma == 1.5


def test_kl_meter_matches_transformers(eng: LLMEngine, ref: Any, art: AscArtifact, tok: Any) -> None:
    """The calibrated quantity: teacher-forced KL(steered ‖ unsteered) at generated positions t >= 2."""
    ps = [prompt_ids(tok, p.question) for p in train_problems()[:3]]
    seqs = [Continuation(p, o) for p, o in zip(ps, generate(eng, ps, 20), strict=True)]
    gamma = 3.0
    meter = KLMeter(eng.runner, eng.model_info, art, seqs, batch_tokens=64)  # several chunks
    total, count, sums, counts = 0.0, 0, [], []
    for s in seqs:
        ids, p = torch.tensor([s.prompt + s.output]), len(s.prompt)

        def hook(_m: Any, _i: Any, out: Any, p: int = p) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, p:] += gamma * art.direction
            return (h, *out[1:]) if isinstance(out, tuple) else h

        with torch.no_grad():
            base = torch.log_softmax(ref(ids).logits[0, p : len(ids[0]) - 1].float(), -1)
            handle = ref.model.layers[art.layer].register_forward_hook(hook)
            try:
                steered = torch.log_softmax(ref(ids).logits[0, p : len(ids[0]) - 1].float(), -1)
            finally:
                handle.remove()
        total += float((steered.exp() * (steered - base)).sum())
        count += base.shape[0]
        sums.append(float((steered.exp() * (steered - base)).sum()))
        counts.append(base.shape[0])
    assert meter.positions == count
    assert meter.kl(gamma) == pytest.approx(total / count, rel=1e-3)
    assert meter.kl(0.0) == 0.0 == meter.kl_upper(0.0)
    # the upper bound: pooled mean + z standard errors of the ratio estimator, here in plain Python
    m, mean, nbar = len(sums), total / count, count / len(counts)
    var = sum((k - mean * n) ** 2 for k, n in zip(sums, counts, strict=True)) / (m * (m - 1)) / nbar**2
    assert meter.kl_upper(gamma) == pytest.approx(mean + 1.645 * var**0.5, rel=1e-3)
    plain = KLMeter(eng.runner, eng.model_info, art, seqs, z=0.0)
    assert plain.kl_upper(gamma) == pytest.approx(meter.kl(gamma), rel=1e-6)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"strength": 1.0, "kl_budget": 0.1}, "interventions.cot_compression"),
        ({}, "interventions.cot_compression"),
        ({"strength": float("nan")}, "interventions.cot_compression.strength"),
        ({"strength": float("inf")}, "interventions.cot_compression.strength"),
        ({"strength": 9.0}, "interventions.cot_compression.strength"),
        ({"strength": "much"}, "interventions.cot_compression.strength"),
        ({"kl_budget": -0.1}, "interventions.cot_compression.kl_budget"),
        ({"kl_budget": 5.0}, "interventions.cot_compression.kl_budget"),  # above the calibrated range
        ({"kl_budget": float("nan")}, "interventions.cot_compression.kl_budget"),
        ({"strength": 1.0, "colour": 1}, "interventions.cot_compression.colour"),
    ],
)
def test_bad_specs_name_the_field(eng: LLMEngine, bad: dict[str, Any], param: str) -> None:
    with pytest.raises(InterventionError) as e:
        eng.registry.prepare({"cot_compression": bad})
    assert e.value.param == param


def test_not_configured(plain: LLMEngine) -> None:
    with pytest.raises(InterventionError) as e:
        plain.registry.prepare(cot(strength=1.0))
    assert str(e.value) == NOT_CONFIGURED and e.value.param == "interventions.cot_compression"


def test_artifact_files(art: AscArtifact, tmp_path: Path, tinystories_dir: Path, plain: LLMEngine) -> None:
    path = tmp_path / "a.safetensors"
    save_artifact(art, path)
    back = load_artifact(path)
    assert torch.equal(back.direction, art.direction) and (back.gammas, back.kls) == (art.gammas, art.kls)
    assert back.layer == LAYER and back.info["pairs"] == 100 and back.info["position"] == "last"
    assert back.info["verbose_source"] == "template"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        load_artifact(tmp_path / "junk.safetensors")
    # an onset survives the round trip; a version 1 file (before onsets) still loads
    o = Onset(torch.randn(art.hidden_size, generator=torch.Generator().manual_seed(3)), 1, 7, 1.75)
    save_artifact(dataclasses.replace(art, onset=o), tmp_path / "o.safetensors")
    got = load_artifact(tmp_path / "o.safetensors").onset
    assert got is not None and torch.equal(got.direction, o.direction)
    assert (got.layer, got.tokens, got.weight) == (1, 7, 1.75)
    tensors = {"direction": art.direction, "calibration.gamma": torch.tensor(art.gammas, dtype=torch.float64),
               "calibration.kl": torch.tensor(art.kls, dtype=torch.float64)}  # fmt: skip
    meta = {"format": "actserve.asc", "version": "1", "layer": "0", "hidden_size": str(art.hidden_size),
            "num_layers": "2", "model": "m", "info": "{}"}  # fmt: skip
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    v1 = load_artifact(tmp_path / "v1.safetensors")
    assert v1.onset is None and torch.equal(v1.direction, art.direction)
    with_onset = {**tensors, "onset.direction": art.direction.clone()}
    for bad_tensors, bad_meta, match in (
        (tensors, {**meta, "version": "9"}, "version"),
        (with_onset, {**meta, "onset_layer": "1", "onset_tokens": "0", "onset_weight": "2"}, "onset_tokens"),
        (tensors, {**meta, "onset_layer": "1", "onset_tokens": "4", "onset_weight": "2"}, "incomplete"),
        (with_onset, {**meta, "onset_layer": "1", "onset_tokens": "4"}, "incomplete"),
        (tensors, {**meta, "info": "[" * 50_000 + "]" * 50_000}, "RecursionError"),
        (tensors, {**meta, "layer": "²"}, "incomplete"),
    ):
        save_file(bad_tensors, str(tmp_path / "bad.safetensors"), metadata=bad_meta)
        with pytest.raises(ArtifactError, match=match):
            load_artifact(tmp_path / "bad.safetensors")
    far = dataclasses.replace(art, onset=dataclasses.replace(o, layer=5))
    with pytest.raises(ArtifactError, match="onset layer 5"):
        far.check_fits(plain.model_info)
    wide = AscArtifact(torch.ones(64), 0, 2, "other", [1.0], [0.1])
    save_artifact(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ArtifactError, match="hidden size 64"):
        wide_path = str(tmp_path / "wide.safetensors")
        LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64,
                               plugin_options={"cot_compression": {"artifact": wide_path}}))  # fmt: skip


# -- the artifact shipped for the embedded default model ----------------------------------------------
def test_shipped_default_artifact_fits_the_default_model(default_model_dir: Path) -> None:
    """`--cot-compression default` on the embedded default model: the packaged file loads, fits its
    shapes, is the default build (layer 15, onset 12 / 16 tokens / x2) and maps budget 0.1 to the
    headline's γ; the engine serves it."""
    from actserve.server.models.default_model import DEFAULT_MODEL_NAME

    assert SHIPPED_ARTIFACT.stat().st_size < 64 * 2**10
    art = load_artifact(SHIPPED_ARTIFACT)
    config = json.loads((default_model_dir / "config.json").read_text())
    assert (art.hidden_size, art.num_layers) == (config["hidden_size"], config["num_hidden_layers"])
    assert (art.model, art.layer) == (DEFAULT_MODEL_NAME, 15)
    assert art.onset is not None and (art.onset.layer, art.onset.tokens, art.onset.weight) == (12, 16, 2.0)
    assert art.info["pairs"] == 120 and art.max_kl >= 0.5
    assert art.gamma_for(0.1) == pytest.approx(0.317, abs=0.02)
    eng = LLMEngine(
        EngineConfig(
            num_kv_blocks=16, max_model_len=256, plugin_options={"cot_compression": {"artifact": "default"}}
        )
    )
    assert resolve_artifact_path("default", eng.model_info) == SHIPPED_ARTIFACT
    assert torch.equal(eng.registry.plugins["cot_compression"].artifact.direction, art.direction)
    plan = eng.registry.prepare(cot(kl_budget=0.1))["cot_compression"]
    assert plan.gamma == pytest.approx(art.gamma_for(0.1))
    eng.registry.release({"cot_compression": plan})


def test_default_artifact_is_refused_for_other_models(tinystories_dir: Path) -> None:
    with pytest.raises(ArtifactError, match="shipped artifact is for the embedded default model"):
        LLMEngine(
            EngineConfig(
                model=str(tinystories_dir),
                num_kv_blocks=64,
                plugin_options={"cot_compression": {"artifact": "default"}},
            )
        )


# -- HTTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tinystories_dir: Path, artifact_path: Path) -> Iterator[LiveServer]:
    s = start_server(
        tinystories_dir,
        num_kv_blocks=128,
        plugin_options={"cot_compression": {"artifact": str(artifact_path)}},
    )
    yield s
    s.stop()


def test_http(server: LiveServer, art: AscArtifact) -> None:
    body: dict[str, Any] = {
        "model": "tinystories-656k",
        "prompt": "Question: 3 apples?\nAnswer:",
        "max_tokens": 8,
    }
    ok = httpx.post(
        f"{server.url}/v1/completions", json={**body, "interventions": cot(kl_budget=art.max_kl / 2)}
    )
    assert ok.status_code == 200, ok.text
    bad = httpx.post(
        f"{server.url}/v1/completions", json={**body, "interventions": cot(kl_budget=art.max_kl * 2)}
    )
    assert (
        bad.status_code == 400 and bad.json()["error"]["param"] == "interventions.cot_compression.kl_budget"
    )
    listed = {p["name"]: p for p in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
    assert listed["cot_compression"]["schema"]["x-actserve-artifact"]["kl_budget_max"] == art.max_kl
