"""What a scheduler hands the model runner each step, and the protocol every scheduler follows.

A step: `schedule()` picks, for each request it runs, how many of its not-yet-computed tokens to
compute now and which blocks hold its context; the runner computes them and samples one token for
each request whose computed tokens then reach its total; `update_from_output()` applies the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.request import Logprob, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The step computes tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) of
    request.all_token_ids + spec_token_ids; `sample` is true when that reaches the request's last
    token, so the step's logits at its last real token give its next token (and, with drafts,
    the logits at each draft position verify it).

    `block_ids` is the request's whole block table (the production scheduler hands an immutable
    snapshot of its persistent list, no copy); `num_unchanged_blocks` says how many of its
    leading ids equal those of the request's previous ScheduledRequest, so the runner's
    persistent block table rewrites only the rest (0, the default: rewrite the whole row).
    """

    request: Request
    num_computed_tokens: int
    num_new_tokens: int  # spec tokens included
    block_ids: Sequence[int]  # the request's whole block table, in order
    sample: bool
    # Draft tokens verified in this step: the last len(spec_token_ids) of the new tokens, which
    # are not the request's tokens yet. Logits at each of them and at the token before them are
    # scored; the rejection sampler keeps a prefix and adds one token.
    spec_token_ids: tuple[int, ...] = ()
    num_unchanged_blocks: int = 0

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted_request_ids: tuple[str, ...] = ()
    # Requests that ended (finished or aborted) since the previous output that scheduled
    # anything: the runner drops what it keeps per request (its block-table row). Only outputs
    # with scheduled requests carry them (an empty output may never reach the runner).
    finished_request_ids: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class SampledToken:
    """The sampler's result for one request."""

    token_id: int
    # Of the raw distribution (before temperature / top-k / top-p); NaN when the request asked
    # for no logprobs (the sampler skips the [B, V] normaliser then; nothing reports it).
    logprob: float
    top_logprobs: dict[int, Logprob] | None = field(default=None)  # sampled token first


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A snapshot of the scheduler's gauges and counters (totals count since start-up)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens found cached


class Scheduler(Protocol):
    def add_request(self, request: Request) -> None: ...

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Ends the requests with `status` (an abort, or a stop string the engine found) and
        frees their blocks at once; returns those that existed. Unknown ids are ignored."""
        ...

    def schedule(self) -> SchedulerOutput: ...

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, SampledToken]
    ) -> list[Request]:
        """Advances computed tokens, appends samples, finishes stopped requests; returns the
        requests that received a token (finished ones included)."""
        ...

    def commit_step(self) -> None:
        """The step last scheduled succeeded: the K/V it wrote may be served from now on."""
        ...

    def rollback_step(self, output: SchedulerOutput) -> None:
        """The step `output` failed (anywhere between schedule() and the end of the step): drops
        what it registered in the prefix cache and puts its still-running requests back at the
        front of the waiting queue with no blocks and nothing computed, as a preemption does
        (without counting one). Finished and aborted requests stay as they are."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> SchedulerStats: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, 0..1."""
        ...
