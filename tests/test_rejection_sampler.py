"""The rejection sampler's output distribution equals the target's: exactly, by enumerating the
draft token and the accept/reject branch with the sampler's own acceptance and residual
functions, and empirically, by a chi-square test on seeded samples of the whole sampler."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.rejection_sampler import (
    acceptance_probs,
    rejection_sample,
    residual_distribution,
)

V = 5


def distributions(min_size=V):
    return (
        st.lists(st.floats(0.0, 1.0), min_size=min_size, max_size=min_size)
        .filter(lambda w: sum(w) > 1e-3)
        .map(lambda w: torch.tensor(w, dtype=torch.float64) / sum(w))
    )


def exact_first_token(p: torch.Tensor, q: torch.Tensor | None, draft: int | None = None):
    """P(first emitted token = t), summing over the draft (drawn from q) and the accept test."""
    total = torch.zeros(V, dtype=torch.float64)
    drafts = range(V) if q is not None else [draft]
    for d in drafts:
        weight = q[d] if q is not None else 1.0
        d_t = torch.tensor([[d]])
        q_b = q[None, None] if q is not None else None
        a = acceptance_probs(p[None, None], d_t, q_b)[0, 0]
        r = residual_distribution(p, torch.tensor(d), q)
        total += weight * (a * torch.nn.functional.one_hot(torch.tensor(d), V) + (1 - a) * r)
    return total


@settings(max_examples=200, deadline=None)
@given(distributions(), distributions())
def test_exact_distribution_with_a_draft_model(p, q):
    torch.testing.assert_close(exact_first_token(p, q), p, rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(distributions(), st.integers(0, V - 1))
def test_exact_distribution_with_one_hot_drafts(p, draft):
    torch.testing.assert_close(exact_first_token(p, None, draft), p, rtol=0, atol=1e-12)


# chi-square critical value for 4 degrees of freedom at p = 0.001
CHI2_CRIT_DF4 = 18.467


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_tokens_follow_the_target_chi_square():
    gen = torch.Generator().manual_seed(1234)
    trials, k = 40000, 2
    p = torch.tensor(
        [[0.4, 0.3, 0.15, 0.1, 0.05], [0.05, 0.1, 0.2, 0.25, 0.4], [0.2] * 5], dtype=torch.float64
    )
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.5, 0.2, 0.1, 0.1, 0.1]], dtype=torch.float64)
    drafts = torch.stack(
        [torch.multinomial(q[i], trials, replacement=True, generator=gen) for i in range(k)], dim=1
    )  # [N, k]
    out = rejection_sample(
        target_probs=p.expand(trials, -1, -1),
        draft_token_ids=drafts,
        num_drafts=torch.full((trials,), k),
        draft_probs=q.expand(trials, -1, -1),
        greedy=torch.zeros(trials, dtype=torch.bool),
        uniforms=torch.rand(trials, k, generator=gen, dtype=torch.float64),
        noise=torch.empty(trials, k + 1, V, dtype=torch.float64).exponential_(generator=gen),
    )
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).double()
    assert chi_square(first, p[0]) < CHI2_CRIT_DF4
    # given the first draft was accepted, the second token follows p_1
    second = torch.bincount(torch.tensor([o[1] for o in out if len(o) > 1]), minlength=V).double()
    assert second.sum() > 5000
    assert chi_square(second, p[1]) < CHI2_CRIT_DF4
    # and the number of tokens per step is 1..k+1, with some steps taking the bonus token
    lengths = torch.bincount(torch.tensor([len(o) for o in out]))
    assert lengths[0] == 0 and lengths[1] > 0 and lengths[k + 1] > 0


def test_one_hot_drafts_chi_square():
    gen = torch.Generator().manual_seed(99)
    trials = 40000
    p = torch.tensor([[0.1, 0.5, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]], dtype=torch.float64)
    out = rejection_sample(
        target_probs=p.expand(trials, -1, -1),
        draft_token_ids=torch.full((trials, 1), 1),
        num_drafts=torch.ones(trials, dtype=torch.int64),
        draft_probs=None,
        greedy=torch.zeros(trials, dtype=torch.bool),
        uniforms=torch.rand(trials, 1, generator=gen, dtype=torch.float64),
        noise=torch.empty(trials, 2, V, dtype=torch.float64).exponential_(generator=gen),
    )
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).double()
    assert chi_square(first, p[0]) < CHI2_CRIT_DF4
    accepted = sum(len(o) == 2 for o in out) / trials
    assert abs(accepted - 0.5) < 0.01  # accepted with probability p(d) = 0.5


def test_greedy_accepts_while_drafts_match_the_argmax():
    p = torch.zeros(3, 4, V, dtype=torch.float64)
    for b, argmaxes in enumerate([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]]):
        for i, a in enumerate(argmaxes):
            p[b, i] = 0.1
            p[b, i, a] = 0.6
    drafts = torch.tensor([[1, 2, 3], [1, 4, 3], [0, 0, 0]])
    out = rejection_sample(
        p,
        drafts,
        torch.tensor([3, 3, 1]),
        None,
        torch.ones(3, dtype=torch.bool),
        torch.rand(3, 3, dtype=torch.float64),
        torch.ones(3, 4, V, dtype=torch.float64),
    )
    assert out == [[1, 2, 3, 4], [1, 2], [0, 0]]


def test_ngram_proposer():
    proposer = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    #            0  1  2  3  4  5  6  7  8
    tokens = [5, 6, 7, 8, 9, 5, 6, 7]
    assert proposer.propose(tokens) == [8, 9, 5]  # "5 6 7" seen at 0, followed by 8 9 5
    assert proposer.propose(tokens, max_tokens=2) == [8, 9]
    assert proposer.propose([1, 2, 3]) == []
    # the most recent earlier occurrence wins
    assert proposer.propose([1, 2, 1, 3, 1]) == [3, 1]
    assert NgramProposer(2, 2, 2).propose([1, 2, 1, 3, 1]) == []  # "3 1" never seen before
