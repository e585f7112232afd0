"""bench/perplexity.py and bench/quant_speed.py run end to end in --quick mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["perplexity", "quant_speed"])
def test_quant_bench_runs_quick(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--quick"])
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    out = capsys.readouterr().out
    for row in ("fp32", "int8", "int4") if script == "perplexity" else ("none", "int8", "int4"):
        assert any(line.startswith(row) for line in out.splitlines()), out
