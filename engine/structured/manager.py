"""The engine's side of structured outputs: matchers per request, bitmasks per step.

Life of a request's matcher (`Request.grammar`):

- created (a copy of the cached compiled grammar) when the request is added; a grammar that does
  not compile is a ValueError and nothing is added;
- before each step, the bitmask of every sampling row comes from the matcher's current state
  (`bitmasks_for`); verification rows get theirs from `engine.spec_decode.verifier`, which walks
  the matcher through the drafts and rolls it back;
- after each step, `advance` consumes the tokens the request accepted (the engine's update path):
  the matcher always stands after exactly `request.output_token_ids`. A preemption by recompute
  keeps the output tokens, so it keeps the matcher too; tokens dropped after a stop string are
  rolled back;
- a matcher that consumed end-of-sequence in an accepting state is terminated: the request
  finishes with "stop" (vLLM's behaviour), even when ignore_eos would keep it going;
- released (`release`) when the request finishes or is aborted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from engine.sampler import Sampler, SamplingRow
from engine.scheduler.interface import SampledToken
from engine.structured.grammar import DEFAULT_CACHE_SIZE, GrammarCompiler, GrammarMatcher
from engine.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    """Compiles grammars (lazily: the tokenizer is wrapped on the first structured request)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = tuple(eos_token_ids)
        self._cache_size = cache_size
        self._compiler: GrammarCompiler | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(
                self._tokenizer, self._vocab_size, self._eos_token_ids, self._cache_size
            )
        return self._compiler

    def new_matcher(self, params: StructuredOutputsParams | None) -> GrammarMatcher | None:
        """A fresh matcher for a request (None without structured outputs). ValueError naming
        the field when the grammar engine cannot compile the grammar for this tokenizer."""
        if params is None:
            return None
        return self.compiler.matcher(params)

    @staticmethod
    def bitmasks_for(requests: Sequence[Any]) -> list[torch.Tensor | None] | None:
        """Per request, the [W] int32 bitmask of its next token (None where unconstrained);
        None when no request is constrained."""
        if all(getattr(r, "grammar", None) is None for r in requests):
            return None
        return [r.grammar.bitmask() if r.grammar is not None else None for r in requests]

    @staticmethod
    def advance(request: Any) -> bool:
        """Moves the request's matcher to its output tokens; True when the grammar has
        terminated (end-of-sequence consumed in an accepting state)."""
        matcher: GrammarMatcher | None = request.grammar
        if matcher is None:
            return False
        if not matcher.sync(request.output_token_ids):
            # Only reachable when a mask was empty (a matcher in an error state); the output
            # cannot be constrained any further.
            logger.warning(
                "request %s: the grammar refused token %d; it is no longer constrained",
                request.request_id,
                request.output_token_ids[matcher.num_processed],
            )
            request.grammar = None
            return False
        return matcher.terminated

    @staticmethod
    def release(requests: Sequence[Any]) -> None:
        for request in requests:
            request.grammar = None


class StructuredSampler(Sampler):
    """The runner's sampler, given the step's grammar bitmasks by the engine.

    The engine sets `next_bitmasks` (one entry per sampling row of the next `ModelRunner.execute`,
    in the runner's order) just before the step; the next call attaches them to the rows and
    clears them. Rows built elsewhere (the memory profile's dummy step) pass through untouched.
    """

    def __init__(self) -> None:
        self.next_bitmasks: list[torch.Tensor | None] | None = None

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        bitmasks, self.next_bitmasks = self.next_bitmasks, None
        if bitmasks is not None:
            if len(bitmasks) != len(rows):
                raise RuntimeError(f"{len(bitmasks)} grammar bitmasks for {len(rows)} rows")
            rows = [
                row if mask is None else _with_bitmask(row, mask)
                for row, mask in zip(rows, bitmasks, strict=True)
            ]
        return super().__call__(logits, rows)


def _with_bitmask(row: SamplingRow, bitmask: torch.Tensor) -> SamplingRow:
    return dataclasses.replace(row, grammar_bitmask=bitmask)
