"""bench/vs_llamacpp.py's hardware bounds: the arithmetic of each row's bound and the table that
prints it (the llama.cpp runs themselves need a llama.cpp build and are not run here)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def vs():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", BENCH / "vs_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common(vs):
    return sys.modules["common"]


def _cost(common):
    return common.ModelCost(
        linear_params=1_000_000,
        head_params=100_000,
        num_q_heads=4,
        head_dim=16,
        num_layers=2,
        weight_bytes=4_400_000,
    )


def _bounds(common, flops: float, read: float):
    return common.HardwareBounds(
        gemm_flops=flops, copy_bandwidth=1e9, threads=2, read_bandwidth=read
    )


def test_offline_bound_is_read_bandwidth_over_weight_bytes(vs, common):
    bounds = _bounds(common, 1e11, 3e10)
    assert vs.offline_bound_tps(600_000_000, bounds) == pytest.approx(50.0)


def test_serve_bound_is_the_flop_time_when_compute_dominates(vs, common):
    cost = _cost(common)
    level = vs.LevelStats(
        output_tps=0.0, num_requests=32, prompt_tokens=32 * 128, output_tokens=32 * 64
    )
    bounds = _bounds(common, 1e9, 1e15)  # reads cost nothing: FLOPs bound
    per_request = (
        2 * 1_000_000 * (128 + 64 - 1)
        + 4 * 4 * 16 * 2 * common.attended_keys(128, 64)
        + 2 * 100_000 * 64
    )
    expected = 32 * 64 / (32 * per_request / 1e9)
    assert vs.serve_bound_tps(level, 32, cost, cost.weight_bytes, bounds) == pytest.approx(expected)


def test_serve_bound_is_the_weight_reads_when_memory_dominates(vs, common):
    cost = _cost(common)
    level = vs.LevelStats(
        output_tps=0.0, num_requests=8, prompt_tokens=8 * 100, output_tokens=8 * 10
    )
    bounds = _bounds(common, 1e18, 1e9)  # FLOPs cost nothing: reads bound
    # Concurrency 1: 8 requests one after another, 10 forward passes each.
    one = vs.serve_bound_tps(level, 1, cost, cost.weight_bytes, bounds)
    assert one == pytest.approx(80 / (8 * 10 * 4_400_000 / 1e9))
    # Concurrency 4 shares each pass among 4 requests: ceil(8 / 4) = 2 rounds of 10 passes.
    four = vs.serve_bound_tps(level, 4, cost, cost.weight_bytes, bounds)
    assert four == pytest.approx(4 * one)
    # Concurrency 3: ceil(8 / 3) = 3 rounds.
    assert vs.serve_bound_tps(level, 3, cost, cost.weight_bytes, bounds) == pytest.approx(
        8 * one / 3
    )


def _round(vs, llama_offline, engine_offline, llama_c1, engine_c1):
    def level(tps: float):
        return vs.LevelStats(tps, 8, 8 * 100, 8 * 16)

    return vs.RoundResult(
        llama_offline, engine_offline, {1: level(llama_c1)}, {1: level(engine_c1)}
    )


def test_report_prints_bounds_for_f32_serving_and_every_offline_row(vs, common):
    cost = _cost(common)
    bounds = _bounds(common, 1e10, 2e10)
    results = [
        vs.TypeResult("f32", "m", 400_000_000, [_round(vs, 40.0, 38.0, 35.0, 36.0)]),
        vs.TypeResult("q8_0", "m.gguf", 200_000_000, [_round(vs, 100.0, 60.0, 80.0, 50.0)]),
    ]
    args = argparse.Namespace(output_len=16, concurrency=[1])
    text = vs.report(results, args, bounds, cost)
    assert "memory read 20.0 GB/s" in text
    rows = {
        tuple(c.strip() for c in line.split("|")[:2]): [c.strip() for c in line.split("|")[2:]]
        for line in text.splitlines()
        if line.count("|") == 8
    }
    f32_offline = rows[("f32", "offline batch-1 (tg16)")]
    assert f32_offline[:4] == ["40", "38", "0.95x", "0.95-0.95x"]
    assert f32_offline[4:] == ["50", "1.25x", "76%"]  # 20 GB/s / 400 MB = 50 tok/s
    q8_offline = rows[("q8_0", "offline batch-1 (tg16)")]
    assert q8_offline[4:] == ["100", "1.00x", "60%"]
    f32_serve = rows[("f32", "server, concurrency 1")]
    level = results[0].rounds[0].engine_serve[1]
    expected = vs.serve_bound_tps(level, 1, cost, 400_000_000, bounds)
    assert float(f32_serve[4]) == pytest.approx(expected, rel=0.01)
    assert rows[("q8_0", "server, concurrency 1")][4:] == ["-", "-", "-"]
    assert "[f32] engine: m; engine server at concurrency 1 = 95% of its offline" in text
    f32_line, q8_line = (line for line in text.splitlines() if line.startswith("["))
    assert "(ceiling " in f32_line  # the prefill ceiling needs fp32's GEMM rate: f32 only
    assert "ceiling" not in q8_line


def test_rows_pair_the_ratio_within_each_round(vs):
    """The ratio column is the median of per-round ratios, not the ratio of the medians: a
    machine that slows both systems in one round does not move it."""
    rounds = [
        _round(vs, 40.0, 44.0, 30.0, 33.0),  # fast machine: engine 1.10x
        _round(vs, 20.0, 22.0, 15.0, 15.0),  # slow machine: engine 1.10x offline, 1.00x served
        _round(vs, 30.0, 36.0, 20.0, 24.0),  # 1.20x
    ]
    result = vs.TypeResult("f32", "m", 1, rounds)
    offline = result.offline()
    assert (offline.llama, offline.engine) == (30.0, 36.0)  # the medians
    assert offline.ratio == pytest.approx(1.10)
    assert (offline.ratio_min, offline.ratio_max) == (pytest.approx(1.10), pytest.approx(1.20))
    served = result.serve(1)
    assert served.ratio == pytest.approx(1.10)
    assert (served.ratio_min, served.ratio_max) == (pytest.approx(1.0), pytest.approx(1.2))
    # engine c1 / engine offline, per round: 0.75, 0.68, 0.67 -> median 0.68
    assert result.server_fraction(1) == pytest.approx(15.0 / 22.0)


def test_rounds_alternate_which_system_goes_first(vs):
    calls: list[str] = []

    def llama():
        calls.append("llama")
        return 1

    def engine():
        calls.append("engine")
        return 2

    assert vs.in_order(False, llama, engine) == (1, 2)
    assert vs.in_order(True, llama, engine) == (1, 2)
    assert calls == ["llama", "engine", "engine", "llama"]


def test_prefill_ceiling_of_the_server_at_concurrency_1(vs, common):
    cost = _cost(common)
    bounds = _bounds(common, 1e9, 1e10)
    level = vs.LevelStats(
        output_tps=0.0, num_requests=4, prompt_tokens=4 * 100, output_tokens=4 * 10
    )
    prefill_s = (2 * 1_000_000 * 100 + 4 * 4 * 16 * 2 * (100 * 101 // 2) + 2 * 100_000) / 1e9
    # Offline 50 tok/s: each request spends prefill_s, then 9 steps of 20 ms for its 10 tokens.
    expected = (10 / (prefill_s + 9 * 0.02)) / 50.0
    assert vs.prefill_ceiling(level, 50.0, cost, bounds) == pytest.approx(expected)
    assert 0 < expected < 1
    # A free prefill leaves O / (O - 1): the first token comes with the prompt.
    free = _bounds(common, 1e30, 1e10)
    assert vs.prefill_ceiling(level, 50.0, cost, free) == pytest.approx(10 / 9)


def test_every_round_and_level_gets_its_own_prompts(vs):
    """Both servers cache prompts they have seen: a round must not resend an earlier one's."""
    seeds = [vs.level_seed(c, r) for r in range(8) for c in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert len(set(seeds)) == len(seeds)
    assert vs.level_seed(4, 0) != vs.level_seed(4, 1)
