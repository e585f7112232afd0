"""bench/tp.py --quick (tiny model, about 20 s): TP=1 and TP=2 both run, the table gives
TP=2's ratios to TP=1 from the same run, and the all-reduce line its measured cost."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tp_bench_quick_prints_both_configs_with_ratios():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tp.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": path},
    ).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if cells[0] in ("TP=1", "TP=2"):
            rows[cells[0]] = cells[1:]
    assert set(rows) == {"TP=1", "TP=2"}, out
    assert rows["TP=1"][0] == "1 x 2" and rows["TP=2"][0] == "2 x 1"
    base_tps, tp_tps = float(rows["TP=1"][1]), float(rows["TP=2"][1])
    base_ms, tp_ms = float(rows["TP=1"][3]), float(rows["TP=2"][3])
    assert min(base_tps, tp_tps, base_ms, tp_ms) > 0
    assert rows["TP=1"][2] == rows["TP=1"][4] == "1.00x"
    # The ratios are the printed figures' (those are rounded to 3 significant digits, the
    # ratios to 2 decimals: allow both roundings, e.g. 243 / 1665 = 0.146 printed as 0.15x).
    checks = ((rows["TP=2"][2], tp_tps / base_tps), (rows["TP=2"][4], tp_ms / base_ms))
    for printed, ratio in checks:
        assert abs(float(printed.rstrip("x")) - ratio) <= 0.005 + 0.01 * ratio, (printed, ratio)
    # The TP=2 engine's own all-reduce, timed with its worker, and the step's count of them.
    line = r"all-reduce of one decode row \[1, 64\] float32: (\d+) us; a decode step has 5"
    m = re.search(line, out)
    assert m is not None and int(m.group(1)) > 0, out
