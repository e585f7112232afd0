"""N-gram prompt lookup: propose the tokens that followed the last time the context's tail
appeared earlier in the request (prompt and output so far).

For n from prompt_lookup_max down to prompt_lookup_min, the last n tokens are searched for in
the earlier tokens; the most recent earlier occurrence wins, and the (up to) k tokens after it are
the proposal. No match: no proposal. The search runs in C (`bytes.rfind` over the tokens packed
as 8-byte integers, keeping only matches on token boundaries), so a long context costs
microseconds, not a Python loop over every position.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

_WIDTH = 8  # bytes per packed token id


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to min(k, max_tokens) draft tokens continuing token_ids."""
        limit = self.k if max_tokens is None else min(self.k, max_tokens)
        if limit <= 0:
            return []
        length = len(token_ids)
        packed = array("q", token_ids).tobytes()
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = _latest_earlier_start(packed, length, n)
            if start is not None:
                # start + n <= length - 1, so at least one token follows
                return list(token_ids[start + n : start + n + limit])
        return []


def _latest_earlier_start(packed: bytes, length: int, n: int) -> int | None:
    """The latest start s < length - n with tokens[s : s + n] == the last n tokens."""
    tail = packed[(length - n) * _WIDTH :]
    end = (length - 1) * _WIDTH  # an occurrence must end by token length - 1
    while True:
        at = packed.rfind(tail, 0, end)
        if at < 0:
            return None
        if at % _WIDTH == 0:
            return at // _WIDTH
        end = at + len(tail) - 1  # straddles token boundaries: look further left


class NgramRequestProposer:
    """The registry's `ngram` proposer: NgramProposer over a request's tokens."""

    def __init__(self, spec) -> None:  # spec: engine.config.SpeculativeConfig
        self.ngram = NgramProposer(
            spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
        )

    def propose(self, request, max_tokens: int) -> list[int]:
        return self.ngram.propose(request.all_token_ids, max_tokens)
