"""The engine's side of speculative decoding: after each step, propose drafts for the next one,
and count what the verification accepted.

Drafts are set on `Request.spec_token_ids` (and `spec_draft_probs` when a draft model sampled
them); the scheduler schedules them after the request's pending token, the runner verifies them,
and the scheduler rolls back the rejected ones. A proposal never makes a request exceed
`max_tokens` or `max_model_len`: a step emits at most m + 1 tokens for m drafts, so
m <= min(k, max_tokens - outputs - 1, max_model_len - tokens - 1).

Proposers: `draft_model` is driven here (it runs batched over its own KV cache); every other
method (`ngram`, `suffix`, a plug-in) is built by engine/spec_decode/registry.py and asked one
request at a time; one that has `finish(request)` is told when a request it saw finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.attention import AttentionBackend
from engine.config import CacheConfig, ModelConfig, SpeculativeConfig
from engine.request import Request, RequestStatus
from engine.scheduler.interface import SampledToken, ScheduledRequest, SchedulerOutput
from engine.scheduler.kv_cache_manager import KVCacheManager
from engine.spec_decode.draft_model import DraftInput, DraftModelProposer
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.registry import Proposer, build_proposer


@dataclass(slots=True)
class SpecDecodeStats:
    """Totals since start-up, as vLLM's spec_decode metrics count them."""

    num_drafts: int = 0  # verifications of at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the one the target adds)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.accepted_per_position),
        )


def draft_room(request: Request, k: int) -> int:
    """How many drafts the request may verify next step without overshooting its limits."""
    room = min(k, request.max_model_len - request.num_tokens - 1)
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None:
        room = min(room, max_tokens - request.num_output_tokens - 1)
    return max(room, 0)


class Speculator:
    def __init__(
        self, spec: SpeculativeConfig, model_config: ModelConfig, backend: AttentionBackend
    ) -> None:
        """Loads the draft model, if any; `init_kv_cache` gives it its cache."""
        self.config = spec
        self.k = spec.num_speculative_tokens
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        self.proposer: Proposer | None = None
        self.draft: DraftModelProposer | None = None
        self.vocab_size = int(model_config.hf_config.vocab_size)
        if spec.method == "draft_model":
            self.draft = DraftModelProposer(model_config, spec, backend)
        else:
            self.proposer = build_proposer(spec, model_config)
        # The n-gram matcher itself, for callers that look at it (tests inject faults there).
        self.ngram: NgramProposer | None = getattr(self.proposer, "ngram", None)

    def init_kv_cache(self, cache_config: CacheConfig) -> None:
        if self.draft is not None:
            self.draft.init_kv_cache(cache_config)

    def record(
        self, output: SchedulerOutput, sampled: dict[str, SampledToken | list[SampledToken]]
    ) -> None:
        """Counts the drafts verified in this step and how many were accepted."""
        for item in output.scheduled:
            num_drafts = len(item.spec_token_ids)
            emitted = sampled.get(item.request.request_id)
            if not num_drafts or not isinstance(emitted, list):
                continue
            accepted = len(emitted) - 1
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += num_drafts
            self.stats.num_accepted_tokens += accepted
            for position in range(accepted):
                self.stats.accepted_per_position[position] += 1

    def propose(self, output: SchedulerOutput, kv: KVCacheManager) -> None:
        """Sets drafts for the next step on the requests this step advanced."""
        if self.proposer is not None:
            finish = getattr(self.proposer, "finish", None)
            for item in output.scheduled:
                request = item.request
                if request.is_finished:
                    if finish is not None:
                        finish(request)
                elif item.sample and request.status is RequestStatus.RUNNING:
                    room = draft_room(request, self.k)
                    request.spec_token_ids = self._checked(
                        self.proposer.propose(request, room), room
                    )
            return
        assert self.draft is not None
        inputs: list[DraftInput] = []
        finished = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                finished.append(item)
                continue
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted: its blocks are gone
            end, num_drafts = request.num_computed_tokens, 0
            room = draft_room(request, self.k) if item.sample else 0
            # The token just sampled and the drafts' own K/V need slots up to
            # num_computed + room - 1; without them the draft only mirrors this step.
            if room and kv.allocate_slots(request, 0, num_lookahead_tokens=room):
                end, num_drafts = request.num_tokens, room
            if end > item.num_computed_tokens:
                inputs.append(
                    DraftInput(
                        request=request,
                        block_ids=kv.block_ids(request.request_id),
                        start=item.num_computed_tokens,
                        end=end,
                        num_drafts=num_drafts,
                    )
                )
        # Requests that finished in this step freed their blocks, but the full ones stay in the
        # prefix cache: the draft writes its K/V there too, so that a later request that hits
        # them drafts from valid K/V. Done after the lookahead allocations above, stopping at
        # a block one of them took over (see _cached_end), so no write lands in a block that
        # now belongs to another request.
        for item in finished:
            end = self._cached_end(item, kv)
            if end > item.num_computed_tokens:
                inputs.append(
                    DraftInput(item.request, item.block_ids, item.num_computed_tokens, end, 0)
                )
        by_id = {i.request.request_id: i.request for i in inputs}
        for request_id, proposal in self.draft.run(inputs).items():
            request = by_id[request_id]
            request.spec_token_ids = proposal.token_ids
            request.spec_draft_probs = proposal.probs

    def _checked(self, proposal: list[int], room: int) -> list[int]:
        """The proposal cut to `room`; a token id outside the vocabulary is a ValueError (a
        plug-in's bug must not reach the embedding lookup as an index error)."""
        drafts = [int(t) for t in list(proposal)[:room]]
        bad = [t for t in drafts if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"speculative_config.method {self.config.method!r} proposed token ids outside "
                f"the vocabulary [0, {self.vocab_size}): {bad}"
            )
        return drafts

    @staticmethod
    def _cached_end(item: ScheduledRequest, kv: KVCacheManager) -> int:
        """For a request that finished in this step: where the draft may stop writing its K/V,
        capped at the real tokens the target computed. It stops before the first block that a
        lookahead allocation took over since (held again, no longer cached); blocks still
        cached, or free and uncached (no one can reuse them), are safe to write."""
        request, bs = item.request, kv.block_size
        end = min(request.num_computed_tokens, request.num_tokens)
        position = item.num_computed_tokens
        while position < end:
            block = kv.pool.blocks[item.block_ids[position // bs]]
            if block.block_hash is None and block.ref_cnt > 0:
                break  # reallocated to another request
            position = (position // bs + 1) * bs
        return min(position, end)
