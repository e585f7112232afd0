"""The production scheduler changes no token: random workloads through the default engine
(chunked prefill with a small token budget, prefix caching, a pool small enough to force
preemption, aborts, n > 1) give every request exactly the reference engine's tokens, greedy and
seeded sampling, in float64. With speculative decoding (n-gram and draft-model proposers) on top
of all that, every greedy request still gets exactly the reference tokens (seeded sampling keeps
the target's distribution but not the same draws, so it is compared only without speculation).

The engines live for the whole module, so the prefix cache carries hits across examples too.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.demo import make_layer_truncated_checkpoint

PREFIXES = [
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [11, 12, 13, 14, 30, 31],
    [40 + i for i in range(23)],
]


@pytest.fixture(scope="module")
def engines(llama_path, tmp_path_factory):
    common = {"model": str(llama_path), "dtype": "float64", "block_size": 4, "max_model_len": 64}
    reference = LLMEngine(
        EngineArgs(**common, scheduler="reference", attention_backend="reference")
    )
    production = {
        **common,
        "scheduler": "default",
        "max_num_batched_tokens": 12,  # long prompts are chunked
        "max_num_seqs": 5,
        "num_gpu_blocks_override": 30,  # 120 slots: preemption under load
    }
    default = LLMEngine(EngineArgs(**production))
    draft = make_layer_truncated_checkpoint(llama_path, tmp_path_factory.mktemp("draft"), 1)
    speculative = [
        LLMEngine(EngineArgs(**production, speculative_config=spec))
        for spec in (
            {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
            {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3},
        )
    ]
    return reference, default, speculative


@st.composite
def workloads(draw):
    requests = []
    for _ in range(draw(st.integers(1, 7))):
        prefix = draw(st.sampled_from([[], *PREFIXES]))
        suffix = draw(st.lists(st.integers(3, 900), min_size=0 if prefix else 1, max_size=12))
        greedy = draw(st.booleans())
        params = SamplingParams(
            n=draw(st.sampled_from([1, 1, 2])),
            temperature=0.0 if greedy else draw(st.sampled_from([0.7, 1.0])),
            top_p=draw(st.sampled_from([1.0, 0.9])),
            seed=None if greedy else draw(st.integers(0, 1000)),
            max_tokens=draw(st.integers(1, 20)),
            ignore_eos=draw(st.booleans()),
        )
        requests.append((prefix + suffix, params))
    aborts = draw(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8)), max_size=2))
    return requests, aborts


def run(engine, requests, aborts, tag):
    """Runs the workload; aborts[i] = (request index, step) aborts that request at that step."""
    ids = [f"{tag}-{i}" for i in range(len(requests))]
    engine.abort_request(ids)  # leftovers of an earlier failed example must not mask this one
    for request_id, (prompt, params) in zip(ids, requests, strict=True):
        engine.add_request(request_id, prompt, params)
    aborted = set()
    final = {}
    step = 0
    while engine.has_unfinished_requests():
        for index, at in aborts:
            if at == step and index < len(ids) and ids[index] not in final:
                engine.abort_request(ids[index])
                aborted.add(ids[index])
        for out in engine.step():
            if out.finished:
                final[out.request_id] = [c.token_ids for c in out.outputs]
        step += 1
        assert step < 2000
    return {i: final[i] for i in ids if i not in aborted}


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

    greedy = [i for i, (_, params) in enumerate(requests) if params.greedy]
    for engine in speculative:
        got = run(engine, requests, aborts, "spe")
        for index in greedy:
            request_id = f"spe-{index}"
            if request_id in got:
                assert got[request_id] == expected[f"ref-{index}"], request_id
        assert engine.scheduler.kv_cache_usage == 0.0


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
