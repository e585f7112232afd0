"""bench/step_profile.py and bench/step_ab.py in --quick mode (tiny model, seconds): they run and
print what their docstrings promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return out.stdout


def test_step_profile_counts_ops_per_module():
    text = _run("step_profile.py", "--top", "3")
    total = int(re.search(r"op calls per decode step: (\d+)", text).group(1))
    rows = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)\s+[\d.]+", text, re.M)
    }
    for module in ("input_layernorm", "self_attn.rope", "self_attn.backend", "mlp.gate_up_proj"):
        assert rows[module] > 0, module
    assert sum(n for k, n in rows.items() if not k.startswith(("aten::", "mkldnn::"))) <= total


def test_step_ab_prints_each_variant_with_its_ratio():
    text = _run("step_ab.py", "--variants", "float32:1,float32:2,float32:2:packed")
    lines = [line for line in text.splitlines() if line.startswith("float32:")]
    assert [line.split()[0] for line in lines] == ["float32:1", "float32:2", "float32:2:packed"]
    assert lines[0].split()[-1] == "1.00x"
