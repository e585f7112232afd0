"""The production scheduler changes no token: random workloads through the default engine
(chunked prefill with a small token budget, prefix caching, a pool small enough to force
preemption, aborts, n > 1) give every request exactly the reference engine's tokens, greedy and
seeded sampling, in float64. With speculative decoding (n-gram, suffix decoding and draft-model
proposers) on top of all that, every greedy request still gets exactly the reference tokens
(seeded sampling keeps the target's distribution but not the same draws, so it is compared only
without speculation).

The workloads, the runner and the stress settings come from the research kit
(engine/testing/engines.py); `engine.testing.check_proposer_lockstep` is the same invariant
packaged for any proposer (applied to suffix decoding below).

The engines live for the whole module, so the prefix cache carries hits across examples too.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.demo import make_layer_truncated_checkpoint
from engine.testing import check_proposer_lockstep
from engine.testing.engines import PREFIXES, STRESS_ARGS, greedy_mismatches, workloads
from engine.testing.engines import run_workload as run

SUFFIX = {"method": "suffix", "num_speculative_tokens": 3, "suffix_decoding_max_tree_depth": 8}


@pytest.fixture(scope="module")
def engines(llama_path, tmp_path_factory):
    common = {"model": str(llama_path), "dtype": "float64", "block_size": 4, "max_model_len": 64}
    reference = LLMEngine(
        EngineArgs(**common, scheduler="reference", attention_backend="reference")
    )
    production = {**common, **STRESS_ARGS}
    default = LLMEngine(EngineArgs(**production))
    draft = make_layer_truncated_checkpoint(llama_path, tmp_path_factory.mktemp("draft"), 1)
    speculative = [
        LLMEngine(EngineArgs(**production, speculative_config=spec))
        for spec in (
            {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
            {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3},
            SUFFIX,
        )
    ]
    return reference, default, speculative


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_default_engine_equals_reference(engines, workload):
    reference, default, speculative = engines
    requests, aborts = workload
    expected = run(reference, requests, [], "ref")
    got = run(default, requests, aborts, "def")
    for request_id, tokens in got.items():
        assert tokens == expected["ref" + request_id[3:]], request_id
    # nothing leaks: all blocks free once the engine is idle (cached ones included)
    assert default.scheduler.kv_cache_usage == 0.0

    for engine in speculative:
        got = run(engine, requests, aborts, "spe")
        assert greedy_mismatches(requests, expected, got, "ref", "spe") == []
        assert engine.scheduler.kv_cache_usage == 0.0


def test_suffix_proposer_through_the_kit(llama_path, tmp_path):
    """The kit's packaged lockstep check, as a plug-in author would run it."""
    check_proposer_lockstep(str(llama_path), SUFFIX, max_examples=6, repro_dir=tmp_path)


def test_counters(engines):
    """A fixed workload that must preempt (12 requests growing to 36 tokens in 120 slots) and
    share prefixes; the counters see it."""
    _, default, speculative = engines
    requests = [
        (
            PREFIXES[i % 2] + [100 + i] * 6,
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        )
        for i in range(12)
    ]
    for engine in (default, *speculative):
        run(engine, requests, [], "counters")
    stats = default.get_stats()
    assert stats.scheduler.num_running == 0 and stats.scheduler.num_waiting == 0
    assert stats.scheduler.prefix_cache_queries_total > 0
    assert 0 < stats.scheduler.prefix_cache_hits_total <= stats.scheduler.prefix_cache_queries_total
    assert stats.scheduler.num_preemptions_total > 0
    assert stats.prompt_tokens_total > 0 and stats.generation_tokens_total > 0
    for engine in speculative:
        spec = engine.get_stats().spec_decode
        assert spec.num_drafts > 0 and spec.num_accepted_tokens <= spec.num_draft_tokens
    draft_stats = speculative[1].get_stats().spec_decode
    assert 0 < draft_stats.num_accepted_tokens < draft_stats.num_draft_tokens
