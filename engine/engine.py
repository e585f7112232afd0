"""LLMEngine (add_request / abort_request / step) and LLM, the offline API on top of it.

One `step()`: the scheduler picks the work, the runner computes it in one packed forward and
samples, the scheduler applies the samples, and the engine turns the updated requests into
`RequestOutput`s (detokenizing incrementally). A prompt with `n > 1` becomes n engine requests
(samples) grouped under the caller's request id; its output lists the n completions. What an
output carries follows the request's `SamplingParams.output_kind`: everything so far
(CUMULATIVE), only what is new since its previous output (DELTA, built in time proportional to
that), or one output at the end (FINAL_ONLY, what `LLM.generate` uses).

With `tensor_parallel_size` > 1 the engine first starts (or, under torchrun, joins) the worker
ranks, loads rank 0's shard of the model and wraps it in `TensorParallelModel`
(engine/distributed), which broadcasts every forward and logits call to the workers: the runner,
the scheduler, the sampler and everything above them are unchanged. `shutdown()` stops the
workers (also run when the engine is collected and at exit).

Invariants: every request id the caller gives is unique among live requests; a request that
fails validation is never added (nothing else is touched); once a group's requests have all
finished, its blocks are free and the engine forgets it after returning its last output.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineArgs
from engine.cpu_malloc import tune_cpu_allocator
from engine.distributed.executor import TensorParallelExecutor, TensorParallelModel
from engine.distributed.parallel_state import model_parallel
from engine.fast.registry import get_attention_backend
from engine.generation_defaults import (
    GenerationDefaults,
    load_generation_defaults,
    log_generation_defaults,
)
from engine.kv_cache import (
    CudaMemoryBaseline,
    allocate_kv_cache,
    create_cache_config,
    needs_memory_profile,
)
from engine.logits_process import EngineConfigView, LogitsProcessors
from engine.logprobs import TokenTexts
from engine.models.loader import load_model
from engine.reference.scheduler import ReferenceScheduler
from engine.request import CompletionOutput, Request, RequestOutput, RequestStatus
from engine.runner import ModelRunner, RunnerOutput, dummy_forward
from engine.sampler import splitmix64
from engine.sampling_params import RequestOutputKind, SamplingParams, tokenize_bad_words
from engine.scheduler.interface import Scheduler, SchedulerOutput, SchedulerStats
from engine.scheduler.scheduler import DefaultScheduler
from engine.spec_decode.speculator import SpecDecodeStats, Speculator
from engine.stop import StopStringChecker
from engine.structured.manager import StructuredOutputManager, StructuredSampler
from engine.tokenizer import IncrementalDetokenizer, apply_chat_template, load_tokenizer

logger = logging.getLogger(__name__)

# What a prompt may be: text, token ids, or vLLM's dict forms {"prompt": ...} /
# {"prompt_token_ids": [...]}.
PromptType = str | list[int] | dict[str, Any]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters for logs and /metrics. Token totals count since start-up."""

    scheduler: SchedulerStats
    prompt_tokens_total: int  # prompt tokens of requests added
    generation_tokens_total: int  # tokens sampled
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding on


@dataclass
class _Group:
    """The caller's request: its prompt and the n samples generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    requests: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    stop_checkers: list[StopStringChecker] = field(default_factory=list)  # output text, per sample
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # DELTA: per sample, how many output tokens (and logprob entries) and how many characters
    # of visible text earlier outputs carried; whether prompt_logprobs were sent.
    sent_tokens: list[int] = field(default_factory=list)
    sent_text: list[int] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.requests)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.executor: TensorParallelExecutor | None = None
        try:
            self._init(args)
        except BaseException:
            self.shutdown()  # workers already started must not outlive a failed start-up
            raise

    def _init(self, args: EngineArgs) -> None:
        self.args = args
        self.model_config = args.create_model_config()
        self.scheduler_config = args.create_scheduler_config(self.model_config)
        # Default sampling fields from the model's generation config (vLLM's
        # --generation-config): LLM.generate without params and the server's requests use them.
        self.generation_defaults: GenerationDefaults = load_generation_defaults(
            self.model_config.model_path, args.generation_config, args.override_generation_config
        )
        log_generation_defaults(self.generation_defaults, args.generation_config)
        if self.model_config.device.type == "cpu":
            tune_cpu_allocator()  # before the first weights and activations are allocated
        # On CUDA the cache gets what the weights and a dummy step leave: measured from here.
        baseline = None
        if needs_memory_profile(args, self.model_config):
            baseline = CudaMemoryBaseline.take(
                self.model_config.device, args.gpu_memory_utilization
            )
        self.tokenizer = load_tokenizer(
            self.model_config.tokenizer_path, trust_remote_code=args.trust_remote_code
        )
        hf_config = self.model_config.hf_config
        self.attention_backend = get_attention_backend(
            args.attention_backend,
            self.model_config.device,
            # Gemma 2's attention soft-capping: `auto` must skip backends that cannot cap.
            needs_softcap=getattr(hf_config, "attn_logit_softcapping", None) is not None,
        )
        # Tensor parallelism: workers started (or joined, under torchrun) before loading, so
        # that every rank loads its shard at once; rank 0's shard behind a broadcasting proxy.
        if args.tensor_parallel_size > 1:
            self.executor = TensorParallelExecutor.create(args, self.model_config.device)
            # Stops the workers when the engine is collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, self.executor.shutdown)
            with model_parallel(self.executor.tp):
                shard = load_model(self.model_config, self.attention_backend)
            self.model = TensorParallelModel(shard, self.executor)
        else:
            self.model = load_model(self.model_config, self.attention_backend)
        self.speculator: Speculator | None = None
        draft_config = None
        if args.speculative_config is not None:
            self.speculator = Speculator(
                args.speculative_config, self.model_config, self.attention_backend
            )
            if self.speculator.draft is not None:
                draft_config = self.speculator.draft.model_config
        profiled_bytes = None
        if baseline is not None:
            profile = baseline.profile(self._dummy_forward)
            profiled_bytes = profile.kv_cache_budget(args.gpu_memory_utilization)
            logger.info(
                "memory profile: %.2f GiB total, torch peak %.2f GiB (weights + activations), "
                "%.2f GiB outside torch; %.2f GiB for the KV cache",
                profile.total_bytes / 2**30,
                profile.torch_peak_bytes / 2**30,
                profile.non_torch_bytes / 2**30,
                profiled_bytes / 2**30,
            )
        self.cache_config = create_cache_config(
            args, self.model_config, draft_config, profiled_bytes
        )
        kv_caches = allocate_kv_cache(self.model_config, self.cache_config)
        if isinstance(self.model, TensorParallelModel):
            assert self.executor is not None
            self.model.kv_caches = kv_caches
            self.executor.init_cache(self.cache_config.num_blocks, self.cache_config.block_size)
        processors = LogitsProcessors.build(
            args.logits_processors,
            EngineConfigView(self.model_config, self.scheduler_config, args),
            self.model_config.device,
        )
        self.runner = ModelRunner(
            self.model,
            kv_caches,
            self.cache_config.block_size,
            self.model_config.device,
            processors,
        )
        if self.speculator is not None:
            self.speculator.init_kv_cache(self.cache_config)
        # Structured outputs: grammars compiled (cached) per request; the runner's sampler gets
        # each step's grammar bitmasks from _run_step.
        self.structured = StructuredOutputManager(
            self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
        )
        self.runner.sampler = StructuredSampler()
        reference = self.scheduler_config.scheduler == "reference"
        scheduler_class = ReferenceScheduler if reference else DefaultScheduler
        self.scheduler: Scheduler = scheduler_class(self.scheduler_config, self.cache_config)
        # Unseeded requests draw their sampling seed from here: reproducible per engine seed.
        self._seed_rng = random.Random(args.seed)
        self._groups: dict[str, _Group] = {}
        # The caller's ids of the requests in the last step that raised (see step()).
        self.failed_request_ids: tuple[str, ...] = ()
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def _dummy_forward(self) -> None:
        """The memory profile's step, through the target and then the draft model. With
        speculation the target scores k + 1 rows per request (its verification)."""
        block_size = self.args.block_size
        budget = self.scheduler_config.max_num_batched_tokens
        rows = self.scheduler_config.max_num_seqs
        k = self.speculator.k if self.speculator is not None else 0
        dummy_forward(self.model, self.model_config, budget, rows * (k + 1), block_size)
        if self.speculator is not None and self.speculator.draft is not None:
            draft = self.speculator.draft
            dummy_forward(draft.model, draft.model_config, budget, rows, block_size)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def shutdown(self) -> None:
        """Releases what outlives the engine object: with tensor parallelism, stops the worker
        processes and the process group (also done when the engine is collected and at exit).
        Idempotent; without tensor parallelism there is nothing to release."""
        if self.executor is not None:
            self.executor.shutdown()

    # ---- requests ----------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt, validated against the vocabulary and max_model_len."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, token_ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                return self.tokenize_prompt(str(prompt["prompt"]))
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = None, list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt)}")
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        vocab = self.model_config.vocab_size
        for token_id in token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise ValueError(f"prompt_token_ids must be integers, got {token_id!r}")
            if not 0 <= token_id < vocab:
                raise ValueError(
                    f"prompt_token_ids: token id {token_id} is outside the vocabulary [0, {vocab})"
                )
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt is too long: {len(token_ids)} tokens, and max_model_len is {max_len} "
                "(the prompt must leave room for at least one generated token)"
            )
        return text, token_ids

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
    ) -> None:
        """Validates and queues a request. Raises ValueError (and adds nothing) on bad input."""
        params = params if params is not None else SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params.validate_for_model(self.model_config.vocab_size, self.model_config.max_logprobs)
        if self.runner.logits_processors is not None:  # their validate_params (extra_args)
            self.runner.logits_processors.validate_params(params)
        bad_words_token_ids = tokenize_bad_words(params.bad_words, self.tokenizer)
        text, token_ids = self.tokenize_prompt(prompt)
        self._check_fits_kv_cache(len(token_ids), params)
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {cache_salt!r}")

        # Compiled before anything is added: a grammar that fails is a ValueError naming it.
        grammars = [self.structured.new_matcher(params.structured_outputs) for _ in range(params.n)]

        requests: list[Request] = []
        for index in range(params.n):
            if params.seed is None:
                seed = self._seed_rng.getrandbits(63)
            else:  # sample i of a seeded request: its own stream, reproducible from the seed
                seed = params.seed if index == 0 else splitmix64(params.seed ^ splitmix64(index))
            requests.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                    prompt_token_ids=token_ids,
                    sampling_params=params,
                    eos_token_ids=self.model_config.eos_token_ids,
                    max_model_len=self.model_config.max_model_len,
                    sampling_seed=seed,
                    parent_id=request_id,
                    sample_index=index,
                    cache_salt=cache_salt,
                    bad_words_token_ids=bad_words_token_ids,
                    grammar=grammars[index],
                )
            )
        group = _Group(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            requests=requests,
            detokenizers=[
                IncrementalDetokenizer(
                    self.tokenizer,
                    token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                )
                for _ in requests
            ],
            stop_checkers=[
                StopStringChecker(params.stop, params.include_stop_str_in_output) for _ in requests
            ],
            output_kind=params.output_kind,
            sent_tokens=[0] * len(requests),
            sent_text=[0] * len(requests),
        )
        self._groups[request_id] = group
        for request in requests:
            self.scheduler.add_request(request)
        self.num_prompt_tokens_total += len(token_ids)

    def _check_fits_kv_cache(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """A request whose tokens could outgrow the whole KV cache would be preempted forever:
        reject it now (it can grow to prompt + max_tokens, capped by max_model_len)."""
        max_len = self.model_config.max_model_len
        longest = min(num_prompt_tokens + (params.max_tokens or max_len), max_len)
        capacity = self.cache_config.num_token_slots
        if longest > capacity:
            raise ValueError(
                f"request could grow to {longest} tokens (prompt {num_prompt_tokens} + "
                f"max_tokens {params.max_tokens}), more than the whole KV cache holds "
                f"({capacity} tokens); lower max_tokens or raise kv_cache_memory_bytes"
            )

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stops requests (by the caller's id) and frees their blocks at once. Unknown ids are
        ignored, as a request may finish while its abort is on the way."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        child_ids: list[str] = []
        for rid in ids:
            group = self._groups.pop(rid, None)
            if group is not None:
                child_ids += [r.request_id for r in group.requests]
                StructuredOutputManager.release(group.requests)
        if child_ids:
            self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.stats(),
            prompt_tokens_total=self.num_prompt_tokens_total,
            generation_tokens_total=self.num_generation_tokens_total,
            spec_decode=self.speculator.stats.snapshot() if self.speculator else None,
        )

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step; returns the outputs of the requests it advanced (for a
        FINAL_ONLY request, only its last one).

        If the step raises (the forward, the sampler, the proposer, ...), the K/V it wrote is not
        trusted: the prefix-cache entries it registered are dropped and its running requests
        go back to the waiting queue with nothing computed (`Scheduler.rollback_step`), then
        the error propagates. The caller may abort those requests (the server does) or step on
        (they are recomputed); either way no later request reads K/V the step never finished.
        `failed_request_ids` then lists the caller's ids of the requests that were in the step
        (requests waiting outside it are untouched).
        """
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        try:
            touched = self._run_step(output)
        except BaseException:
            self.scheduler.rollback_step(output)
            self.failed_request_ids = tuple(
                dict.fromkeys(
                    item.request.parent_id or item.request.request_id for item in output.scheduled
                )
            )
            raise
        self.scheduler.commit_step()
        return self._make_outputs(touched)

    def _run_step(self, output: SchedulerOutput) -> dict[str, tuple[_Group, list[int]]]:
        """Computes the scheduled step; returns group id -> (group, sample indices advanced)."""
        self._set_grammar_bitmasks(output)
        result = self.runner.execute(output)
        self._add_prompt_logprobs(output, result)
        updated = self.scheduler.update_from_output(output, result.sampled)
        if self.speculator is not None:
            self.speculator.record(output, result.sampled)

        touched: dict[str, tuple[_Group, list[int]]] = {}
        for request in updated:
            group = self._groups.get(request.parent_id or request.request_id)
            if group is None:
                continue
            self._advance_grammar(request)
            self._process_new_tokens(group, request)
            touched.setdefault(group.request_id, (group, []))[1].append(request.sample_index)
        if self.speculator is not None:
            assert isinstance(self.scheduler, DefaultScheduler)
            self.speculator.propose(output, self.scheduler.kv)
        return touched

    def _set_grammar_bitmasks(self, output: SchedulerOutput) -> None:
        """The grammar bitmasks of the step's plain sampling rows, in the runner's row order
        (`prepare_inputs`: requests that sample without drafts; draft verification computes
        its own in the verifier)."""
        sampler = self.runner.sampler
        if isinstance(sampler, StructuredSampler):
            sampling = [i.request for i in output.scheduled if i.sample and not i.spec_token_ids]
            sampler.next_bitmasks = StructuredOutputManager.bitmasks_for(sampling)

    def _advance_grammar(self, request: Request) -> None:
        """The update path of structured outputs: the matcher consumes the accepted tokens; a
        grammar that has terminated finishes the request with "stop"."""
        if self.structured.advance(request) and not request.is_finished:
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)

    def _make_outputs(self, touched: dict[str, tuple[_Group, list[int]]]) -> list[RequestOutput]:
        outputs = []
        for group, indices in touched.values():
            finished = group.finished
            if group.output_kind is RequestOutputKind.DELTA:
                outputs.append(self._make_delta_output(group, indices))
            elif finished or group.output_kind is RequestOutputKind.CUMULATIVE:
                outputs.append(self._make_output(group))
            if finished:
                StructuredOutputManager.release(group.requests)
                del self._groups[group.request_id]
        return outputs

    @functools.cached_property
    def token_texts(self) -> TokenTexts:
        """The decoded_token of logprob entries."""
        return TokenTexts(self.tokenizer)

    def _add_prompt_logprobs(self, output: SchedulerOutput, result: RunnerOutput) -> None:
        for item in output.scheduled:
            chunk = result.prompt_logprobs.get(item.request.request_id)
            if chunk is not None:
                first_index, entries = chunk
                for entry in entries:
                    self.token_texts.fill(entry)
                item.request.add_prompt_logprobs(first_index, entries)

    def _process_new_tokens(self, group: _Group, request: Request) -> None:
        """Detokenizes the request's new tokens (one, or several after speculation) one at a
        time and ends the request at the token whose text completes a stop string; accepted
        drafts after that token are dropped, as if generated one by one."""
        index = request.sample_index
        detok = group.detokenizers[index]
        checker = group.stop_checkers[index]
        first_new = len(detok.token_ids)
        new_tokens = request.output_token_ids[first_new:]
        min_tokens = request.sampling_params.min_tokens
        for offset, token_id in enumerate(new_tokens):
            count = first_new + offset + 1  # output tokens up to and including this one
            last = offset == len(new_tokens) - 1
            delta = detok.add_tokens([token_id])
            if last and request.is_finished:
                delta += detok.flush()
            if request.logprobs:
                self.token_texts.fill(request.logprobs[count - 1])
            # As in vLLM, no stop string can end within the first min_tokens tokens' text.
            stop = checker.append(delta, check=count > min_tokens)
            if stop is None:
                continue
            request.stop_reason = stop
            if not last:
                self._drop_outputs_after(request, count)
            if request.is_finished:  # it also hit a length limit or a stop token
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            break
        self.num_generation_tokens_total += request.num_output_tokens - first_new

    @staticmethod
    def _drop_outputs_after(request: Request, count: int) -> None:
        if request.logprobs is not None:
            for token_id, entry in zip(
                request.output_token_ids[count:], request.logprobs[count:], strict=True
            ):
                request.cumulative_logprob -= entry[token_id].logprob
            del request.logprobs[count:]
        del request.output_token_ids[count:]

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = []
        for request, checker in zip(group.requests, group.stop_checkers, strict=True):
            params = request.sampling_params
            completions.append(
                CompletionOutput(
                    index=request.sample_index,
                    text=checker.visible_text(finished=request.is_finished),
                    token_ids=list(request.output_token_ids),
                    cumulative_logprob=(
                        request.cumulative_logprob if params.logprobs is not None else None
                    ),
                    logprobs=list(request.logprobs) if request.logprobs is not None else None,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=group.finished,
            prompt_logprobs=(
                list(group.requests[0].prompt_logprobs)
                if group.requests[0].prompt_logprobs is not None
                else None
            ),
        )

    def _make_delta_output(self, group: _Group, indices: list[int]) -> RequestOutput:
        """What is new since the group's previous output, for the samples that advanced (in
        index order): their new token ids, logprobs and text. O(new tokens), no whole-list
        copies (`prompt_token_ids` is the group's own list, shared, never mutated)."""
        completions = []
        for index in sorted(indices):
            request, checker = group.requests[index], group.stop_checkers[index]
            params = request.sampling_params
            sent, sent_text = group.sent_tokens[index], group.sent_text[index]
            finished = request.is_finished
            text = checker.visible_text_since(sent_text, finished=finished)  # O(new text)
            group.sent_tokens[index] = request.num_output_tokens
            group.sent_text[index] = checker.visible_length(finished=finished)
            completions.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=request.output_token_ids[sent:],
                    cumulative_logprob=(
                        request.cumulative_logprob if params.logprobs is not None else None
                    ),
                    logprobs=request.logprobs[sent:] if request.logprobs is not None else None,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        prompt_logprobs = group.requests[0].prompt_logprobs
        if prompt_logprobs is not None:
            # Sent once, complete: outputs only come after the prompt's last chunk.
            prompt_logprobs = None if group.sent_prompt_logprobs else list(prompt_logprobs)
            group.sent_prompt_logprobs = True
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=group.finished,
            prompt_logprobs=prompt_logprobs,
        )


class LLM:
    """The offline API: `LLM(model=PATH).generate(prompts, SamplingParams(...))`.

    Keyword arguments are `EngineArgs` fields (vLLM's names: dtype, seed, max_model_len,
    block_size, max_num_seqs, kv_cache_memory_bytes, num_gpu_blocks_override, ...).
    `model=None` runs the embedded demo model (random weights: its text is noise).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        if model is None:
            from engine.demo import demo_model_path

            model = str(demo_model_path())
        self.llm_engine = LLMEngine(EngineArgs(model=str(model), **kwargs))
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the defaults of the model's generation config (the fields
        generation_config.json sets, with override_generation_config merged over; plain
        defaults with generation_config="vllm"). `generate` and `chat` use it when given no
        sampling params (vLLM's method; engine/generation_defaults.py has the rules)."""
        return self.llm_engine.generation_defaults.sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns one RequestOutput per prompt, in input order.
        Without sampling_params, `get_default_sampling_params()` (the model's generation-config
        defaults); given ones are used as they are."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(params_list)} for {len(prompts)} prompts"
                )
        # Only the final outputs are kept (as vLLM's LLM does): no per-step output copies.
        params_list = [p.replace(output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]
        ids = self._add_all(prompts, params_list)
        try:
            return self._run(ids, use_tqdm)
        except BaseException:
            self.llm_engine.abort_request(ids)  # a failed step or Ctrl-C: leave nothing behind
            raise

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = [
            {
                "prompt_token_ids": apply_chat_template(
                    self.get_tokenizer(),
                    conversation,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template,
                )
            }
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _add_all(self, prompts: list[PromptType], params: list[SamplingParams]) -> list[str]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                request_id = str(self._counter)
                self._counter += 1
                engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)  # leave the engine as it was
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.llm_engine
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        start = time.perf_counter()
        prompt_tokens = generated = 0
        with tqdm(
            total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True
        ) as bar:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        prompt_tokens += len(out.prompt_token_ids)
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(
                            f"input: {prompt_tokens / elapsed:.1f} toks/s, "
                            f"output: {generated / elapsed:.1f} toks/s"
                        )
                        bar.update(1)
                if pending and not engine.has_unfinished_requests():
                    raise RuntimeError(f"requests {sorted(pending)} vanished from the engine")
        return [results[i] for i in ids]


__all__ = ["LLM", "LLMEngine", "RequestStatus"]
