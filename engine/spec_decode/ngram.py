"""N-gram prompt lookup: propose the tokens that followed the last time the context's tail
appeared earlier in the request (prompt and output so far).

For n from prompt_lookup_max down to prompt_lookup_min, the last n tokens are searched for in
the earlier tokens; the most recent earlier occurrence wins, and the (up to) k tokens after it are
the proposal. No match: no proposal. Pure Python over the request's own tokens: O(len * n).
"""

from __future__ import annotations

from collections.abc import Sequence


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
        tokens = list(token_ids)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            tail = tokens[length - n :]
            # latest start strictly before the tail itself
            for start in range(length - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + limit]
                    if follow:
                        return follow
        return []
