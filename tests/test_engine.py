"""Engine behaviour through the offline API and LLMEngine: batching, preemption, seeds, stops."""

from __future__ import annotations

import random

import pytest

from engine import LLM, EngineArgs, LLMEngine, SamplingParams


def random_prompts(count: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


@pytest.fixture(scope="module")
def llm64(llama_path):
    return LLM(str(llama_path), dtype="float64", block_size=4, kv_cache_memory_bytes=16 * 2**20)


def test_outputs_in_input_order_with_prompt_fields(llm64, tokenizer):
    prompts = ["The quick brown fox", [5, 6, 7], {"prompt_token_ids": [8, 9]}, {"prompt": "Hi"}]
    outs = llm64.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    assert outs[0].prompt == "The quick brown fox"
    assert outs[0].prompt_token_ids == tokenizer.encode("The quick brown fox")
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [5, 6, 7]
    assert outs[2].prompt_token_ids == [8, 9]
    assert outs[3].prompt == "Hi"
    for out in outs:
        completion = out.outputs[0]
        assert out.finished
        assert completion.finish_reason in ("stop", "length")
        # the text is the detokenized token ids
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_single_prompt_forms(llm64):
    params = SamplingParams(temperature=0, max_tokens=4)
    by_ids = llm64.generate([5, 6, 7], params, use_tqdm=False)
    assert len(by_ids) == 1 and by_ids[0].prompt_token_ids == [5, 6, 7]


def test_preemption_gives_the_same_tokens(llama_path):
    """A pool small enough to force preemption by recompute changes no token (greedy and seeded)."""
    prompts = random_prompts(12, seed=3, lo=5, hi=30)
    params = [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=30, ignore_eos=True)
        for i in range(len(prompts))
    ]
    roomy = LLM(str(llama_path), dtype="float64", block_size=4, kv_cache_memory_bytes=16 * 2**20)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]

    tight = LLM(
        str(llama_path),
        dtype="float64",
        block_size=4,
        max_model_len=64,
        num_gpu_blocks_override=24,
    )
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.scheduler.kv_cache_usage == 0.0


def test_seeded_sampling_is_batch_invariant(llm64):
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm64.generate([[11, 12, 13]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts(6, seed=9)
    batch = [*others[:3], [11, 12, 13], *others[3:]]
    other_params = SamplingParams(temperature=1.0, max_tokens=7)
    mixed = llm64.generate(
        batch, [other_params] * 3 + [params] + [other_params] * 3, use_tqdm=False
    )
    assert mixed[3].outputs[0].token_ids == alone
    # A different seed gives a different sequence.
    other = llm64.generate([[11, 12, 13]], params.replace(seed=4321), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_unseeded_sampling_reproducible_per_engine_seed(llama_path):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(str(llama_path), seed=7, kv_cache_memory_bytes=4 * 2**20)
        runs.append(
            [o.outputs[0].token_ids for o in llm.generate(["a", "b"], params, use_tqdm=False)]
        )
    assert runs[0] == runs[1]
    llm = LLM(str(llama_path), seed=8, kv_cache_memory_bytes=4 * 2**20)
    assert [
        o.outputs[0].token_ids for o in llm.generate(["a", "b"], params, use_tqdm=False)
    ] != runs[0]


def test_top_k_1_and_tiny_top_p_are_greedy(llm64):
    prompts = random_prompts(3, seed=5)
    greedy = llm64.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for params in (
        SamplingParams(temperature=1.5, top_k=1, max_tokens=10, seed=1),
        SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=10, seed=2),
    ):
        outs = llm64.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in greedy]


def test_n_samples_are_distinct_and_reproducible(llm64):
    params = SamplingParams(n=4, temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    first = llm64.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in first.outputs]
    assert len(set(samples)) == 4
    again = llm64.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [tuple(c.token_ids) for c in again.outputs] == samples
    # sample 0 of a seeded n=4 request is the n=1 request with the same seed
    single = llm64.generate("Once upon a time", params.replace(n=1), use_tqdm=False)[0]
    assert tuple(single.outputs[0].token_ids) == samples[0]


def test_stop_conditions(llm64, tokenizer):
    prompt = [20, 21, 22]
    free = llm64.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12

    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    stopped = llm64.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id


def test_eos_from_generation_config_stops_unless_ignored(llama_path, tmp_path):
    """eos ids come from generation_config.json: point it at a token greedy decoding emits."""
    import json
    import shutil

    prompt = [30, 31, 32]
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    llm = LLM(str(llama_path), dtype="float64")
    free = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    eos = free[6]

    path = tmp_path / "eos"
    shutil.copytree(llama_path, path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [eos]
    (path / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(path), dtype="float64")
    assert eos in llm.llm_engine.model_config.eos_token_ids

    stopped = llm.generate([prompt], params.replace(ignore_eos=False), use_tqdm=False)[0]
    assert stopped.outputs[0].token_ids == free[: free.index(eos) + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    ignored = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_max_model_len_finishes_with_length(llama_path):
    llm = LLM(str(llama_path), max_model_len=20, kv_cache_memory_bytes=4 * 2**20)
    out = llm.generate([[5] * 15], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    assert out[0].outputs[0].finish_reason == "length"


def test_engine_step_api_and_abort(llama_path):
    engine = LLMEngine(EngineArgs(model=str(llama_path), block_size=4))
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", [5, 6, 7, 8, 9], params)
    engine.add_request("b", [10, 11], params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1], params)
    seen = {}
    for _ in range(3):
        for out in engine.step():
            seen[out.request_id] = out
    assert set(seen) == {"a", "b"} and not seen["a"].finished
    assert engine.scheduler.kv_cache_usage > 0
    engine.abort_request("a")
    assert engine.get_num_unfinished_requests() == 1
    engine.abort_request(["b", "unknown"])
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_usage == 0.0
    assert engine.step() == []


def test_chat_applies_template(llm64, tokenizer):
    messages = [{"role": "user", "content": "Hello there"}]
    out = llm64.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(out.prompt_token_ids) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_max_num_seqs_caps_the_batch(llama_path):
    engine = LLMEngine(EngineArgs(model=str(llama_path), max_num_seqs=2))
    sizes = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        output = schedule()
        sizes.append(len(output.scheduled))
        return output

    engine.scheduler.schedule = recording_schedule
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    for i in range(5):
        engine.add_request(str(i), [5 + i, 6], params)
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"0", "1", "2", "3", "4"}
    assert max(sizes) == 2
