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
    TOP_P_CANDIDATES,
    TOP_P_RACE_ROUNDS,
    Sampler,
    SamplingRow,
    apply_allowed_token_ids,
    apply_bad_words,
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    draw_tokens,
    exponential_noise,
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
    """A token stays when the tokens strictly more likely than it (by logit) hold less than
    top_p of the probability."""
    probs = softmax(row)
    keep = []
    for value in row:
        before = sum(q for q, other in zip(probs, row, strict=True) if other > value)
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
            # around the output's length, where the eos ban starts or stops
            min_tokens=draw(st.sampled_from([0, max(len(output) - 1, 0), len(output) + 1, 20])),
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


# ---- each processor against its reference, on the same drawn inputs ----------------------------

SETTINGS = settings(max_examples=120, deadline=None)


def judged(got_row: np.ndarray, keep: list[bool | None]) -> None:
    for value, k in zip(got_row, keep, strict=True):
        if k is not None:
            assert np.isfinite(value) == k


@SETTINGS
@given(rows_and_logits(), st.integers(1, 12))
def test_each_processor_matches_its_reference(case, num_candidates):
    """num_candidates: how many tokens top-p searches before sorting the whole row (small values
    exercise both the candidate search and the fallback on these small vocabularies)."""
    logits, rows = case
    raws = list(logits.numpy())
    assert_rows_close(
        apply_allowed_token_ids(logits, rows),
        [
            ref_allowed(raw, r.params.allowed_token_ids) if r.params.allowed_token_ids else raw
            for raw, r in zip(raws, rows, strict=True)
        ],
    )
    assert_rows_close(
        apply_bad_words(logits, rows),
        [
            ref_bad_words(raw, r.output_token_ids, r.bad_words_token_ids)
            for raw, r in zip(raws, rows, strict=True)
        ],
    )
    assert_rows_close(
        apply_min_tokens(logits, rows),
        [
            ref_min_tokens(raw, r.output_position, r.params, r.eos_token_ids)
            for raw, r in zip(raws, rows, strict=True)
        ],
    )
    assert_rows_close(
        apply_logit_bias(logits, rows),
        [ref_logit_bias(raw, r.params.logit_bias) for raw, r in zip(raws, rows, strict=True)],
    )
    assert_rows_close(
        apply_penalties(logits, rows),
        [
            ref_penalties(raw, r.prompt_token_ids, r.output_token_ids, r.params)
            for raw, r in zip(raws, rows, strict=True)
        ],
    )

    vocab = logits.shape[1]
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float64)
    for got_row, raw, m in zip(
        apply_min_p(logits, min_p).numpy(), raws, min_p.tolist(), strict=True
    ):
        judged(got_row, ref_min_p_keep(raw, m))
        assert np.isfinite(got_row).any()  # the most likely token always stays

    top_k = [vocab if r.params.top_k == -1 else min(r.params.top_k, vocab) for r in rows]
    top_p = [r.params.top_p for r in rows]
    for candidates in (num_candidates, TOP_P_CANDIDATES):
        ours = apply_top_k_top_p(
            logits, torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64), candidates
        ).numpy()
        for got_row, raw, k, p in zip(ours, raws, top_k, top_p, strict=True):
            after_k = masked(raw, ref_top_k_keep(raw, k))
            if p < 1:
                judged(got_row, ref_top_p_keep(after_k, p))
            else:
                judged(got_row, [bool(x) for x in np.isfinite(after_k)])
            assert np.isfinite(got_row).any()


# ---- the whole pipeline, in the documented order -----------------------------------------------


@SETTINGS
@given(rows_and_logits(), st.sampled_from([0, 1, 2, TOP_P_RACE_ROUNDS]))
def test_pipeline_matches_reference_in_documented_order(case, race_rounds):
    """The probabilities, the greedy token and the drawn token (the race winner of the
    reference distribution under the same noise, however many top-p race rounds are allowed
    before the sort fallback) all follow the documented order."""
    logits, rows = case
    processed = process_logits(logits, rows)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    sub_rows = [rows[i] for i in sampled]
    probs = sampling_distribution(processed[sampled], sub_rows) if sampled else None
    noise = exponential_noise(sub_rows, logits.shape[1], logits.dtype)
    drawn = draw_tokens(processed[sampled], sub_rows, noise.clone(), race_rounds).tolist()
    tokens = [s.token_id for s in Sampler()(logits, rows)]
    for i, (raw, row) in enumerate(zip(logits.numpy(), rows, strict=True)):
        ref_logits, ref_probs = ref_distribution(raw, row)
        if row.params.greedy:
            # the greedy token is a maximum of the processed logits
            assert ref_logits[tokens[i]] >= ref_logits.max() - 1e-9
            continue
        if ref_probs is None:
            continue  # a min-p / top-p cut within rounding distance
        j = sampled.index(i)
        np.testing.assert_allclose(probs[j].numpy(), ref_probs, atol=1e-9)
        scores = ref_probs / noise[j].numpy()
        if np.sort(scores)[-2] < scores.max() * (1 - 1e-9):  # no near-tie in the race
            assert drawn[j] == tokens[i] == int(scores.argmax())
        assert ref_probs[tokens[i]] > 0  # the draw only picks tokens the distribution allows


@settings(max_examples=50, deadline=None)
@given(rows_and_logits(max_rows=5), st.data())
def test_a_row_samples_the_same_alone_or_in_any_batch(case, data):
    logits, rows = case
    batch = Sampler()(logits, rows)
    order = data.draw(st.permutations(range(len(rows))))
    shuffled = Sampler()(logits[list(order)], [rows[i] for i in order])
    for position, i in enumerate(order):
        alone = Sampler()(logits[i : i + 1], [rows[i]])[0]
        assert alone.token_id == batch[i].token_id == shuffled[position].token_id
