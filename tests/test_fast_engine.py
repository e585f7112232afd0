"""The fast engine equals the reference engine token for token, in float64, on random workloads.

Reference engine: reference attention + reference scheduler. Fast engine: the vectorised torch
backend + the default (production) scheduler, with a small token budget so prompts are chunked
and decodes share steps with prompt chunks. Workloads mix greedy and seeded sampling, prompt
lengths across block boundaries, and architectures with GQA, a sliding window and Qwen3's q/k
norms. Sampled tokens must be identical and their logprobs equal to float64 precision.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams

VARIANTS = ["llama", "mistral-sliding", "qwen3"]


@pytest.fixture(scope="module")
def engine_pairs(checkpoints):
    pairs = {}
    for variant in VARIANTS:
        path = str(checkpoints.variant(variant))
        common = dict(dtype="float64", block_size=4, max_model_len=96, seed=0)
        reference = LLM(path, scheduler="reference", attention_backend="reference", **common)
        fast = LLM(
            path, attention_backend="torch", max_num_batched_tokens=24, max_num_seqs=8, **common
        )
        pairs[variant] = (reference, fast)
    return pairs


@st.composite
def workloads(draw, vocab: int = 1024):
    prompts, params = [], []
    for _ in range(draw(st.integers(1, 6))):
        prompts.append(draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=40)))
        greedy = draw(st.booleans())
        params.append(
            SamplingParams(
                temperature=0.0 if greedy else 0.8,
                seed=None if greedy else draw(st.integers(0, 2**20)),
                max_tokens=draw(st.integers(1, 14)),
                ignore_eos=True,
                logprobs=1,
            )
        )
    return prompts, params


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variant=st.sampled_from(VARIANTS), workload=workloads())
def test_fast_engine_equals_reference_engine_float64(engine_pairs, variant, workload):
    reference, fast = engine_pairs[variant]
    prompts, params = workload
    expected = reference.generate(prompts, params, use_tqdm=False)
    got = fast.generate(prompts, params, use_tqdm=False)
    for exp, out, p in zip(expected, got, params, strict=True):
        exp_c, out_c = exp.outputs[0], out.outputs[0]
        assert out_c.token_ids == exp_c.token_ids
        assert len(out_c.token_ids) == p.max_tokens  # ignore_eos, and max_model_len leaves room
        for exp_lp, out_lp in zip(exp_c.logprobs, out_c.logprobs, strict=True):
            for token_id, logprob in exp_lp.items():
                assert math.isclose(out_lp[token_id].logprob, logprob.logprob, abs_tol=1e-9)


def test_fast_engine_serves_mixed_steps(engine_pairs, monkeypatch):
    """A long prompt chunked by the token budget shares steps with decodes: the torch backend
    sees batches mixing both kinds, and the tokens still agree."""
    reference, fast = engine_pairs["mistral-sliding"]
    backend = fast.llm_engine.attention_backend
    query_lens: list[tuple[int, ...]] = []

    def spy(q, k_cache, v_cache, meta, scale, sliding_window=None):
        qsl = meta.query_start_loc_cpu
        query_lens.append(tuple(b - a for a, b in itertools.pairwise(qsl)))
        return type(backend).forward(backend, q, k_cache, v_cache, meta, scale, sliding_window)

    monkeypatch.setattr(backend, "forward", spy)
    prompts = [[5 + i for i in range(3)], [100 + i for i in range(70)], [7, 8]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert any(1 in lens and max(lens) > 1 for lens in query_lens)  # a mixed step happened
    assert len({t for seq in got for t in seq}) > 3


@pytest.mark.parametrize("script", ["throughput", "latency", "kernels"])
def test_bench_scripts_run_quick(script, tmp_path, monkeypatch, capsys):
    """Each benchmark runs end to end in its --quick mode and prints its table."""
    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location(f"bench_{script}", bench_dir / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"bench_{script}", module)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "measured bounds" in out or "memory copy bandwidth" in out
    header = {
        "throughput": "engine speedup",
        "latency": "of read bandwidth",
        "kernels": "speedup",
    }[script]
    assert header in out
    if script != "kernels":
        assert "HF" in out  # the baseline ran beside the engine
    if script == "latency":  # the bound and the kernel the split GEMV replaced, same run
        assert "memory read" in out and "oneDNN only" in out
