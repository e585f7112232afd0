"""bench/serve.py: its statistics, its arrival process, and a short run against a real server."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from engine import EngineArgs, LLMEngine
from engine.server import OpenAIServer, ServerConfig, ServerThread

_PATH = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
_spec = importlib.util.spec_from_file_location("bench_serve", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_percentile_interpolates_between_ranks():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 0) == 1.0 and bench.percentile(values, 100) == 5.0
    assert bench.percentile(values, 90) == pytest.approx(4.6)
    assert bench.percentile([7.0], 99) == 7.0
    assert math.isnan(bench.percentile([], 50))
    data = [float(x) for x in range(1, 101)]
    quantiles = statistics.quantiles(data, n=100, method="inclusive")
    assert bench.percentile(data, 90) == pytest.approx(quantiles[89])


def test_poisson_arrivals_are_seeded_with_the_right_mean():
    a = bench.arrival_delays(4000, rate=20.0, seed=1)
    assert a == bench.arrival_delays(4000, rate=20.0, seed=1)
    assert a != bench.arrival_delays(4000, rate=20.0, seed=2)
    assert statistics.fmean(a) == pytest.approx(1 / 20.0, rel=0.06)
    assert bench.arrival_delays(3, rate=math.inf, seed=0) == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def server(llama_path):
    engine = LLMEngine(
        EngineArgs(model=str(llama_path), kv_cache_memory_bytes=8 * 2**20, max_model_len=256)
    )
    config = ServerConfig(served_model_names=("tiny",), log_stats_interval=None, access_log=False)
    with ServerThread(OpenAIServer(engine, config)) as thread:
        yield thread


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_run_against_the_server(server, capsys, tmp_path, endpoint):
    out = tmp_path / "results.json"
    levels = bench.main(
        [
            "--base-url", server.url + "/v1", "--endpoint", endpoint, "--num-prompts", "6",
            "--concurrency", "1", "3", "--input-len", "8", "--output-len", "5",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert [level.concurrency for level in levels] == [1, 3]
    for level in levels:
        assert (level.num_ok, level.num_failed) == (6, 0)
        assert level.output_tokens == 6 * 5  # ignore_eos: exactly --output-len each
        assert level.prompt_tokens >= 6 * 8
        for stats in (level.ttft_ms, level.tpot_ms, level.itl_ms, level.e2e_ms):
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
        assert level.ttft_ms["p50"] <= level.e2e_ms["p50"]
        assert level.output_throughput > 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 5  # title, header, separator, one row per level
    assert table[1].startswith("| concurrency |") and set(table[2]) == {"|", "-"}
    assert table[3].startswith("| 1 | inf | 6 / 0 |") and table[3].endswith("| 1.00x |")
    assert table[4].startswith("| 3 | inf | 6 / 0 |")
    assert out.read_text().count('"num_ok": 6') == 2


def test_failed_requests_are_counted_not_fatal(server, capsys):
    levels = bench.main(
        [
            "--base-url", server.url, "--model", "no-such-model", "--num-prompts", "3",
            "--concurrency", "2", "--no-warmup",
        ]
    )  # fmt: skip
    assert (levels[0].num_ok, levels[0].num_failed) == (0, 3)
    assert "HTTP 404" in levels[0].errors[0]
    assert "HTTP 404" in capsys.readouterr().err


def test_poisson_level_runs(server):
    levels = bench.main(
        [
            "--base-url", server.url, "--num-prompts", "4", "--request-rate", "50",
            "--output-len", "3", "--input-len", "4", "--no-warmup",
        ]
    )  # fmt: skip
    assert levels[0].concurrency is None and levels[0].request_rate == 50
    assert (levels[0].num_ok, levels[0].num_failed) == (4, 0)


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


def test_fault_soak_quick(capsys, tmp_path):
    """bench/fault_soak.py --quick: random step faults, disconnects and aborts; every completed
    request equals the clean run, nothing is left running, no block in use."""
    out = tmp_path / "soak.json"
    assert _load("fault_soak").main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    tally = result["tally"]
    assert tally["faults"] > 0 and tally["failed_by_fault"] > 0  # faults did happen
    assert tally["ok"] > 0 and tally["mismatched"] == 0
    assert all(result["checks"].values())
    assert "PASS: every completed request equals the clean run" in capsys.readouterr().out


def test_abuse_quick(capsys, tmp_path):
    """bench/abuse.py --quick: every abusive request gets its 4xx while /health and normal
    requests keep being answered (the ratios are checked at full size, on a quiet machine)."""
    out = tmp_path / "abuse.json"
    assert _load("abuse").main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(result["checks"].values()) and not result["unexpected"]
    printed = capsys.readouterr().out
    assert "| n = 2^63 |" in printed and "| template loop 10^10 |" in printed
