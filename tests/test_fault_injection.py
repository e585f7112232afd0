"""A step that fails leaves no untrusted K/V behind.

A fault is injected at each point of a step (before the forward, inside a layer, in the sampler,
in the speculative verification and proposers), the caller aborts the requests (what the server
does), then sends the same prompts and continuations of them again: every token must equal a
clean engine's (float64, greedy, prefix caching on), no block may stay in use, and with a draft
model the acceptance must equal a clean engine's (no stale draft K/V behind a cached block).
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineArgs, LLMEngine, SamplingParams

SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19]
PROMPTS = [
    [*SYSTEM, 40, 41, 42],
    [*SYSTEM, 50, 51, 52, 53],
    [*SYSTEM, 60, 61, 62, 63, 64],
    [70, 71, 72, 73, 74, 75],
]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
FAULT_STEPS = [0, 2]  # the prefill step, and a decode step that completes some blocks
CONTINUE_AFTER = 7  # continuations: prompt + the first tokens of its clean output


class InjectedFault(RuntimeError):
    pass


class Fault:
    """Raises once, on its first call after being armed."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = False

    def __call__(self, *args, **kwargs) -> None:
        if self.armed and not self.fired:
            self.fired = True
            raise InjectedFault("injected")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len)


Result = list[tuple[list[int], list[float]]]  # per prompt: (token ids, their logprobs)


def _generate(engine: LLMEngine, prompts: list[list[int]], tag: str) -> Result:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, PARAMS)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                logprobs = [
                    entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs, strict=True)
                ]
                final[out.request_id] = (c.token_ids, logprobs)
    return [final[f"{tag}{i}"] for i in range(len(prompts))]


def assert_same(got: Result, want: Result) -> None:
    """Same tokens, and the same logprobs up to float64 batch-shape noise: one slot of K/V that
    was never written moves them by far more, even where it flips no token."""
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-9)


def _engine(llama_path, spec: dict | None = None) -> LLMEngine:
    return LLMEngine(
        EngineArgs(
            model=str(llama_path),
            dtype="float64",
            block_size=4,
            enable_prefix_caching=True,
            speculative_config=spec,
        )
    )


@pytest.fixture(scope="module")
def clean(llama_path):
    engine = _engine(llama_path)
    outputs = _generate(engine, PROMPTS, "c")
    continuations = [p + out[:CONTINUE_AFTER] for p, (out, _) in zip(PROMPTS, outputs, strict=True)]
    return outputs, continuations, _generate(engine, continuations, "d")


NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 2,
}


def _self_draft(llama_path) -> dict:
    # The target as its own draft: every greedy draft is accepted unless the draft's cache is
    # stale, so any stale block shows as a lower acceptance.
    return {"method": "draft_model", "model": str(llama_path), "num_speculative_tokens": 3}


def _install(engine: LLMEngine, point: str, fault: Fault, monkeypatch) -> None:
    runner = engine.runner
    if point == "before_forward":
        runner.model.register_forward_pre_hook(lambda *a: fault())
    elif point == "in_layer":
        # After the first layer wrote its K/V, before the others did.
        decoder_layers(runner.model)[0].register_forward_hook(lambda *a: fault())
    elif point == "sampler":
        sampler = runner.sampler

        def faulty_sampler(*args):
            fault()
            return sampler(*args)

        monkeypatch.setattr(runner, "sampler", faulty_sampler)
    elif point == "verify":
        import engine.runner as runner_module

        verify = runner_module.verify

        def faulty_verify(*args):
            fault()
            return verify(*args)

        monkeypatch.setattr(runner_module, "verify", faulty_verify)
    elif point == "ngram_proposer":
        assert engine.speculator is not None and engine.speculator.ngram is not None
        propose = engine.speculator.ngram.propose

        def faulty_propose(*args):
            fault()
            return propose(*args)

        monkeypatch.setattr(engine.speculator.ngram, "propose", faulty_propose)
    elif point in ("draft_in_layer", "draft_before_forward"):
        assert engine.speculator is not None and engine.speculator.draft is not None
        draft = engine.speculator.draft.model
        if point == "draft_in_layer":
            decoder_layers(draft)[0].register_forward_hook(lambda *a: fault())
        else:
            draft.register_forward_pre_hook(lambda *a: fault())
    else:
        raise AssertionError(point)


CASES: list[tuple[str, str]] = [
    (None, "before_forward"),
    (None, "in_layer"),
    (None, "sampler"),
    ("ngram", "in_layer"),
    ("ngram", "verify"),
    ("ngram", "ngram_proposer"),
    ("draft", "in_layer"),
    ("draft", "draft_before_forward"),
    ("draft", "draft_in_layer"),
]


@pytest.mark.parametrize("fault_step", FAULT_STEPS)
@pytest.mark.parametrize(("spec", "point"), CASES)
def test_a_failed_step_leaves_no_poisoned_block(
    llama_path, clean, monkeypatch, spec, point, fault_step
):
    want, continuations, want_continued = clean
    config = {None: None, "ngram": NGRAM, "draft": _self_draft(llama_path)}[spec]
    engine = _engine(llama_path, config)
    fault = Fault()
    _install(engine, point, fault, monkeypatch)

    ids = [f"a{i}" for i in range(len(PROMPTS))]
    for request_id, prompt in zip(ids, PROMPTS, strict=True):
        engine.add_request(request_id, prompt, PARAMS)
    for _ in range(fault_step):
        engine.step()
    fault.armed = True
    with pytest.raises(InjectedFault):
        for _ in range(50):
            engine.step()
    assert fault.fired
    assert sorted(engine.failed_request_ids) == ids  # all four were in the failed step
    engine.abort_request(ids)  # what the server does with the requests of a failed step
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_usage == 0.0

    stats_before = engine.get_stats().spec_decode
    assert_same(_generate(engine, PROMPTS, "b"), want)
    assert_same(_generate(engine, continuations, "e"), want_continued)
    assert engine.scheduler.kv_cache_usage == 0.0
    stats = engine.get_stats()
    assert stats.scheduler.prefix_cache_hits_total > 0  # the resent prompts did hit the cache
    if spec == "draft":
        drafted = stats.spec_decode.num_draft_tokens - stats_before.num_draft_tokens
        accepted = stats.spec_decode.num_accepted_tokens - stats_before.num_accepted_tokens
        assert drafted > 0 and accepted == drafted  # the draft cache is not stale anywhere


@pytest.mark.parametrize("scheduler", ["default", "reference"])
def test_the_engine_can_step_on_after_a_failed_step(llama_path, clean, scheduler):
    """Without the abort: the failed step's requests are recomputed and finish as if nothing had
    happened (their K/V is not trusted, so they start over)."""
    want, _, _ = clean
    engine = LLMEngine(
        EngineArgs(model=str(llama_path), dtype="float64", block_size=4, scheduler=scheduler)
    )
    fault = Fault()
    decoder_layers(engine.runner.model)[0].register_forward_hook(lambda *a: fault())
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", prompt, PARAMS)
    engine.step()
    engine.step()
    fault.armed = True
    with pytest.raises(InjectedFault):
        engine.step()
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    assert [final[f"a{i}"] for i in range(len(PROMPTS))] == [tokens for tokens, _ in want]
    assert engine.scheduler.kv_cache_usage == 0.0
    assert engine.get_stats().scheduler.num_preemptions_total == 0  # a reset, not a preemption


def test_llm_generate_leaves_nothing_behind_when_a_step_fails(llama_path, clean):
    from engine import LLM

    want, _, _ = clean
    llm = LLM(str(llama_path), dtype="float64", block_size=4)
    fault = Fault()
    handle = decoder_layers(llm.llm_engine.runner.model)[0].register_forward_hook(
        lambda *a: fault()
    )
    fault.armed = True
    with pytest.raises(InjectedFault):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0
    handle.remove()
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [tokens for tokens, _ in want]
