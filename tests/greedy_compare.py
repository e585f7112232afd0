"""Comparing two greedy completions of the same prompt that may differ only by rounding."""

from __future__ import annotations

from typing import Any


def assert_same_greedy_tokens(ours: Any, theirs: Any, tol: float, tie_tol: float) -> None:
    """Two greedy `CompletionOutput`s (requested with logprobs >= 2) agree token for token,
    each token's logprobs within `tol`; a first difference is allowed only at a near-tie (both
    candidates among either side's top logprobs, within `tie_tol` of each other on `theirs`),
    after which the texts diverge and the comparison stops."""
    for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids, strict=True)):
        if a != b:  # a near-tie flipped: both candidates must be close
            assert a in theirs.logprobs[i] and b in ours.logprobs[i], (i, a, b)
            gap = abs(theirs.logprobs[i][a].logprob - theirs.logprobs[i][b].logprob)
            assert gap < tie_tol, (i, a, b, gap)
            return
        assert abs(ours.logprobs[i][a].logprob - theirs.logprobs[i][a].logprob) < tol, (i, a)
