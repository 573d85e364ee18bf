"""Tests for the batched sampler against a deliberately naive per-row float64 reference."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from actserve.server.engine.sampler import SamplingRow, apply_penalties, sample
from actserve.server.engine.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    eos: list[int] | None = None,
) -> SamplingRow:
    return SamplingRow(
        params=params or SamplingParams(),
        prompt_token_ids=list(prompt or []),
        output_token_ids=list(output or []),
        generator=generator,
        eos_token_ids=list(eos or []),
    )


# ----------------------------------------------------------------------------------------------------
# Reference: one row at a time, python lists of float64, written to be obviously right.
# ----------------------------------------------------------------------------------------------------


def ref_penalised(logits: list[float], row: SamplingRow) -> list[float]:
    p = row.params
    out = [float(x) for x in logits]
    if len(row.output_token_ids) < p.min_tokens:
        for t in row.eos_token_ids + p.stop_token_ids:
            out[t] = NEG_INF
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt_token_ids + row.output_token_ids):
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, c in Counter(row.output_token_ids).items():
        out[t] -= p.frequency_penalty * c + p.presence_penalty * (1 if c > 0 else 0)
    return out


def ref_softmax(values: list[float]) -> list[float]:
    m = max(values)
    exps = [math.exp(v - m) if v != NEG_INF else 0.0 for v in values]
    s = sum(exps)
    return [e / s for e in exps]


def ref_argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def ref_distribution(logits: list[float], row: SamplingRow) -> list[float]:
    """The exact sampling distribution of a non-greedy row: penalties, temperature, top_k, top_p, min_p."""
    p = row.params
    vocab = len(logits)
    scaled = [x / p.temperature for x in ref_penalised(logits, row)]
    order = sorted(range(vocab), key=lambda i: -scaled[i])
    kept = order[: p.top_k] if 0 < p.top_k < vocab else order
    probs = ref_softmax([scaled[i] for i in kept])
    if p.top_p < 1.0:
        mass_above, n_keep = 0.0, 0
        for q in probs:
            if mass_above >= p.top_p:
                break
            mass_above += q
            n_keep += 1
        kept = kept[: max(n_keep, 1)]
        probs = ref_softmax([scaled[i] for i in kept])
    if p.min_p > 0.0:
        top = max(probs)
        kept = [t for t, q in zip(kept, probs, strict=True) if q >= p.min_p * top]
        probs = ref_softmax([scaled[i] for i in kept])
    dist = [0.0] * vocab
    for t, q in zip(kept, probs, strict=True):
        dist[t] = q
    return dist


def ref_log_softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    return [x - lse for x in logits]


def rows_logits(base: torch.Tensor, copies: int) -> torch.Tensor:
    """Each row of ``base`` repeated ``copies`` times, as one contiguous batch."""
    return base.repeat_interleave(copies, dim=0).contiguous()


# ----------------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(16, 300) * 3).to(dtype)
    # Plant exact ties in a few rows: the lowest id must win.
    for r, (a, b) in enumerate([(5, 200), (17, 18), (0, 299)]):
        logits[r, a] = logits[r, b] = logits[r].max() + 1
    before = logits.clone()
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(16)]
    out = sample(logits, rows)
    assert torch.equal(logits, before), "sample must not modify its input"
    ref = [ref_argmax(r) for r in logits.double().tolist()]
    assert out.token_ids == ref
    assert out.token_ids[:3] == [5, 17, 0]
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_rows_unaffected_by_sampled_neighbours() -> None:
    torch.manual_seed(1)
    vocab = 200
    logits = torch.randn(12, vocab) * 2
    greedy_params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.7, frequency_penalty=0.9),
        SamplingParams(temperature=0.0, top_k=1, top_p=0.01, min_p=0.5),  # filters are irrelevant to greedy
        SamplingParams(temperature=0.0, presence_penalty=1.5),
    ]
    sampled_params = [
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.2),
        SamplingParams(temperature=0.9, min_p=0.3, repetition_penalty=1.2),
        SamplingParams(temperature=2.0),
    ]
    rows = []
    for i in range(12):
        params = greedy_params[i // 3] if i % 3 == 0 else sampled_params[i % 4]
        prompt = torch.randint(0, vocab, (20,)).tolist()
        # The raw argmax is in every history, so the penalties have something to push down.
        output = [int(logits[i].argmax()), *torch.randint(0, vocab, (10,)).tolist()]
        rows.append(make_row(params, prompt, output, eos=[0]))
    greedy_rows = [i for i in range(12) if i % 3 == 0]
    expected = {i: ref_argmax(ref_penalised(logits[i].double().tolist(), rows[i])) for i in greedy_rows}
    # Sanity: the penalties do move the argmax for at least one greedy row, so the test is not vacuous.
    assert any(expected[i] != int(logits[i].argmax()) for i in greedy_rows)
    for seed in range(5):
        torch.manual_seed(100 + seed)
        out = sample(logits, rows)
        assert {i: out.token_ids[i] for i in greedy_rows} == expected
        alone = [sample(logits[i : i + 1], [rows[i]]).token_ids[0] for i in greedy_rows]
        assert alone == [expected[i] for i in greedy_rows]


# ----------------------------------------------------------------------------------------------------
# Penalties
# ----------------------------------------------------------------------------------------------------


def test_penalties_match_reference_formula() -> None:
    torch.manual_seed(2)
    vocab = 40
    configs = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-0.6),
        SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=1.1),
        SamplingParams(frequency_penalty=-1.2, presence_penalty=0.3, min_tokens=5, stop_token_ids=[11]),
        SamplingParams(repetition_penalty=2.0, min_tokens=2),
    ]
    logits = torch.randn(len(configs), vocab) * 2
    rows = []
    for p in configs:
        # Small id range for the history so tokens repeat and counts exceed 1.
        prompt = torch.randint(0, 15, (12,)).tolist()
        output = torch.randint(5, 25, (9,)).tolist()
        rows.append(make_row(p, prompt, output, eos=[39]))
    before = logits.clone()
    got = apply_penalties(logits, rows)
    assert torch.equal(logits, before)
    assert got.dtype == torch.float32
    ref = torch.tensor(
        [ref_penalised(logits[i].double().tolist(), r) for i, r in enumerate(rows)], dtype=torch.float64
    )
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=1e-6, atol=1e-5)
    assert torch.equal(got[0], logits[0]), "a row without penalties must be untouched"
    assert not torch.allclose(got[1:], logits[1:]), "penalties must change something"
    # Row 6 has min_tokens=5 but 9 outputs: nothing suppressed; row 7 likewise.
    assert torch.isfinite(got[6, 11]) and torch.isfinite(got[6, 39])

    # And through the sampler: greedy picks follow the penalised logits.
    greedy_rows = [
        make_row(
            SamplingParams(
                temperature=0.0,
                repetition_penalty=r.params.repetition_penalty,
                frequency_penalty=r.params.frequency_penalty,
                presence_penalty=r.params.presence_penalty,
            ),
            r.prompt_token_ids,
            r.output_token_ids,
        )
        for r in rows
    ]
    # Make each row's raw argmax a previously seen token so penalties can dethrone it.
    crafted = logits.clone()
    for i, r in enumerate(greedy_rows):
        crafted[i, r.output_token_ids[0]] = crafted[i].max() + 0.3
    out = sample(crafted, greedy_rows)
    expected = [ref_argmax(ref_penalised(crafted[i].double().tolist(), r)) for i, r in enumerate(greedy_rows)]
    assert out.token_ids == expected
    assert sum(out.token_ids[i] != int(crafted[i].argmax()) for i in range(len(rows))) >= 3


# ----------------------------------------------------------------------------------------------------
# Filters and the sampled distribution
# ----------------------------------------------------------------------------------------------------


def test_filtered_samples_stay_in_allowed_set() -> None:
    torch.manual_seed(3)
    vocab = 30
    configs = [
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(top_p=0.6),
        SamplingParams(temperature=1.1, top_p=0.9, top_k=10),
        SamplingParams(min_p=0.1),
        SamplingParams(temperature=1.5, min_p=0.05, top_k=8, top_p=0.8),
        SamplingParams(top_p=1e-4),
        SamplingParams(top_k=vocab + 5, temperature=0.7),
        SamplingParams(top_k=0, min_p=0.3, temperature=3.0),
        SamplingParams(temperature=0.6, top_p=0.75, repetition_penalty=1.4, frequency_penalty=0.5),
    ]
    copies = 400
    base = torch.randn(len(configs), vocab) * 2
    logits = rows_logits(base, copies)
    history = [torch.randint(0, vocab, (6,)).tolist() for _ in configs]
    rows = [make_row(p, history[c], history[c]) for c, p in enumerate(configs) for _ in range(copies)]
    out = sample(logits, rows)
    for c in range(len(configs)):
        dist = ref_distribution(base[c].double().tolist(), rows[c * copies])
        allowed = {t for t, q in enumerate(dist) if q > 0}
        drawn = out.token_ids[c * copies : (c + 1) * copies]
        assert set(drawn) <= allowed, f"config {c}: {sorted(set(drawn) - allowed)} not in {sorted(allowed)}"
        # Not over-restrictive either: every reasonably likely allowed token shows up.
        likely = {t for t, q in enumerate(dist) if q > 0.02}
        assert likely <= set(drawn), f"config {c}: never drew {sorted(likely - set(drawn))}"
    # Configs 0 and 6 admit exactly one token; config 7 (top_k > V) admits all of them.
    assert set(out.token_ids[:copies]) == {int(base[0].argmax())}
    assert set(out.token_ids[6 * copies : 7 * copies]) == {int(base[6].argmax())}
    assert (
        len({t for t, q in enumerate(ref_distribution(base[7].double().tolist(), rows[7 * copies])) if q})
        == vocab
    )


def test_empirical_distribution_matches_reference() -> None:
    torch.manual_seed(4)
    vocab, draws = 12, 20000
    configs = [
        make_row(SamplingParams(temperature=0.7, top_k=3)),
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=1.0, top_p=0.8)),
        make_row(SamplingParams(temperature=1.2, min_p=0.1)),
        make_row(
            SamplingParams(temperature=0.9, frequency_penalty=0.8, repetition_penalty=1.3), [1, 2], [3, 3]
        ),
    ]
    base = torch.randn(len(configs), vocab) * 1.5
    rows = [r for r in configs for _ in range(draws)]
    out = sample(rows_logits(base, draws), rows)
    for c, row in enumerate(configs):
        dist = ref_distribution(base[c].double().tolist(), row)
        counts = Counter(out.token_ids[c * draws : (c + 1) * draws])
        support = [t for t in range(vocab) if dist[t] > 0]
        assert set(counts) <= set(support)
        chi2 = sum((counts[t] - draws * dist[t]) ** 2 / (draws * dist[t]) for t in support)
        df = len(support) - 1
        # The 99.999th percentile of chi2(df) is below 3*df + 15 for df <= 11; a distribution with the
        # wrong temperature, no renormalisation or an off-by-one filter lands far beyond it.
        assert chi2 < 3 * df + 15, f"config {c}: chi2={chi2:.1f} df={df}"
    assert len([t for t in range(vocab) if ref_distribution(base[0].double().tolist(), configs[0])[t]]) == 3


# ----------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------


def _run_steps(logits: torch.Tensor, make_rows, steps: int, target: int) -> list[int]:
    """Sample ``steps`` times, feeding tokens back as outputs; return row ``target``'s tokens."""
    rows = make_rows()
    picked = []
    for _ in range(steps):
        out = sample(logits, rows)
        picked.append(out.token_ids[target])
        for r, t in zip(rows, out.token_ids, strict=True):
            r.output_token_ids.append(t)
    return picked


def test_seeded_row_is_independent_of_batch() -> None:
    torch.manual_seed(5)
    vocab, steps = 1000, 8
    row_logits = torch.randn(1, vocab)
    params = SamplingParams(temperature=1.1, top_p=0.95, frequency_penalty=0.2, seed=1234)

    def seeded(seed: int = 1234, p: SamplingParams = params) -> SamplingRow:
        return make_row(p, [1, 2, 3], generator=torch.Generator().manual_seed(seed))

    torch.manual_seed(0)
    alone = _run_steps(row_logits, lambda: [seeded()], steps, 0)

    others = torch.randn(4, vocab)
    batched_logits = torch.cat([others[:2], row_logits, others[2:]])
    for default_seed in (1, 2):
        torch.manual_seed(default_seed)  # the default generator's state must not matter
        in_batch = _run_steps(
            batched_logits,
            lambda: [
                make_row(SamplingParams(temperature=0.8)),
                seeded(99, SamplingParams(temperature=1.0, seed=99)),
                seeded(),
                make_row(SamplingParams(temperature=0.0)),
                make_row(SamplingParams(top_k=5)),
            ],
            steps,
            2,
        )
        assert in_batch == alone

    # Several copies of the same seed in one batch all agree with the lone row.
    torch.manual_seed(3)
    copies = _run_steps(rows_logits(row_logits, 3), lambda: [seeded(), seeded(), seeded()], steps, 1)
    assert copies == alone

    other_seed = _run_steps(row_logits, lambda: [seeded(4321)], steps, 0)
    assert other_seed != alone
    torch.manual_seed(0)
    assert _run_steps(row_logits, lambda: [make_row(params)], steps, 0) != alone


def test_seeded_draw_is_exponential_race_on_own_generator() -> None:
    """The documented contract: token = argmax(probs / q), q = torch.empty(V).exponential_(generator=g)."""
    torch.manual_seed(6)
    vocab = 500
    logits = torch.randn(3, vocab) * 2
    rows = [
        make_row(SamplingParams(temperature=0.9, seed=s), generator=torch.Generator().manual_seed(s))
        for s in (7, 8, 9)
    ]
    out = sample(logits, rows)
    for i, s in enumerate((7, 8, 9)):
        q = torch.empty(vocab).exponential_(generator=torch.Generator().manual_seed(s)).double()
        probs = torch.tensor(ref_softmax([x / 0.9 for x in logits[i].double().tolist()]), dtype=torch.float64)
        assert out.token_ids[i] == int((probs / q).argmax())


# ----------------------------------------------------------------------------------------------------
# min_tokens and logprobs
# ----------------------------------------------------------------------------------------------------


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    torch.manual_seed(7)
    vocab, eos, stops = 50, [3], [7, 9]
    logits = torch.randn(5, vocab)
    logits[:, [3, 7, 9]] += 20.0  # the enders dominate unless suppressed
    rows = [
        make_row(SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=stops), output=[1], eos=eos),
        make_row(
            SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=stops), output=[1] * 4, eos=eos
        ),
        make_row(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), output=[], eos=eos),
        make_row(SamplingParams(temperature=0.0), output=[], eos=eos),
        make_row(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=stops), output=[5], eos=[]),
    ]
    out = sample(logits, rows)
    enders = {3, 7, 9}
    expected = [ref_argmax(ref_penalised(logits[i].double().tolist(), r)) for i, r in enumerate(rows)]
    assert out.token_ids == expected
    assert out.token_ids[0] not in enders
    assert out.token_ids[1] in enders  # min_tokens reached
    assert out.token_ids[2] not in {3}  # ignore_eos does not lift the suppression
    assert out.token_ids[3] in enders  # no min_tokens
    assert out.token_ids[4] not in {7, 9}

    # Sampled rows never draw a suppressed token, even at high temperature.
    copies = 2000
    sampled = [
        make_row(SamplingParams(temperature=2.0, min_tokens=10, stop_token_ids=stops), output=[1, 2], eos=eos)
        for _ in range(copies)
    ]
    drawn = sample(rows_logits(logits[:1], copies), sampled).token_ids
    assert not enders & set(drawn)


def test_logprobs_are_raw_and_top_sorted() -> None:
    torch.manual_seed(8)
    vocab = 64
    logits = (torch.randn(6, vocab) * 2).to(torch.bfloat16)
    rows = [
        make_row(
            SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
            [1, 2],
            [int(logits[0].argmax())],
        ),
        make_row(SamplingParams(temperature=0.7, top_k=4, logprobs=0)),
        make_row(SamplingParams(temperature=1.0)),  # did not ask
        make_row(SamplingParams(temperature=1.5, top_p=0.5, logprobs=20, min_tokens=3), eos=[0]),
        make_row(SamplingParams(temperature=0.0, logprobs=vocab)),
        make_row(SamplingParams(temperature=0.3, logprobs=1, presence_penalty=2.0), output=[4, 4]),
    ]
    out = sample(logits, rows)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert len(out.logprobs) == len(out.top_logprobs) == len(rows)
    for i, row in enumerate(rows):
        raw = ref_log_softmax(logits[i].double().tolist())
        assert out.logprobs[i] == pytest.approx(raw[out.token_ids[i]], abs=1e-4)
        n = row.params.logprobs or 0
        top = out.top_logprobs[i]
        assert len(top) == n
        ref_top = sorted(range(vocab), key=lambda t, raw=raw: (-raw[t], t))[:n]
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for (tok, val), ref_tok in zip(top, ref_top, strict=True):
            assert val == pytest.approx(raw[ref_tok], abs=1e-4)
            assert raw[tok] == pytest.approx(raw[ref_tok], abs=1e-6)  # bf16 may tie: equal value suffices
    # The penalised greedy row did not pick the raw argmax, yet its logprob is the raw one.
    assert out.token_ids[0] != int(logits[0].argmax())
    assert out.logprobs[0] < max(ref_log_softmax(logits[0].double().tolist()))


def test_no_logprobs_requested_and_empty_batch() -> None:
    torch.manual_seed(9)
    out = sample(torch.randn(3, 10), [make_row() for _ in range(3)])
    assert out.logprobs is None and out.top_logprobs is None
    assert len(out.token_ids) == 3 and all(0 <= t < 10 for t in out.token_ids)
    empty = sample(torch.randn(0, 10), [])
    assert empty.token_ids == [] and empty.logprobs is None
    with pytest.raises(ValueError):
        sample(torch.randn(2, 10), [make_row()])
