"""Logprobs: rows of log-softmax values -> vLLM's per-position dicts, and the text of tokens.

A position's entry is `dict[token_id, Logprob]`: first the token that was sampled (or, for prompt
logprobs, the prompt token at that position), then the top-N tokens of the distribution in
order. Ranks follow vLLM: a top-N entry's rank is its place in the top list (1 = most likely);
the sampled / prompt token's rank is the number of tokens at least as likely as it (so ties share
the worst place). Logprobs are those of the raw logits (the model's own distribution, before
any logits processor, temperature or truncation).

The sampler (sampled tokens) and the runner (prompt tokens) both build entries here; the engine
fills `Logprob.decoded_token` with `TokenTexts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.request import Logprob


def logprob_entries(
    logprobs: torch.Tensor,  # [M, V] log_softmax of raw logits
    token_ids: torch.Tensor,  # [M] int64: the token each row reports (sampled / prompt token)
    num_top: Sequence[int],  # [M] top-N per row (0: only the row's token)
) -> list[dict[int, Logprob]]:
    token_logprobs = logprobs.gather(1, token_ids[:, None])  # [M, 1]
    ranks = (logprobs >= token_logprobs).sum(dim=-1)  # [M]
    max_top = max(num_top, default=0)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if max_top:
        top = logprobs.topk(min(max_top, logprobs.shape[-1]), dim=-1)  # [M, N], sorted
        top_values, top_ids = top.values.tolist(), top.indices.tolist()

    entries: list[dict[int, Logprob]] = []
    for i, (token_id, value, rank) in enumerate(
        zip(token_ids.tolist(), token_logprobs[:, 0].tolist(), ranks.tolist(), strict=True)
    ):
        entry = {token_id: Logprob(value, rank=rank)}
        for place in range(min(num_top[i], len(top_ids[i]) if top_ids else 0)):
            entry.setdefault(top_ids[i][place], Logprob(top_values[i][place], rank=place + 1))
        entries.append(entry)
    return entries


class TokenTexts:
    """The text of single tokens (special tokens spelled out), cached per token id.

    Ids the tokenizer does not know (a model's padded vocabulary rows) read as "".
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def fill(self, entry: dict[int, Logprob] | None) -> None:
        """Sets decoded_token on every Logprob of one position's entry."""
        for token_id, logprob in (entry or {}).items():
            if logprob.decoded_token is None:
                logprob.decoded_token = self(token_id)
