"""The reference scheduler: the simplest correct continuous batching.

Rules, in order, each step:
1. Every running request computes its one pending token (a decode). If the pool has no free block
   for it, the most recently admitted running request is preempted: its blocks are freed, its
   computed tokens forgotten, and it goes back to the front of the queue (recompute).
2. If nothing was preempted, waiting requests are admitted first come, first served, each with its
   whole prompt (plus, after a preemption, the tokens it had generated) in one step, while the
   request cap, the token budget and the free blocks allow.

No chunking, no prefix caching, no block sharing: each block has exactly one owner. Invariants:
free blocks + blocks owned = num_blocks; a running request owns ceil(num_computed_tokens /
block_size) blocks after each update; the oldest running request always makes progress, because
a request that could outgrow the whole pool is rejected when it is added (LLMEngine.add_request).

Each scheduled request carries a copy of its whole block table, and says nothing is unchanged
(`num_unchanged_blocks` = 0), so the runner rewrites its row every step: simplest, and O(blocks)
per request per step (the production scheduler hands only what changed).
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


class BlockAllocator:
    """A free list of block ids."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class ReferenceScheduler:
    """Implements `engine.scheduler.interface.Scheduler`."""

    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.config = config
        self.block_size = cache_config.block_size
        self.allocator = BlockAllocator(cache_config.num_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.block_tables: dict[str, list[int]] = {}
        self.num_preemptions = 0
        self.finished_ids: list[str] = []  # ended since the last output that scheduled anything

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        wanted = set(request_ids)
        found = [r for r in [*self.running, *self.waiting] if r.request_id in wanted]
        for request in found:
            self._finish(request, status)
        return found

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache_usage,
            num_preemptions_total=self.num_preemptions,
        )

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    # ---- one step ----------------------------------------------------------------------------

    def _blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks to add so the request's table covers num_tokens tokens."""
        have = len(self.block_tables.get(request.request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.free(self.block_tables.pop(request.request_id))
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def commit_step(self) -> None:
        pass  # no prefix cache: nothing is provisional

    def rollback_step(self, output: SchedulerOutput) -> None:
        # The runner may never have seen the output: report its ended requests again.
        self.finished_ids[:0] = output.finished_request_ids
        failed = {id(item.request) for item in output.scheduled}
        reset = [r for r in self.running if id(r) in failed]
        for request in reversed(reset):  # oldest ends up first in the queue
            self.running.remove(request)
            self.allocator.free(self.block_tables.pop(request.request_id))
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # 1. Decodes of running requests, oldest first; preempt the newest when out of blocks.
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            need = self._blocks_needed(request, request.num_tokens)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it preempted itself, so every newer request is preempted too
            self.block_tables[request.request_id] += self.allocator.allocate(need)
            scheduled.append(self._scheduled(request))

        # 2. Admit waiting requests, whole prompt at once, first come first served.
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        while not preempted and self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            new_tokens = request.num_tokens - request.num_computed_tokens
            if num_tokens + new_tokens > self.config.max_num_batched_tokens:
                break
            need = self._blocks_needed(request, request.num_tokens)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            self.block_tables[request.request_id] = self.allocator.allocate(need)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request))
            num_tokens += new_tokens

        finished: tuple[str, ...] = ()
        if scheduled:  # only outputs that schedule something reach the runner
            finished, self.finished_ids = tuple(self.finished_ids), []
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted_request_ids=tuple(preempted),
            finished_request_ids=finished,
        )

    def _scheduled(self, request: Request) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            num_computed_tokens=request.num_computed_tokens,
            num_new_tokens=request.num_tokens - request.num_computed_tokens,
            block_ids=tuple(self.block_tables[request.request_id]),
            sample=True,
        )

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, SampledToken]
    ) -> list[Request]:
        updated: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.num_computed_tokens = item.seq_len
            if not item.sample:
                continue
            sample = sampled[request.request_id]
            request.append_token(sample.token_id, sample.logprob, sample.top_logprobs)
            stop = request.check_stop()
            if stop is not None:
                self._finish(request, stop)
            updated.append(request)
        return updated

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        blocks = self.block_tables.pop(request.request_id, None)
        if blocks is not None:
            self.allocator.free(blocks)
        self.finished_ids.append(request.request_id)
