"""Plug-ins written outside the engine package, for the kit and plug-in tests: a correct
attention backend, a deliberately broken one, a proposer, and registration on import (the
module named in $ENGINE_PLUGINS by tests/test_plugins.py)."""

from __future__ import annotations

import torch

from engine.fast.registry import register_attention_backend
from engine.reference.attention import ReferenceAttention
from engine.spec_decode.registry import register_proposer

# Every instance built, so a test can see that the engine used the plug-in.
BUILT: list[object] = []


class CountingBackend(ReferenceAttention):
    """The reference attention, counting its forwards."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        BUILT.append(self)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


class BrokenBackend(ReferenceAttention):
    """Wrong as soon as a request's context is longer than 5 tokens (drops the oldest key)."""

    name = "broken"

    def forward(self, q, k_cache, v_cache, meta, scale, sliding_window=None, softcap=None):
        if any(s > 5 for s in meta.seq_lens_cpu):
            window = sliding_window if sliding_window is not None else 10**9
            sliding_window = min(window, max(meta.seq_lens_cpu) - 1)
        return super().forward(q, k_cache, v_cache, meta, scale, sliding_window, softcap)


class RepeatLastProposer:
    """Proposes the last token again, k times (often wrong: verification must catch it)."""

    def __init__(self, spec, model_config) -> None:
        self.k = spec.num_speculative_tokens
        self.options = dict(spec.extra)
        self.calls = 0

    def propose(self, request, max_tokens: int) -> list[int]:
        self.calls += 1
        return [request.all_token_ids[-1]] * min(self.k, max_tokens)


def batch_mean_processor(logits: torch.Tensor, rows) -> torch.Tensor:
    """Not batch invariant: subtracts the batch's mean logit."""
    return logits - logits.mean()


register_attention_backend("counting", CountingBackend)
register_proposer("repeat-last", RepeatLastProposer)


class PerturbLayer1(ReferenceAttention):
    """Reference attention, except that the second attention call of each step (layer 1) adds
    1e-3 to every output: the fault engine.diff --layers must locate."""

    name = "perturb-layer-1"
    LAYER = 1

    def __init__(self) -> None:
        super().__init__()
        self._meta = None
        self._call = 0

    def forward(self, q, k_cache, v_cache, meta, scale, sliding_window=None, softcap=None):
        if meta is not self._meta:  # a new step: layers count from 0 again
            self._meta, self._call = meta, 0
        out = super().forward(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
        self._call += 1
        return out + 1e-3 if self._call - 1 == self.LAYER else out
