"""Speculative decoding through the engine: greedy output unchanged, limits respected, counters,
reproducible seeds, and clear start-up errors for bad configurations."""

from __future__ import annotations

import json

import pytest

from engine import LLM, EngineArgs, SamplingParams
from engine.demo import make_layer_truncated_checkpoint

REPETITIVE = [[5, 6, 7, 8, 9] * 4 + [5, 6], [20, 21, 22, 20, 21, 22, 20, 21], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def draft_path(llama_path, tmp_path_factory):
    return make_layer_truncated_checkpoint(llama_path, tmp_path_factory.mktemp("draft"), 1)


@pytest.fixture(scope="module")
def baseline(llama_path):
    llm = LLM(str(llama_path), dtype="float64", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate(REPETITIVE, params, use_tqdm=False)]


def spec_llm(llama_path, spec, **kwargs):
    return LLM(str(llama_path), dtype="float64", block_size=4, speculative_config=spec, **kwargs)


@pytest.mark.parametrize("method", ["ngram", "draft_model", "self_draft"])
def test_greedy_output_and_logprobs_unchanged(llama_path, draft_path, baseline, method):
    spec = {
        "ngram": {
            "method": "ngram",
            "num_speculative_tokens": 3,
            "prompt_lookup_min": 1,
            "prompt_lookup_max": 2,
        },
        "draft_model": {
            "method": "draft_model",
            "model": str(draft_path),
            "num_speculative_tokens": 3,
        },
        "self_draft": {
            "method": "draft_model",
            "model": str(llama_path),
            "num_speculative_tokens": 4,
        },
    }[method]
    llm = spec_llm(llama_path, spec)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = [o.outputs[0] for o in llm.generate(REPETITIVE, params, use_tqdm=False)]
    for got, want in zip(outs, baseline, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert a.keys() == b.keys()
            for token_id in a:
                assert a[token_id].logprob == pytest.approx(b[token_id].logprob, abs=1e-9)
    stats = llm.llm_engine.get_stats().spec_decode
    assert stats is not None and stats.num_drafts > 0
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    # acceptance per position can only fall: accepting position i needs all before it
    assert stats.accepted_per_position == sorted(stats.accepted_per_position, reverse=True)
    if method == "self_draft":  # the target drafting for itself is always right
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0


def test_sampling_with_a_draft_is_seed_reproducible(llama_path, draft_path):
    spec = {"method": "draft_model", "model": str(draft_path), "num_speculative_tokens": 3}
    llm = spec_llm(llama_path, spec)
    params = SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=20, ignore_eos=True)
    first = llm.generate(REPETITIVE, params, use_tqdm=False)
    again = llm.generate(REPETITIVE[:1], params, use_tqdm=False)  # alone, not in the batch
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    stats = llm.llm_engine.get_stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_limits_are_never_exceeded(llama_path, max_tokens):
    spec = {"method": "draft_model", "model": str(llama_path), "num_speculative_tokens": 4}
    llm = spec_llm(llama_path, spec, max_model_len=30)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(REPETITIVE, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [max_tokens] * 3
    long = llm.generate([[5] * 25], params.replace(max_tokens=100), use_tqdm=False)[0]
    assert len(long.outputs[0].token_ids) == 5 and long.outputs[0].finish_reason == "length"


def test_stop_token_inside_accepted_drafts_ends_there(llama_path, baseline):
    spec = {"method": "draft_model", "model": str(llama_path), "num_speculative_tokens": 4}
    llm = spec_llm(llama_path, spec)
    want = baseline[0].token_ids
    stop = want[9]
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop])
    out = llm.generate(REPETITIVE[:1], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want[: want.index(stop) + 1]
    assert out.finish_reason == "stop"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },
            "prompt_lookup_min",
        ),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a path"),
        ({"method": "ngram", "num_speculative_tokens": 2, "colour": 1}, "unknown field"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_speculative_config(spec, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(model="x", speculative_config=spec)


def test_speculative_config_from_json_string():
    args = EngineArgs(
        model="x", speculative_config=json.dumps({"method": "ngram", "num_speculative_tokens": 2})
    )
    assert args.speculative_config.num_speculative_tokens == 2
    assert args.speculative_config.prompt_lookup_max == 3


def test_missing_draft_directory(llama_path, tmp_path):
    spec = {"method": "draft_model", "model": str(tmp_path / "nope"), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match=r"speculative_config.model: .*does not exist"):
        spec_llm(llama_path, spec)


def test_draft_with_another_vocabulary(llama_path, checkpoints):
    other = checkpoints("llama-vocab-1100", "LlamaForCausalLM", vocab_size=1100)
    spec = {"method": "draft_model", "model": str(other), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="vocabulary"):
        spec_llm(llama_path, spec)


def test_reference_scheduler_does_not_speculate():
    with pytest.raises(ValueError, match="reference scheduler"):
        EngineArgs(
            model="x",
            scheduler="reference",
            speculative_config={"method": "ngram", "num_speculative_tokens": 2},
        )


def test_bench_spec_decode_runs_quick(tmp_path, monkeypatch, capsys):
    """bench/spec_decode.py end to end in --quick mode: every row's output equals the baseline."""
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    path = Path(__file__).resolve().parents[1] / "bench" / "spec_decode.py"
    spec = importlib.util.spec_from_file_location("bench_spec_decode", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_spec_decode", module)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--batch-sizes", "2"]) == 0
    out = capsys.readouterr().out
    assert "ngram k=4" in out and "draft 1/2 layers" in out and "speed-up" in out
    assert "suffix k=4" in out


def test_bench_spec_decode_code_workload_quick(tmp_path, monkeypatch, capsys):
    """The code workload (chat prompts asking to rewrite code), on the demo model: none, ngram
    and suffix rows, every output equal to the baseline's."""
    import importlib.util
    import sys
    from pathlib import Path

    from engine.demo import demo_model_path

    path = Path(__file__).resolve().parents[1] / "bench" / "spec_decode.py"
    spec = importlib.util.spec_from_file_location("bench_spec_decode_code", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_spec_decode_code", module)
    spec.loader.exec_module(module)
    argv = ["--quick", "--workload", "code", "--batch-sizes", "2"]
    assert module.main([*argv, "--code-model", str(demo_model_path())]) == 0
    out = capsys.readouterr().out
    assert out.count("smollm2 code") == 3 and "suffix k=4" in out and "ngram k=4" in out


def test_stop_string_inside_accepted_drafts(llama_path, tokenizer):
    """A stop string completed by an accepted draft ends the output at that token, exactly as
    without speculation (drafts after it are dropped with their logprobs)."""
    plain = LLM(str(llama_path), dtype="float64", block_size=4)
    free = plain.generate(
        REPETITIVE[:1],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip(), "the test needs visible text to stop on"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=1)
    want = plain.generate(REPETITIVE[:1], params, use_tqdm=False)[0].outputs[0]
    spec = {"method": "draft_model", "model": str(llama_path), "num_speculative_tokens": 4}
    got = spec_llm(llama_path, spec).generate(REPETITIVE[:1], params, use_tqdm=False)[0].outputs[0]
    assert want.finish_reason == "stop" and want.stop_reason == stop
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
        want.text,
        want.token_ids,
        want.finish_reason,
        want.stop_reason,
    )
    assert len(got.logprobs) == len(got.token_ids)
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-9)


SYSTEM_PROMPT = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]


def _acceptance(llm) -> tuple[int, int]:
    stats = llm.llm_engine.get_stats().spec_decode
    return stats.num_accepted_tokens, stats.num_draft_tokens


@pytest.mark.parametrize("draft", ["self", "truncated"])
def test_draft_cache_is_not_stale_after_requests_that_finish_early(llama_path, draft_path, draft):
    """Short requests that finish in the step that computes a shared system prompt leave its
    blocks in the prefix cache; the draft must have written its K/V for them too, so later
    requests sharing the prompt draft exactly as well as on a fresh engine."""
    model = {"self": str(llama_path), "truncated": str(draft_path)}[draft]
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 3}
    long_prompts = [[*SYSTEM_PROMPT, 60 + i, 61 + i] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    fresh = spec_llm(llama_path, spec, enable_prefix_caching=True)
    want = fresh.generate(long_prompts, params, use_tqdm=False)
    want_acceptance = _acceptance(fresh)

    warmed = spec_llm(llama_path, spec, enable_prefix_caching=True)
    short = [[*SYSTEM_PROMPT, 70 + i] for i in range(3)]
    for max_tokens in (1, 2):
        warmed.generate(short, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    before = _acceptance(warmed)
    hits_before = warmed.llm_engine.get_stats().scheduler.prefix_cache_hits_total
    got = warmed.generate(long_prompts, params, use_tqdm=False)
    after = _acceptance(warmed)
    assert warmed.llm_engine.get_stats().scheduler.prefix_cache_hits_total > hits_before
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert (after[0] - before[0], after[1] - before[1]) == want_acceptance
    if draft == "self":
        assert want_acceptance[0] == want_acceptance[1] > 0
