"""Incremental token counts for the repetition / frequency / presence penalties.

A request that uses a penalty keeps, for the whole of its life, a dense count of its output
tokens over the vocabulary and a mask of its prompt's tokens. Each step counts only the tokens
appended since the previous step, so the penalties' per-step work does not grow with the length
of the prompt or the output (it is O(vocab) per row, like the rest of the sampler).

Invariant: after `tensors(output_token_ids, ...)`, counts[t] is the number of times t occurs in
output_token_ids and prompt_mask[t] is whether t occurs in the prompt. The output may only grow
between calls, except when it is cut (a stop string ends it inside a step's tokens); a shorter
output than the one counted is recounted from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def penalties_enabled(params) -> bool:  # params: SamplingParams (no import: request.py uses this)
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


class PenaltyCounts:
    """One request's output-token counts [V] and prompt-token mask [V], kept up to date
    incrementally (created on first use, on the logits' device, for the logits' vocabulary)."""

    __slots__ = ("_counted", "_counts", "_prompt_mask", "_prompt_token_ids")

    def __init__(self, prompt_token_ids: Sequence[int]) -> None:
        self._prompt_token_ids = prompt_token_ids
        self._counts: torch.Tensor | None = None  # [V] int32
        self._prompt_mask: torch.Tensor | None = None  # [V] bool
        self._counted = 0  # output tokens included in _counts

    def tensors(
        self, output_token_ids: Sequence[int], vocab: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [V] int32, prompt_mask [V] bool) for this output; O(new tokens) per call."""
        counts = self._counts
        if counts is None or counts.shape[0] != vocab or counts.device != device:
            counts = self._counts = torch.zeros(vocab, dtype=torch.int32, device=device)
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            prompt = [t for t in self._prompt_token_ids if 0 <= t < vocab]
            if prompt:
                mask[torch.tensor(prompt, device=device)] = True
            self._prompt_mask = mask
            self._counted = 0
        if len(output_token_ids) < self._counted:  # the output was cut: count again
            counts.zero_()
            self._counted = 0
        if len(output_token_ids) > self._counted:
            add_counts(counts, output_token_ids[self._counted :])
            self._counted = len(output_token_ids)
        assert self._prompt_mask is not None
        return counts, self._prompt_mask


def add_counts(counts: torch.Tensor, token_ids: Sequence[int]) -> None:
    """counts[t] += occurrences of t in token_ids (in place; counts is [V])."""
    if token_ids:
        index = torch.tensor(list(token_ids), dtype=torch.int64, device=counts.device)
        counts.index_add_(
            0, index, torch.ones(len(index), dtype=counts.dtype, device=counts.device)
        )
