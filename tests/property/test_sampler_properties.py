"""Each logits processor of the sampler equals a plain, independent implementation.

The references below loop over rows and tokens in Python over numpy float64 arrays, written from
the documented rules (not from the vectorised code): hypothesis draws small vocabularies,
logits (with deliberate ties), token histories and per-row parameters. Where a keep/drop decision
sits within rounding distance of its threshold, that token is not judged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import (
    Sampler,
    SamplingRow,
    apply_allowed_token_ids,
    apply_bad_words,
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    process_logits,
    sampling_distribution,
)
from engine.sampling_params import SamplingParams

NEG_INF = -math.inf
EPS = 1e-9  # decisions this close to their threshold are not judged


# ---- the plain references ----------------------------------------------------------------------


def softmax(row: np.ndarray) -> np.ndarray:
    finite = row[np.isfinite(row)]
    exp = np.where(np.isfinite(row), np.exp(row - finite.max()), 0.0)
    return exp / exp.sum()


def ref_allowed(row, allowed):
    out = np.full_like(row, NEG_INF)
    for t in allowed:
        out[t] = row[t]
    return out


def ref_bad_words(row, output, words):
    out = row.copy()
    for word in words:
        *prefix, last = word
        if len(output) >= len(prefix) and list(output[len(output) - len(prefix) :]) == prefix:
            out[last] = NEG_INF
    return out


def ref_min_tokens(row, num_output, params, eos_ids):
    out = row.copy()
    if num_output < params.min_tokens:
        for t in params.stop_token_ids:
            out[t] = NEG_INF
        if not params.ignore_eos:
            for t in eos_ids:
                out[t] = NEG_INF
    return out


def ref_logit_bias(row, bias):
    out = row.copy()
    for t, b in (bias or {}).items():
        out[t] += b
    return out


def ref_penalties(row, prompt, output, params):
    out = row.copy()
    for t in range(len(row)):
        count = list(output).count(t)
        if t in prompt or count:
            p = params.repetition_penalty
            out[t] = out[t] / p if out[t] > 0 else out[t] * p
        out[t] -= params.frequency_penalty * count
        if count:
            out[t] -= params.presence_penalty
    return out


def ref_min_p_keep(row, min_p):
    """Per token: True keep, False drop, None too close to call."""
    probs = softmax(row)
    threshold = min_p * probs.max()
    return [None if abs(p - threshold) < EPS else bool(p >= threshold) for p in probs]


def ref_top_k_keep(row, k):
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    return [bool(v >= kth) for v in row]


def ref_top_p_keep(row, top_p):
    """A token stays when the tokens strictly more likely than it hold less than top_p."""
    probs = softmax(row)
    keep = []
    for p in probs:
        before = sum(q for q in probs if q > p)
        keep.append(None if abs(before - top_p) < EPS else bool(before < top_p))
    return keep


def masked(row, keep):
    return np.array([v if k else NEG_INF for v, k in zip(row, keep, strict=True)])


def ref_distribution(raw, row: SamplingRow):
    """Steps 2-9 of the sampler's documented order for one row; None if a cut is too close."""
    p = row.params
    x = raw.copy()
    if p.allowed_token_ids is not None:
        x = ref_allowed(x, p.allowed_token_ids)
    x = ref_bad_words(x, row.output_token_ids, row.bad_words_token_ids)
    x = ref_min_tokens(x, row.output_position, p, row.eos_token_ids)
    x = ref_logit_bias(x, p.logit_bias)
    if np.isneginf(x).all():
        x = raw.copy()
    x = ref_penalties(x, row.prompt_token_ids, row.output_token_ids, p)
    if p.greedy:
        return x, None
    x = x / p.temperature
    if p.min_p > 0:
        keep = ref_min_p_keep(x, p.min_p)
        if None in keep:
            return x, None
        x = masked(x, keep)
    if p.top_k != -1:
        x = masked(x, ref_top_k_keep(x, p.top_k))
    if p.top_p < 1:
        keep = ref_top_p_keep(x, p.top_p)
        if None in keep:
            return x, None
        x = masked(x, keep)
    return x, softmax(x)


# ---- strategies --------------------------------------------------------------------------------

logit_values = st.one_of(
    st.floats(-8, 8, allow_nan=False, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 2.5]),  # ties
)


@st.composite
def rows_and_logits(draw, max_rows: int = 4):
    vocab = draw(st.integers(2, 12))
    token = st.integers(0, vocab - 1)
    num_rows = draw(st.integers(1, max_rows))
    logits = np.array(
        [draw(st.lists(logit_values, min_size=vocab, max_size=vocab)) for _ in range(num_rows)]
    )
    rows = []
    for _ in range(num_rows):
        output = draw(st.lists(token, max_size=8))
        params = SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.3, 1.0, 1.7])),
            top_k=draw(st.sampled_from([-1, 1, 2, 3, vocab, vocab + 5])),
            top_p=draw(st.sampled_from([1.0, 0.9, 0.5, 0.2, 1e-3])),
            min_p=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
            presence_penalty=draw(st.sampled_from([0.0, 0.5, -1.5, 2.0])),
            frequency_penalty=draw(st.sampled_from([0.0, 0.3, -0.7, 2.0])),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.7, 2.0])),
            logit_bias=draw(
                st.none() | st.dictionaries(token, st.floats(-100, 100, width=32), max_size=3)
            ),
            min_tokens=draw(st.sampled_from([0, 0, 3, 20])),
            max_tokens=None,
            stop_token_ids=draw(st.lists(token, max_size=2)),
            ignore_eos=draw(st.booleans()),
            allowed_token_ids=draw(st.none() | st.lists(token, min_size=1, max_size=vocab)),
        )
        rows.append(
            SamplingRow(
                params=params,
                sampling_seed=draw(st.integers(0, 2**63 - 1)),
                output_position=len(output),
                prompt_token_ids=draw(st.lists(token, min_size=1, max_size=8)),
                output_token_ids=output,
                eos_token_ids=(draw(token),),
                bad_words_token_ids=tuple(
                    tuple(w) for w in draw(st.lists(st.lists(token, min_size=1, max_size=3)))
                ),
            )
        )
    return torch.tensor(logits, dtype=torch.float64), rows


def assert_rows_close(ours: torch.Tensor, reference: list[np.ndarray]) -> None:
    expected = np.stack(reference)
    got = ours.numpy()
    assert (np.isneginf(got) == np.isneginf(expected)).all(), (got, expected)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-12, atol=1e-12)


# ---- one property per processor ----------------------------------------------------------------

SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(rows_and_logits())
def test_allowed_token_ids(case):
    logits, rows = case
    ours = apply_allowed_token_ids(logits, rows)
    ref = [
        ref_allowed(raw, r.params.allowed_token_ids) if r.params.allowed_token_ids else raw
        for raw, r in zip(logits.numpy(), rows, strict=True)
    ]
    assert_rows_close(ours, ref)


@SETTINGS
@given(rows_and_logits())
def test_bad_words(case):
    logits, rows = case
    ours = apply_bad_words(logits, rows)
    ref = [
        ref_bad_words(raw, r.output_token_ids, r.bad_words_token_ids)
        for raw, r in zip(logits.numpy(), rows, strict=True)
    ]
    assert_rows_close(ours, ref)


@SETTINGS
@given(rows_and_logits())
def test_min_tokens(case):
    logits, rows = case
    ours = apply_min_tokens(logits, rows)
    ref = [
        ref_min_tokens(raw, r.output_position, r.params, r.eos_token_ids)
        for raw, r in zip(logits.numpy(), rows, strict=True)
    ]
    assert_rows_close(ours, ref)


@SETTINGS
@given(rows_and_logits())
def test_logit_bias(case):
    logits, rows = case
    ours = apply_logit_bias(logits, rows)
    ref = [
        ref_logit_bias(raw, r.params.logit_bias) for raw, r in zip(logits.numpy(), rows, strict=True)
    ]
    assert_rows_close(ours, ref)


@SETTINGS
@given(rows_and_logits())
def test_penalties(case):
    logits, rows = case
    ours = apply_penalties(logits, rows)
    ref = [
        ref_penalties(raw, r.prompt_token_ids, r.output_token_ids, r.params)
        for raw, r in zip(logits.numpy(), rows, strict=True)
    ]
    assert_rows_close(ours, ref)


def judged(got_row: np.ndarray, keep: list[bool | None]) -> None:
    for value, k in zip(got_row, keep, strict=True):
        if k is not None:
            assert np.isfinite(value) == k


@SETTINGS
@given(rows_and_logits(), st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.99, 1.0]), min_size=4))
def test_min_p(case, min_ps):
    logits, rows = case
    min_p = torch.tensor(min_ps[: len(rows)], dtype=torch.float64)
    ours = apply_min_p(logits, min_p).numpy()
    for got_row, raw, m in zip(ours, logits.numpy(), min_p.tolist(), strict=True):
        judged(got_row, ref_min_p_keep(raw, m))
        assert np.isfinite(got_row).any()  # the most likely token always stays


@SETTINGS
@given(
    rows_and_logits(),
    st.lists(st.integers(1, 14), min_size=4),
    st.lists(st.sampled_from([1.0, 0.95, 0.6, 0.3, 1e-4]), min_size=4),
)
def test_top_k_then_top_p(case, ks, ps):
    logits, rows = case
    vocab = logits.shape[1]
    top_k = torch.tensor([min(k, vocab) for k in ks[: len(rows)]])
    top_p = torch.tensor(ps[: len(rows)], dtype=torch.float64)
    ours = apply_top_k_top_p(logits, top_k, top_p).numpy()
    for got_row, raw, k, p in zip(ours, logits.numpy(), top_k.tolist(), top_p.tolist(), strict=True):
        after_k = masked(raw, ref_top_k_keep(raw, k))
        judged(got_row, ref_top_p_keep(after_k, p) if p < 1 else [bool(x) for x in after_k > NEG_INF])
        assert np.isfinite(got_row).any()


# ---- the whole pipeline, in the documented order -----------------------------------------------


@SETTINGS
@given(rows_and_logits())
def test_pipeline_matches_reference_in_documented_order(case):
    logits, rows = case
    processed = process_logits(logits, rows)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = sampling_distribution(processed[sampled], [rows[i] for i in sampled]) if sampled else None
    tokens = [s.token_id for s in Sampler()(logits, rows)]
    for i, (raw, row) in enumerate(zip(logits.numpy(), rows, strict=True)):
        ref_logits, ref_probs = ref_distribution(raw, row)
        if row.params.greedy:
            # the greedy token is a maximum of the processed logits
            assert ref_logits[tokens[i]] >= ref_logits.max() - 1e-9
            continue
        if ref_probs is None:
            continue  # a min-p / top-p cut within rounding distance
        ours = probs[sampled.index(i)].numpy()
        np.testing.assert_allclose(ours, ref_probs, atol=1e-9)
        assert ref_probs[tokens[i]] > 0  # the draw only picks tokens the distribution allows


@settings(max_examples=60, deadline=None)
@given(rows_and_logits(max_rows=5), st.data())
def test_a_row_samples_the_same_alone_or_in_any_batch(case, data):
    logits, rows = case
    batch = Sampler()(logits, rows)
    order = data.draw(st.permutations(range(len(rows))))
    shuffled = Sampler()(logits[list(order)], [rows[i] for i in order])
    for position, i in enumerate(order):
        alone = Sampler()(logits[i : i + 1], [rows[i]])[0]
        assert alone.token_id == batch[i].token_id == shuffled[position].token_id
