"""bench/structured.py runs (--quick) and reports tok/s with and without a JSON schema per batch
size, from one run (the benchmark itself is run full-size off the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "bench" / "structured.py"
_spec = importlib.util.spec_from_file_location("bench_structured", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_structured"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_quick_run_compares_constrained_and_plain(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    out = tmp_path / "rows.json"
    rows = bench.main(["--quick", "--output-len", "8", "--json", str(out)])
    assert [(r.batch, r.constrained) for r in rows] == [
        (1, False),
        (1, True),
        (4, False),
        (4, True),
    ]
    for row in rows:
        assert row.tokens > 0 and row.tok_per_s > 0
    for plain, constrained in zip(rows[::2], rows[1::2], strict=True):
        assert constrained.mask_ms_per_step > plain.mask_ms_per_step  # the masks were timed
    printed = capsys.readouterr().out
    assert "json schema" in printed and "vs none" in printed
    assert out.is_file() and "mask_ms_per_step" in out.read_text()
