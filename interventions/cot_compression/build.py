"""`actserve cot build`: the ASC direction and its KL calibration for one model, into one artifact file.

1. Pairs: for each generated training problem, the chat-formatted conversation (user question, assistant
   solution) once with the VERBOSE and once with the CONCISE solution; trailing whitespace after the
   end-of-turn token is cut, so the last token is the end-of-turn marker in both texts and the pair
   differs only in the style of the solution before it.
2. Direction at layer L = mean over pairs of (concise − verbose) last-token residuals, read with
   `collect_residuals` at the output of decoder layer L (= transformers' `hidden_states[L+1]`; NOT
   `hidden_states[L]`, the input of layer L: the public ASC code's off-by-one), and ADDED when serving
   (h + γ·v with γ > 0 compresses; the public code subtracts it: its sign trap). The read-out position
   is a build option: "last" (the end-of-turn token; the paper's choice and the default) or
   "solution_mean" (each text's residuals averaged over its solution tokens, everything after the
   question's prompt): the steered positions are solution tokens, not an end-of-turn marker.
   The verbose side is a build option too: "template" (the generated English step-by-step solution, the
   default) or "model" (the model's own unsteered greedy answer to the question, EOS or the token cap, as
   the ASC paper does): the direction should point away from what the model actually writes, and its
   answers (GSM8K style, often running on after the answer) look nothing like the template. So is the
   concise side: "template" (math notation, the default) or "model_cut" (the model's own answer cut after
   the line with its first final answer, `cut_after_answer`): with verbose "model", a pair then differs
   only in what the model writes after its answer, the run-on and loops that dominate the mean length;
   or "model_brief" (the model's own answer when the question asks it to be brief, `brief_solutions`).
3. Calibration: unsteered greedy continuations of calibration questions (training problems), then the
   teacher-forced mean per-token KL (measure.py) at a probe strength gives vᵀFv ≈ 2·KL/γ², the start
   γ0 = sqrt(2ε / vᵀFv) for each budget ε, refined by bisection; every measured (γ, KL) point goes into
   the table (made strictly increasing) that maps a request's kl_budget to γ.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from actserve.interventions.cot_compression.artifact import (
    AscArtifact,
    Onset,
    interpolate_gamma,
    monotone_table,
)
from actserve.interventions.cot_compression.measure import UPPER_Z, Continuation, KLMeter, generate
from actserve.interventions.cot_compression.problems import Problem, cut_after_answer, train_problems
from actserve.interventions.cot_compression.schema import MAX_STRENGTH
from actserve.interventions.steering.train import direction, layer_stats, residuals

log = logging.getLogger(__name__)
DEFAULT_BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
ReadPosition = Literal["last", "solution_mean"]
READ_POSITIONS: tuple[ReadPosition, ...] = ("last", "solution_mean")
VerboseSource = Literal["template", "model"]
VERBOSE_SOURCES: tuple[VerboseSource, ...] = ("template", "model")
ConciseSource = Literal["template", "model_cut", "model_brief"]
CONCISE_SOURCES: tuple[ConciseSource, ...] = ("template", "model_cut", "model_brief")
# appended to a training question for the "model_brief" concise side (the pair itself is read without it)
BRIEF_INSTRUCTION = " Be very brief: one line of math, then the answer."


def default_layer(num_layers: int) -> int:
    """Half the depth: layer 15 of SmolLM2-135M's 30, the layer its headline measured (with the onset,
    38.0 % shorter at KL budget 0.1 on held-out problems). The ASC paper's 2/3 (layer 20 of 30) made
    answers only 1.7 % shorter there (50 outside word problems; layer 15: 29.9 %)."""
    return min(num_layers - 1, num_layers // 2)


DEFAULT_ONSET_TOKENS, DEFAULT_ONSET_WEIGHT = 16, 2.0  # measured on SmolLM2-135M (bench/cot_explore.py)


def default_onset_layer(num_layers: int) -> int:
    """Two fifths of the depth: layer 12 of SmolLM2-135M's 30, where the onset push worked best there
    (layers 10-14 measured; an earlier layer is more likely to send answers into loops)."""
    return min(num_layers - 1, round(num_layers * 2 / 5))


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The question as /v1/chat/completions sends it (chat template with the generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"Question: {question}\nAnswer:")


def solution_ids(tokenizer: Any, question: str, solution: str) -> list[int]:
    """Question and solution as one chat; without a chat template, prompt + solution + EOS."""
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        return tokenizer.encode(text.rstrip(), add_special_tokens=False)
    ids = tokenizer.encode(f"Question: {question}\nAnswer: {solution}")
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclass
class LayerDirection:
    layer: int
    direction: torch.Tensor  # float32 [hidden], concise - verbose
    stats: dict[str, Any]
    position: ReadPosition = "last"
    verbose_source: VerboseSource = "template"
    concise_source: ConciseSource = "template"


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def solution_means(
    runner: Any,
    texts: list[list[int]],
    prefixes: list[list[int]],
    layers: list[int],
    batch_tokens: int = 4096,
    progress: bool | None = None,
) -> torch.Tensor:
    """[len(texts), len(layers), hidden] float64: each text's residual averaged over its tokens after the
    prefix it shares with its prompt (the solution and the end-of-turn marker).

    Attention is causal, so the prefix's residuals inside the text equal those of the prefix alone; the
    solution mean is then (n·mean(text) − k·mean(prefix)) / (n − k), from two `collect_residuals(...,
    "mean")` passes, without a second capture implementation."""
    ks = [min(common_prefix(t, p), len(t) - 1) for t, p in zip(texts, prefixes, strict=True)]
    if any(k == 0 for k in ks):
        raise ValueError("a solution text shares no prefix with its prompt")
    full = residuals(runner, texts, layers, "mean", batch_tokens, progress).double()
    heads = [t[:k] for t, k in zip(texts, ks, strict=True)]
    pre = residuals(runner, heads, layers, "mean", batch_tokens, False).double()
    n = torch.tensor([len(t) for t in texts], dtype=torch.float64)[:, None, None]
    k = torch.tensor(ks, dtype=torch.float64)[:, None, None]
    return (n * full - k * pre) / (n - k)


def asc_directions(
    runner: Any,
    tokenizer: Any,
    problems: list[Problem],
    layers: list[int],
    batch_tokens: int = 4096,
    progress: bool | None = None,
    position: ReadPosition = "last",
    verbose: list[str] | None = None,
    concise: list[str] | None = None,
    concise_source: ConciseSource | None = None,
) -> dict[int, LayerDirection]:
    """Mean (concise − verbose) residual at each layer (several layers cost one pass), read at the last
    token or averaged over the solution tokens (`position`, see the module docstring). `verbose`: the
    model's own answers, one per problem (`model_solutions`), instead of the verbose template; `concise`:
    those answers cut after their first final answer (`cut_after_answer`) instead of the concise one."""
    if position not in READ_POSITIONS:
        raise ValueError(f"position must be one of {READ_POSITIONS}, got {position!r}")
    for name, given in (("verbose", verbose), ("concise", concise)):
        if given is not None and len(given) != len(problems):
            raise ValueError(f"{len(given)} {name} solutions for {len(problems)} problems")
    source: VerboseSource = "template" if verbose is None else "model"
    if concise is None:
        concise_source = "template"
    elif concise_source is None or concise_source == "template":
        concise_source = "model_cut"
    verbose_texts = [p.verbose() for p in problems] if verbose is None else verbose
    concise_texts = [p.concise() for p in problems] if concise is None else concise
    concise_ids = [
        solution_ids(tokenizer, p.question, c) for p, c in zip(problems, concise_texts, strict=True)
    ]
    verbose_ids = [
        solution_ids(tokenizer, p.question, v) for p, v in zip(problems, verbose_texts, strict=True)
    ]
    if position == "last":
        h = residuals(runner, concise_ids + verbose_ids, layers, "last", batch_tokens, progress).double()
    else:
        prompts = [prompt_ids(tokenizer, p.question) for p in problems]
        h = solution_means(
            runner, concise_ids + verbose_ids, prompts + prompts, layers, batch_tokens, progress
        )
    pos, neg = h[: len(problems)], h[len(problems) :]
    out = {}
    for k, layer in enumerate(layers):
        d = direction(pos[:, k], neg[:, k], "mean_diff")  # concise - verbose: ADDED to compress
        st = layer_stats(pos[:, k], neg[:, k], d, paired=True)
        stats = {
            "norm": st.norm,
            "projection_gap": st.projection_gap,
            "separation": st.separation,
            "pair_accuracy": st.pair_accuracy,
            "mean_residual_norm": float(h[:, k].norm(dim=-1).mean()),
            "mean_text_tokens": {
                "concise": sum(map(len, concise_ids)) / len(concise_ids),
                "verbose": sum(map(len, verbose_ids)) / len(verbose_ids),
            },
        }
        out[layer] = LayerDirection(layer, d.float().contiguous(), stats, position, source, concise_source)
    return out


def calibration_set(engine: Any, problems: list[Problem], max_tokens: int) -> list[Continuation]:
    """Unsteered greedy continuations of the problems' questions (what KL is measured along)."""
    prompts = [prompt_ids(engine.tokenizer, p.question) for p in problems]
    outs = generate(engine, prompts, max_tokens, tag="calib")
    return [Continuation(p, o) for p, o in zip(prompts, outs, strict=True)]


def model_solutions(engine: Any, problems: list[Problem], max_tokens: int) -> list[str]:
    """The model's own unsteered greedy answers (EOS or `max_tokens`), as text with surrounding whitespace
    cut: the "model" verbose side, the chain of thought the direction should steer away from."""
    seqs = calibration_set(engine, problems, max_tokens)
    return [engine.tokenizer.decode(s.output, skip_special_tokens=True).strip() for s in seqs]


def brief_solutions(engine: Any, problems: list[Problem], max_tokens: int) -> list[str]:
    """The model's own answers when the question asks for brevity (`BRIEF_INSTRUCTION`): the "model_brief"
    concise side. Paired with the plain question, the direction is the model's own concise mode against
    its usual one, both in its own words (a 135M model writes nothing like the math-notation template)."""
    asked = [dataclasses.replace(p, question=p.question + BRIEF_INSTRUCTION) for p in problems]
    return model_solutions(engine, asked, max_tokens)


def concise_texts(own: list[str], brief: list[str], source: ConciseSource) -> list[str] | None:
    """The concise side's texts for `source` (None: the template) from the model's plain and brief answers."""
    if source == "model_cut":
        return [cut_after_answer(a) for a in own]
    return brief if source == "model_brief" else None


@dataclass
class Calibration:
    gammas: list[float]
    kls: list[float]  # the budget column: upper confidence bounds of the mean per-token KL
    means: list[float]  # the measured means at the same γ
    vfv: float  # second-order estimate of vᵀFv along the direction
    probe: float
    points: list[tuple[float, float, float]] = field(default_factory=list)  # (γ, mean, upper) measured
    targets: dict[str, float] = field(default_factory=dict)  # budget -> γ from the table


def calibrate(
    meter: KLMeter,
    budgets: tuple[float, ...] = DEFAULT_BUDGETS,
    probe: float = 0.05,
    rel_tol: float = 0.1,
    max_steps: int = 6,
) -> Calibration:
    """Bisect γ for each budget on the KL's upper confidence bound (`KLMeter.kl_upper`: a γ calibrated on
    the mean would overshoot the budget on about half of all other prompt sets), starting from the
    second-order estimate γ0 = sqrt(2ε / vᵀFv); γ stays within the request schema's strength range."""
    while meter.kl(probe) < 1e-7 and probe < MAX_STRENGTH / 4:  # too small to see above rounding noise
        probe *= 4
    vfv = max(2 * meter.kl_upper(probe) / probe**2, 1e-12)
    for eps in sorted(budgets):
        g = min(math.sqrt(2 * eps / vfv), MAX_STRENGTH)
        for _ in range(max_steps):
            meter.kl_upper(g)
            lo = max((x for x, k in meter.upper.items() if k < eps), default=0.0)
            hi = min((x for x, k in meter.upper.items() if k >= eps), default=math.inf)
            bracketed = lo > 0 and math.isfinite(hi)
            # stop once a measured point at or above the budget exists and one side is close to it
            if bracketed and min(eps - meter.upper[lo], meter.upper[hi] - eps) <= rel_tol * eps:
                break
            if lo >= MAX_STRENGTH:
                break  # this budget is out of reach
            g = (
                (lo + hi) / 2
                if bracketed
                else (hi / 1.6 if math.isfinite(hi) else min(max(lo, g) * 1.6, MAX_STRENGTH))
            )
    points = sorted((g, meter.kl(g), u) for g, u in meter.upper.items())
    gammas, kls = monotone_table([(g, u) for g, _, u in points])
    if not kls:
        raise ValueError("calibration measured no KL at any strength: the direction has no effect")
    means = [meter.kl(g) for g in gammas]
    targets = {str(eps): interpolate_gamma(gammas, kls, eps) for eps in budgets if eps <= kls[-1]}
    log.info("calibration (gamma, kl, upper): %s", [tuple(round(x, 4) for x in p) for p in points])
    return Calibration(gammas, kls, means, vfv, probe, points, targets)


def build_artifact(
    engine: Any,
    layer: int,
    *,
    train: list[Problem] | None = None,
    direction_: LayerDirection | None = None,
    calib: list[Continuation] | None = None,
    calib_prompts: int = 16,
    calib_tokens: int = 256,
    budgets: tuple[float, ...] = DEFAULT_BUDGETS,
    batch_tokens: int = 4096,
    progress: bool | None = None,
    position: ReadPosition = "last",
    verbose_source: VerboseSource = "template",
    verbose_tokens: int = 256,
    concise_source: ConciseSource = "template",
    onset: tuple[int, int, float] | None = None,
    onset_direction: LayerDirection | None = None,
) -> AscArtifact:
    """Direction and calibration continuations (unless given) + calibration on a loaded native engine.
    `verbose_source` "model": the verbose side is the model's greedy answer, capped at `verbose_tokens`;
    `concise_source` "model_cut": the concise side is that answer cut after its first final answer.
    `onset` (layer, tokens, weight): add an `Onset` read from the same pairs at that layer (or given
    as `onset_direction`); γ is then calibrated for both pushes together."""
    runner, info = engine.runner, engine.model_info
    if getattr(runner.model, "spec", None) is None:
        raise ValueError("cot build needs the native model implementation (not the transformers fallback)")
    if not 0 <= layer < info.num_layers:
        raise ValueError(f"--layer {layer} out of range [0, {info.num_layers - 1}]")
    if verbose_source not in VERBOSE_SOURCES:
        raise ValueError(f"verbose source must be one of {VERBOSE_SOURCES}, got {verbose_source!r}")
    if concise_source not in CONCISE_SOURCES:
        raise ValueError(f"concise source must be one of {CONCISE_SOURCES}, got {concise_source!r}")
    if onset is not None:
        o_layer, o_tokens, o_weight = onset
        if not 0 <= o_layer < info.num_layers:
            raise ValueError(f"onset layer {o_layer} out of range [0, {info.num_layers - 1}]")
        if o_tokens < 1 or not (math.isfinite(o_weight) and o_weight > 0):
            raise ValueError(f"onset tokens must be >= 1 and its weight > 0, got {o_tokens}, {o_weight}")
    train = train if train is not None else train_problems()
    need = [] if direction_ is not None else [layer]  # layers whose direction is still to be read
    if onset is not None and onset_direction is None:
        need.append(onset[0])
    if need:
        own: list[str] = []  # the model's own answers, generated once when either side needs them
        if verbose_source == "model" or concise_source == "model_cut":
            own = model_solutions(engine, train, verbose_tokens)
        brief = brief_solutions(engine, train, verbose_tokens) if concise_source == "model_brief" else []
        verbose = own if verbose_source == "model" else None
        concise = concise_texts(own, brief, concise_source)
        dirs = asc_directions(
            runner, engine.tokenizer, train, sorted(set(need)), batch_tokens, progress, position, verbose,
            concise, concise_source,
        )  # fmt: skip
        direction_ = direction_ or dirs[layer]
        if onset is not None and onset_direction is None:
            onset_direction = dirs[onset[0]]
    d = direction_
    assert d is not None
    art = AscArtifact(direction=d.direction, layer=layer, num_layers=info.num_layers, model=info.name)
    if onset is not None:
        assert onset_direction is not None
        art.onset = Onset(onset_direction.direction, onset[0], onset[1], float(onset[2]))
    seqs = calib if calib is not None else calibration_set(engine, train[:calib_prompts], calib_tokens)
    meter = KLMeter(runner, info, art, seqs, batch_tokens)
    cal = calibrate(meter, budgets)
    art.gammas, art.kls = cal.gammas, cal.kls
    art.info = {
        "method": "ASC: mean(concise) - mean(verbose) residual, added at generated tokens",
        "position": d.position,  # "last" token or "solution_mean" (averaged over the solution tokens)
        "verbose_source": d.verbose_source,  # "template" or "model" (its own greedy answers)
        "concise_source": d.concise_source,  # "template" or "model_cut" (its answers cut after the answer)
        "direction": "raw (not unit norm); strength 1 = the whole mean concise-verbose gap",
        "layer_convention": "output of decoder layer L = transformers hidden_states[L+1]",
        "pairs": len(train),
        "text": "chat: user question + assistant solution, trailing whitespace cut (no template: Q/A + EOS)",
        "direction_stats": d.stats,
        "onset": None
        if onset is None
        else {
            "layer": onset[0],
            "tokens": onset[1],
            "weight": onset[2],
            "what": "the pairs' direction at this layer, strength γ·weight, generated tokens [0, tokens)",
            "direction_stats": onset_direction.stats if onset_direction is not None else None,
        },
        "calibration": {
            "kl": "teacher-forced mean per-token KL(steered || unsteered), nats, generated positions t>=2; "
            f"the table (budget -> gamma) holds its one-sided upper confidence bound (mean + {UPPER_Z} "
            "standard errors over the calibration prompts), 'mean_kl' the means",
            "mean_kl": cal.means,
            "prompts": len(seqs),
            "max_tokens": max(len(s.output) for s in seqs),
            "positions": meter.positions,
            "vFv": cal.vfv,
            "probe_gamma": cal.probe,
            "budget_gammas": cal.targets,
            "measured": [list(p) for p in cal.points],  # [gamma, mean, upper]
        },
    }
    return art
