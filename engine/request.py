"""Requests inside the engine, and the outputs handed back to callers.

A `Request` is one sequence being generated (a prompt with `n > 1` becomes n requests that share a
parent id). Its state is explicit data that the scheduler and the runner read:

    all_token_ids = prompt_token_ids + output_token_ids
    0 <= num_computed_tokens <= num_tokens

`num_computed_tokens` counts the tokens whose K/V are in the cache. Every step brings it closer to
`num_tokens`; a prompt, a chunk of a prompt and a decode step differ only in how far it moves.
When it equals `num_tokens` after a step, the model has produced logits for the last token and one
token is sampled and appended. Preemption by recompute resets it to 0.

`RequestOutput` / `CompletionOutput` mirror vLLM's classes so existing user code reads them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.penalties import PenaltyCounts, penalties_enabled
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"  # eos, a stop token id or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token, its rank in the distribution, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: token id -> Logprob (the sampled token first, then the top-N), as in vLLM.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token: the same, with None for the first token (nothing predicts it).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class Request:
    """One sequence in the engine. Mutated only by the scheduler (state) and engine (outputs)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    sampling_seed: int  # seeds the per-position noise; fixed for the request's life
    parent_id: str | None = None  # the caller's id when this is one of n samples
    sample_index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    cache_salt: str | None = None  # separates this request's prefix-cache entries from others'
    cumulative_logprob: float = 0.0
    logprobs: SampleLogprobs | None = None
    # The bad words of the sampling params as token-id sequences (tokenized by the engine).
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # One entry per prompt token computed so far (None for the first token, which has no
    # logprob); kept only by sample 0 of a request that asked for prompt_logprobs.
    prompt_logprobs: PromptLogprobs | None = None
    # Speculative decoding: draft tokens proposed for the next step (not yet the request's
    # tokens), and their draft distributions [len, V] when a draft model sampled them.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: Any = None
    # Incremental output-token counts for the penalties (None when the request uses none).
    penalty_counts: PenaltyCounts | None = None
    # Structured outputs: the grammar matcher (engine.structured.grammar.GrammarMatcher), which
    # has consumed exactly output_token_ids; None when unconstrained or once released.
    grammar: Any = None

    def __post_init__(self) -> None:
        if self.penalty_counts is None and penalties_enabled(self.sampling_params):
            self.penalty_counts = PenaltyCounts(self.prompt_token_ids)
        if self.sampling_params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if (
            self.sampling_params.prompt_logprobs is not None
            and self.sample_index == 0
            and self.prompt_logprobs is None
        ):
            self.prompt_logprobs = [None]

    @property
    def cache_extra_keys(self) -> tuple[str, ...]:
        """Mixed into every block hash of this request: only equal keys share cached blocks."""
        return (self.cache_salt,) if self.cache_salt is not None else ()

    @property
    def skip_prefix_cache(self) -> bool:
        """Prompt logprobs need the logits of every prompt position, so no cached prefix."""
        return getattr(self.sampling_params, "prompt_logprobs", None) is not None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while some prompt token still lacks its logprob entry."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(
            self.prompt_token_ids
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_range(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(
        self, token_id: int, logprob: float = 0.0, top_logprobs: dict[int, Logprob] | None = None
    ) -> None:
        """Appends a sampled token; its logprob entry too when the request asked for logprobs."""
        self.output_token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top_logprobs if top_logprobs is not None else {})

    def add_prompt_logprobs(self, first_index: int, entries: PromptLogprobs) -> None:
        """Records the entries of prompt tokens first_index, first_index + 1, ...; entries of
        tokens already recorded (a recompute after preemption) are ignored."""
        assert self.prompt_logprobs is not None
        have = len(self.prompt_logprobs)
        if first_index > have:
            raise RuntimeError(
                f"request {self.request_id}: prompt logprobs of tokens {have}..{first_index - 1} "
                "were never computed (a prompt_logprobs request must not use the prefix cache)"
            )
        self.prompt_logprobs += entries[have - first_index :]

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last appended token puts this request in, if any.

        Order as in vLLM: a stop token (eos unless ignore_eos, or stop_token_ids) wins over
        length, so a request that emits eos as its last allowed token finishes with "stop".
        Before min_tokens tokens only the length limits apply.
        """
        params = self.sampling_params
        last = self.output_token_ids[-1]
        may_stop = self.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if may_stop and last in params.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


@dataclass(slots=True)
class CompletionOutput:
    """One of the n samples of a request, as vLLM returns it."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """What `LLM.generate` returns per prompt and `LLMEngine.step` yields per update.

    With `output_kind=DELTA`, `outputs` lists only the samples that advanced since the previous
    output, each holding only its new tokens, text and logprobs (see `RequestOutputKind`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
