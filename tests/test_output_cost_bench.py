"""bench/output_cost.py runs (--quick) and reports, per output kind, the host time per step early
and late in the outputs and their ratio, and the engine's Python-level calls per step early and
late, which for DELTA must not grow (the benchmark itself is run full-size off the suite)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "bench" / "output_cost.py"
_spec = importlib.util.spec_from_file_location("bench_output_cost", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_output_cost"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_quick_run_prints_the_ratio_per_output_kind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    out = tmp_path / "rows.json"
    rows = bench.main(
        ["--quick", "--output-len", "96", "--early", "24", "--window", "8", "--json", str(out)]
    )
    assert [r.output_kind for r in rows] == ["DELTA", "CUMULATIVE"]
    for row in rows:
        assert row.early_len == 24 and row.late_len == 92
        assert row.host_us_early > 0 and row.host_us_late > 0
        assert math.isclose(row.ratio, row.host_us_late / row.host_us_early)
        assert row.forward_ms_early > 0
        assert row.calls_early > 0 and row.calls_late > 0
    delta = rows[0]  # DELTA: the Python-level work per step does not grow with the length
    assert delta.calls_late <= 1.05 * delta.calls_early, (delta.calls_early, delta.calls_late)
    printed = capsys.readouterr().out
    assert "late / early" in printed and "calls/step late" in printed
    assert "DELTA" in printed and "CUMULATIVE" in printed
    assert out.is_file() and "host_us_late" in out.read_text()
