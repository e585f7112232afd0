"""oneDNN packed linears run at a bounded set of row counts (issue 12: memory grew with every
distinct batch size), with the same results as an exact-size call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models.cpu_gemm import (
    _MAX_BUCKET,
    can_pack_for_cpu,
    onednn_linear,
    onednn_row_bucket,
    onednn_row_buckets,
    pack_weight,
)

pytestmark = pytest.mark.skipif(
    not can_pack_for_cpu(torch.float32, torch.device("cpu")), reason="needs oneDNN"
)
BENCH = Path(__file__).resolve().parents[1] / "bench" / "onednn_rows.py"


def test_buckets_are_few_and_cover_every_row_count():
    buckets = onednn_row_buckets()
    assert len(buckets) <= 40 and buckets[-1] == _MAX_BUCKET
    for rows in range(1, _MAX_BUCKET + 1):
        bucket = onednn_row_bucket(rows)
        assert bucket in buckets and rows <= bucket <= max(rows + rows // 3, 8)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 1100), bias=st.booleans())
def test_bucketed_linear_equals_the_plain_product(rows, bias):
    torch.manual_seed(rows)
    w = torch.randn(24, 16)
    b = torch.randn(24) if bias else None
    x = torch.randn(rows, 16)
    out = onednn_linear(x, pack_weight(w), b)
    assert out.shape == (rows, 24)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def _rss_growth(mode: str) -> float:
    # A fresh process per mode: oneDNN's per-shape state would otherwise carry over.
    out = subprocess.run(
        [sys.executable, str(BENCH), "--child", mode, "--max-rows", "150", "--size", "64"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_mb"]


def test_rss_stays_flat_over_many_distinct_row_counts():
    """150 distinct row counts after a warm-up over the buckets: exact-size calls grow RSS by
    about 0.5 MB per row count (the old behaviour, measured here as the control), bucketed
    calls by (almost) nothing."""
    exact = _rss_growth("exact")
    bucketed = _rss_growth("buckets")
    assert exact > 30.0, f"control: exact-size calls grew only {exact:.1f} MB"
    assert bucketed < 8.0, f"bucketed calls grew RSS by {bucketed:.1f} MB"
