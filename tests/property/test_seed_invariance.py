"""A seeded request gives the same output alone and inside any batch, with preemption, chunked
prefill and prefix caching on.

The oracle runs the request alone on the reference scheduler with a roomy cache. The system under
test is the production scheduler with a pool too small for the batch (two long requests in every
batch cannot grow side by side, so something is preempted and recomputed),
a token budget of a few tokens per step (prompts computed in chunks), prefix caching (other
requests share the request's prefix, and the request runs again once its prefix is cached), and
random other requests around it (seeded, unseeded, greedy, with prompt logprobs, n > 1).
Float64, so that batch-dependent rounding (~1e-15) cannot flip a token.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams

MAX_MODEL_LEN = 64
token = st.integers(3, 1000)
seeds = st.integers(0, 2**63 - 1)


@pytest.fixture(scope="module")
def alone_llm(llama_path):
    return LLM(
        str(llama_path),
        dtype="float64",
        scheduler="reference",
        block_size=4,
        kv_cache_memory_bytes=8 * 2**20,
    )


@pytest.fixture(scope="module")
def busy_llm(llama_path):
    return LLM(
        str(llama_path),
        dtype="float64",
        block_size=4,
        max_model_len=MAX_MODEL_LEN,
        num_gpu_blocks_override=22,  # 88 token slots: a few requests at a time
        max_num_batched_tokens=12,
        max_num_seqs=6,
        enable_prefix_caching=True,
        seed=123,
    )


@st.composite
def seeded_params(draw, seed=seeds):
    return SamplingParams(
        n=draw(st.sampled_from([1, 1, 2])),
        temperature=draw(st.sampled_from([0.0, 0.6, 1.0, 1.4])),
        top_k=draw(st.sampled_from([-1, -1, 5, 40])),
        top_p=draw(st.sampled_from([1.0, 1.0, 0.9, 0.6])),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.05])),
        presence_penalty=draw(st.sampled_from([0.0, 0.5])),
        frequency_penalty=draw(st.sampled_from([0.0, -0.3])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.2])),
        seed=draw(seed),
        max_tokens=draw(st.integers(3, 14)),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.sampled_from([None, 2])),
        stop=draw(st.sampled_from([None, ["e"], ["th", " a"]])),
    )


@st.composite
def workloads(draw):
    prompt = draw(st.lists(token, min_size=2, max_size=30))
    params = draw(seeded_params())
    others = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["random", "shared-prefix", "same-prompt"]))
        if kind == "random":
            other_prompt = draw(st.lists(token, min_size=1, max_size=30))
        elif kind == "shared-prefix":
            cut = draw(st.integers(1, len(prompt)))
            other_prompt = prompt[:cut] + draw(st.lists(token, min_size=1, max_size=10))
        else:
            other_prompt = list(prompt)
        other_params = draw(seeded_params(seed=st.none() | seeds))
        if draw(st.booleans()):
            other_params = other_params.replace(prompt_logprobs=1)
        others.append((other_prompt, other_params))
    # Two long requests that cannot both grow in the pool: every batch preempts something.
    pressure = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    for _ in range(2):
        others.append((draw(st.lists(token, min_size=30, max_size=30)), pressure))
    others = draw(st.permutations(others))
    position = draw(st.integers(0, len(others)))
    return prompt, params, others, position


def completions(out):
    return [
        (
            c.token_ids,
            c.text,
            c.finish_reason,
            c.stop_reason,
            None if c.logprobs is None else [sorted(e) for e in c.logprobs],
        )
        for c in out.outputs
    ]


def test_seeded_output_is_the_same_alone_and_in_any_batch(alone_llm, busy_llm):
    before = busy_llm.llm_engine.get_stats().scheduler

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(workloads())
    def check(workload):
        prompt, params, others, position = workload
        expected = completions(alone_llm.generate([prompt], params, use_tqdm=False)[0])
        batch = [p for p, _ in others]
        batch_params = [q for _, q in others]
        batch.insert(position, prompt)
        batch_params.insert(position, params)
        outs = busy_llm.generate(batch, batch_params, use_tqdm=False)
        assert completions(outs[position]) == expected
        # again, now that its prefix is cached
        again = busy_llm.generate([prompt], params, use_tqdm=False)[0]
        assert completions(again) == expected
        assert busy_llm.llm_engine.scheduler.num_running == 0

    check()
    after = busy_llm.llm_engine.get_stats().scheduler
    # The property ran with what it claims: preemptions and prefix-cache hits happened.
    assert after.num_preemptions_total > before.num_preemptions_total
    assert after.prefix_cache_hits_total > before.prefix_cache_hits_total
