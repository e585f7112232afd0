"""The model runner: SchedulerOutput -> packed inputs + AttentionMetadata -> forward -> samples.

`prepare_inputs` is a function of the scheduler's output (and of the runner's persistent block
table, which it updates, when given one), so the metadata of any step can be built and inspected
in a test without a model. The forward runs once per step over all scheduled
tokens packed together; logits are computed only where they are needed: at the last token of
requests that sample, and, for a request that asked for prompt logprobs, at every prompt position
of the chunk whose next prompt token still lacks its logprob entry.

Prompt logprobs: the logits at position p give the logprob of prompt token p + 1, so a chunk
computing positions [start, end) yields the entries of tokens start + 1 ... min(end, P - 1)
(P prompt tokens; token 0 has none). A chunk may only start where the recorded entries end
(`Request.add_prompt_logprobs` checks it); a recompute after preemption skips the tokens that
already have entries.

Block tables: the runner keeps one persistent table (engine/block_table.py) with a row per live
request; each step writes only the block ids that changed since the request's previous step
(`ScheduledRequest.num_unchanged_blocks`) and gathers the step's rows, so the host work per step
does not grow with the requests' lengths. Without a persistent table (`prepare_inputs(...,
block_table=None)`, what tests and one-off forwards use) the table is built from scratch; both
give the same metadata.

Custom logits processors (engine/logits_process.py): every step the runner tells them the step's
batch (the plain sampling rows, each carrying its request id, then the verification rows) before
the sampler and the verifier apply them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata, pack_sequences
from engine.block_table import PersistentBlockTable
from engine.config import CacheConfig, ModelConfig
from engine.kv_cache import LayerKVCache, allocate_kv_cache
from engine.logits_process import LogitsProcessors
from engine.logprobs import logprob_entries
from engine.request import PromptLogprobs
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.scheduler.interface import SampledToken, ScheduledRequest, SchedulerOutput
from engine.spec_decode.verifier import VerifyItem, verify, verify_rows

# Prompt-logprob logits are computed this many positions at a time, so that a long prompt chunk
# never holds a [chunk, vocab] tensor at once.
_PROMPT_LOGITS_ROWS = 256


@dataclass(frozen=True, slots=True)
class PromptLogprobsSpan:
    """One request's prompt positions whose logits this step turns into prompt logprobs."""

    request_id: str
    first_token_index: int  # the prompt token the first row's entry is for
    num_rows: int
    num_top: int  # the request's prompt_logprobs


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: rows of the hidden states that sample
    sampling_request_ids: tuple[str, ...]  # [S]
    sampling_rows: tuple[SamplingRow, ...]  # [S]
    prompt_logits_indices: torch.Tensor  # [M] int64: rows whose logits give prompt logprobs
    prompt_logprob_token_ids: torch.Tensor  # [M] int64: the prompt token each row reports
    prompt_logprob_spans: tuple[PromptLogprobsSpan, ...]  # consecutive runs of the M rows
    # Speculative verification: for each item, m + 1 consecutive rows (the last real token and
    # the m drafts), in item order.
    verify_logits_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [R]
    verify_items: tuple[VerifyItem, ...] = ()


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    # request id -> its new token, or with speculation the 1 .. m + 1 tokens it emits
    sampled: dict[str, SampledToken | list[SampledToken]]
    # request id -> (index of the first prompt token covered, entries from there on)
    prompt_logprobs: dict[str, tuple[int, PromptLogprobs]] = field(default_factory=dict)


def prepare_inputs(
    scheduled: tuple[ScheduledRequest, ...] | list[ScheduledRequest],
    block_size: int,
    device: torch.device,
    block_table: PersistentBlockTable | None = None,
) -> ModelInputs:
    """The step's model inputs. With `block_table`, the scheduled requests' rows are updated
    there (only what changed) and the metadata's block table is gathered from it."""
    sequences: list[tuple[list[int], int, Sequence[int]]] = []  # (new ids, start, blocks)
    first_row = 0  # the packed row of the current request's first new token
    logits_indices: list[int] = []
    sampling_ids: list[str] = []
    sampling_rows: list[SamplingRow] = []
    prompt_indices: list[int] = []
    prompt_targets: list[int] = []
    prompt_spans: list[PromptLogprobsSpan] = []
    verify_indices: list[int] = []
    verify_items: list[VerifyItem] = []

    for item in scheduled:
        request = item.request
        start, end = item.num_computed_tokens, item.seq_len
        num_spec = len(item.spec_token_ids)
        new_ids = request.token_ids_range(start, end - num_spec) + list(item.spec_token_ids)
        sequences.append((new_ids, start, item.block_ids))
        last = first_row + item.num_new_tokens - 1  # the packed row of the last new token
        if request.needs_prompt_logprobs:
            assert request.prompt_logprobs is not None
            # Positions p whose logits give the logprob of prompt token p + 1, starting at the
            # first token without an entry (an earlier start is a recompute; a later one is
            # reported by Request.add_prompt_logprobs).
            lo = max(start, len(request.prompt_logprobs) - 1)
            hi = min(end, request.num_prompt_tokens - 1)
            if lo < hi:
                prompt_indices += range(first_row + lo - start, first_row + hi - start)
                prompt_targets += request.prompt_token_ids[lo + 1 : hi + 1]
                num_top = request.sampling_params.prompt_logprobs or 0
                prompt_spans.append(
                    PromptLogprobsSpan(request.request_id, lo + 1, hi - lo, num_top)
                )
        if item.sample and num_spec:
            verify_indices += range(last - num_spec, last + 1)
            # The budget may have cut the drafts short: keep their distributions in step.
            draft_probs = request.spec_draft_probs
            if draft_probs is not None:
                draft_probs = draft_probs[:num_spec]
            verify_items.append(VerifyItem(request, item.spec_token_ids, draft_probs))
        elif item.sample:
            logits_indices.append(last)
            sampling_ids.append(request.request_id)
            sampling_rows.append(
                SamplingRow(
                    params=request.sampling_params,
                    sampling_seed=request.sampling_seed,
                    output_position=request.num_output_tokens,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=request.output_token_ids,
                    eos_token_ids=request.eos_token_ids,
                    bad_words_token_ids=request.bad_words_token_ids,
                    penalty_counts=request.penalty_counts,
                    request_id=request.request_id,
                )
            )
        first_row += item.num_new_tokens

    def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    table = None
    if block_table is not None:
        rows = block_table.update(
            [
                (item.request.request_id, item.block_ids, item.num_unchanged_blocks)
                for item in scheduled
            ]
        )
        table = block_table.gather(rows)
    input_ids, positions, meta = pack_sequences(sequences, block_size, device, table)
    return ModelInputs(
        input_ids=input_ids,
        positions=positions,
        meta=meta,
        logits_indices=tensor(logits_indices, torch.int64),
        sampling_request_ids=tuple(sampling_ids),
        sampling_rows=tuple(sampling_rows),
        prompt_logits_indices=tensor(prompt_indices, torch.int64),
        prompt_logprob_token_ids=tensor(prompt_targets, torch.int64),
        prompt_logprob_spans=tuple(prompt_spans),
        verify_logits_indices=tensor(verify_indices, torch.int64),
        verify_items=tuple(verify_items),
    )


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[LayerKVCache],
        block_size: int,
        device: torch.device,
        logits_processors: LogitsProcessors | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.logits_processors = logits_processors
        self.block_table = PersistentBlockTable()

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        # Preempted requests come back with a whole new table: their rows go too.
        self.block_table.remove(output.finished_request_ids)
        self.block_table.remove(output.preempted_request_ids)
        inputs = prepare_inputs(output.scheduled, self.block_size, self.device, self.block_table)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        sampled: dict[str, SampledToken | list[SampledToken]] = {}
        spec_rows = [row for item in inputs.verify_items for row in verify_rows(item)]
        step = None
        if self.logits_processors is not None:  # the step's batch: [S plain rows, R spec rows]
            step = self.logits_processors.begin_step([*inputs.sampling_rows, *spec_rows])
        if inputs.sampling_rows:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [S, V]
            self.sampler.step_processors = step
            try:
                samples = self.sampler(logits, inputs.sampling_rows)
            finally:
                self.sampler.step_processors = None
            sampled.update(zip(inputs.sampling_request_ids, samples, strict=True))
        if inputs.verify_items:
            logits = self.model.compute_logits(hidden[inputs.verify_logits_indices])  # [R, V]
            offset = len(inputs.sampling_rows)
            emitted = verify(logits, inputs.verify_items, step, offset, spec_rows)
            sampled.update(
                (item.request.request_id, tokens)
                for item, tokens in zip(inputs.verify_items, emitted, strict=True)
            )
        return RunnerOutput(sampled, self._prompt_logprobs(hidden, inputs))

    def _prompt_logprobs(
        self, hidden: torch.Tensor, inputs: ModelInputs
    ) -> dict[str, tuple[int, PromptLogprobs]]:
        if not inputs.prompt_logprob_spans:
            return {}
        num_top = [s.num_top for s in inputs.prompt_logprob_spans for _ in range(s.num_rows)]
        entries: list[dict] = []
        for lo in range(0, len(num_top), _PROMPT_LOGITS_ROWS):
            hi = min(lo + _PROMPT_LOGITS_ROWS, len(num_top))
            logits = self.model.compute_logits(hidden[inputs.prompt_logits_indices[lo:hi]])
            logprobs = torch.log_softmax(logits.to(_logprob_dtype(logits.dtype)), dim=-1)
            entries += logprob_entries(
                logprobs, inputs.prompt_logprob_token_ids[lo:hi], num_top[lo:hi]
            )  # [hi - lo, V] -> one dict per row
        result: dict[str, tuple[int, PromptLogprobs]] = {}
        row = 0
        for span in inputs.prompt_logprob_spans:
            result[span.request_id] = (span.first_token_index, entries[row : row + span.num_rows])
            row += span.num_rows
        return result


@torch.inference_mode()
def dummy_forward(
    model: torch.nn.Module,
    model_config: ModelConfig,
    num_tokens: int,
    num_sampling_rows: int,
    block_size: int,
) -> None:
    """The memory profile's step (vLLM's profile run): one forward over num_tokens tokens, in
    prompts as long as max_model_len allows (the attention's worst case), then logits and a
    top-p sampling of num_sampling_rows rows. The K/V goes to a one-block scratch cache that
    every block table entry points at, so the run needs no KV cache of its own; its
    activations are what the profile measures."""
    scratch = allocate_kv_cache(
        model_config, CacheConfig(block_size=block_size, num_blocks=1, kv_cache_memory_bytes=0)
    )
    longest = max(1, min(num_tokens, model_config.max_model_len - 1))
    sequences: list[tuple[list[int], int, tuple[int, ...]]] = []
    for start in range(0, num_tokens, longest):
        length = min(longest, num_tokens - start)
        sequences.append(([0] * length, 0, (0,) * -(-length // block_size)))
    input_ids, positions, meta = pack_sequences(sequences, block_size, model_config.device)
    hidden = model(input_ids, positions, scratch, meta)  # [num_tokens, H]
    rows = min(num_sampling_rows, num_tokens)
    logits = model.compute_logits(hidden[:rows])  # [rows, V]
    params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=1)
    Sampler()(logits, [SamplingRow(params, sampling_seed=0, output_position=0)] * rows)


def _logprob_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision logits are turned into logprobs in float32, as the sampler does."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
