"""The production scheduler: token-budget continuous batching with chunked prefill, automatic
prefix caching and preemption by recompute.

Every request has `num_computed_tokens` catching up to `num_tokens`; a step gives each scheduled
request some of the gap. There is no separate prefill or decode phase: a fresh prompt, a chunk of
a long prompt, a prefix-cache hit and a decode differ only in where `num_computed_tokens` starts
and how far the step moves it.

Each step:
1. Running requests, in admission order, each get min(gap, remaining budget) tokens (plus their
   speculative tokens, when speculation is on). If the pool cannot hold them, the most recently
   admitted running request is preempted (blocks freed, computed tokens forgotten, put back at
   the front of the queue), until the request fits or is itself the one preempted.
2. If nothing was preempted, waiting requests are admitted first come first served while the
   request cap, the budget and the pool allow: each takes its longest cached prefix, then as many
   of its remaining tokens as the budget allows (all of them when chunked prefill is off; then a
   prompt larger than the remaining budget waits for the next step).

Invariants: per step, the tokens scheduled <= max_num_batched_tokens and the requests scheduled
<= max_num_seqs; a running request's block table covers its computed tokens; a request whose
tokens can never fit the whole pool is rejected when added (see `check_fits`), so preemption
always ends: the oldest running request always fits.

Block tables are not rebuilt per step: each scheduled request carries a snapshot of its
persistent block-id list and how many leading ids are unchanged since its previous scheduled
step (`KVCacheManager.ids_for_step`); requests that ended are reported once, in the next output
that schedules anything (`SchedulerOutput.finished_request_ids`), so the runner can drop its row.
"""

from __future__ import annotations

from collections import deque

from engine.config import CacheConfig, SchedulerConfig
from engine.request import Request, RequestStatus
from engine.scheduler.interface import (
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from engine.scheduler.kv_cache_manager import KVCacheManager


class DefaultScheduler:
    """Implements `engine.scheduler.interface.Scheduler`."""

    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.config = config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.finished_ids: list[str] = []  # ended since the last non-empty output

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        found = [self.requests[i] for i in request_ids if i in self.requests]
        for request in found:
            self._finish(request, status)
        return found

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_preemptions_total=self.num_preemptions,
            prefix_cache_queries_total=self.kv.prefix_cache_queries,
            prefix_cache_hits_total=self.kv.prefix_cache_hits,
        )

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # 1. Running requests, oldest first.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            gap = request.num_tokens - request.num_computed_tokens
            # Draft tokens ride along when the budget has room for them after the real ones.
            num_new = min(
                gap + len(request.spec_token_ids),
                budget,
                self.config.max_model_len - request.num_computed_tokens,
            )
            if num_new <= 0:
                index += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # preempted itself: every newer request is preempted already
            num_spec = max(0, num_new - gap)
            scheduled.append(
                self._scheduled(request, num_new, tuple(request.spec_token_ids[:num_spec]))
            )
            budget -= num_new
            index += 1

        # 2. Waiting requests, first come first served.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            hits = self.kv.get_computed_blocks(request) if request.num_computed_tokens == 0 else []
            num_cached = len(hits) * self.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            request.num_computed_tokens = num_cached
            if not self.kv.allocate_slots(request, num_new, hits):
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        finished: tuple[str, ...] = ()
        if scheduled:
            finished = tuple(self.finished_ids)
            self.finished_ids.clear()
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted_request_ids=tuple(preempted),
            finished_request_ids=finished,
        )

    def _scheduled(
        self, request: Request, num_new: int, spec: tuple[int, ...] = ()
    ) -> ScheduledRequest:
        block_ids, num_unchanged = self.kv.ids_for_step(request.request_id)
        return ScheduledRequest(
            request=request,
            num_computed_tokens=request.num_computed_tokens,
            num_new_tokens=num_new,
            block_ids=block_ids,
            sample=request.num_computed_tokens + num_new - len(spec) == request.num_tokens,
            spec_token_ids=spec,
            num_unchanged_blocks=num_unchanged,
        )

    def _preempt(self, request: Request) -> None:
        self._reset(request)
        request.num_preemptions += 1
        self.num_preemptions += 1

    def _reset(self, request: Request) -> None:
        """Frees the request's blocks and puts it at the front of the queue to recompute."""
        self.kv.free(request)
        request.spec_token_ids = []
        request.spec_draft_probs = None
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)

    def commit_step(self) -> None:
        self.kv.commit()

    def rollback_step(self, output: SchedulerOutput) -> None:
        self.kv.discard_uncommitted()
        # The runner may never have seen the output: report its ended requests again.
        self.finished_ids[:0] = output.finished_request_ids
        failed = {id(item.request) for item in output.scheduled}
        reset = [r for r in self.running if id(r) in failed and r.status is RequestStatus.RUNNING]
        self.running = [r for r in self.running if id(r) not in failed]
        for request in reversed(reset):  # oldest ends up first in the queue
            self._reset(request)

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, SampledToken | list[SampledToken]]
    ) -> list[Request]:
        updated: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.num_computed_tokens = item.seq_len
            if not item.sample:
                continue
            samples = sampled[request.request_id]
            if isinstance(samples, SampledToken):
                samples = [samples]
            # With drafts: the first len(samples) - 1 drafts were accepted, the rest rejected,
            # and their K/V (past the accepted ones) no longer count as computed.
            num_rejected = len(item.spec_token_ids) - (len(samples) - 1)
            request.num_computed_tokens -= num_rejected
            request.spec_token_ids = []
            request.spec_draft_probs = None
            for sample in samples:
                request.append_token(sample.token_id, sample.logprob, sample.top_logprobs)
                stop = request.check_stop()
                if stop is not None:
                    self._finish(request, stop)
                    break
            if num_rejected and not request.is_finished:
                self.kv.trim(request, request.num_tokens)  # blocks only the rejected needed
            updated.append(request)
        return updated

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        if self.requests.pop(request.request_id, None) is not None:
            self.finished_ids.append(request.request_id)
