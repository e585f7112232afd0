"""`python -m engine.diff`: agreement passes the gate, a broken fast path fails it."""

from __future__ import annotations

import json
import math

import pytest

from engine import diff
from engine.diff import Trace, compare
from engine.fast.torch_native import TorchNativeAttention


def test_compare_identical_traces():
    trace = Trace([5, 6], [{5: -0.1, 9: -2.0}, {6: -0.3}])
    other = Trace([5, 6], [{5: -0.1 + 1e-12, 9: -2.0}, {6: -0.3}])
    result = compare(trace, other)
    assert result.first_divergence is None and result.gap == 0.0
    assert result.max_logprob_diff == pytest.approx(1e-12, abs=1e-15)
    assert result.agrees(1e-9) and not result.agrees(1e-13)


def test_compare_near_tie_and_real_divergence():
    reference = Trace([5, 6, 7], [{5: -0.1}, {6: -0.70, 8: -0.71}, {7: -0.2}])
    near_tie = Trace([5, 8, 1], [{5: -0.1}, {8: -0.700, 6: -0.705}, {1: -0.3}])
    result = compare(reference, near_tie)
    assert result.first_divergence == 1
    assert result.gap == pytest.approx(0.01)  # the larger of the two sides' gaps
    assert result.agrees(0.02) and not result.agrees(1e-3)
    unrelated = Trace([5, 3, 3], [{5: -0.1}, {3: -0.1}, {3: -0.1}])  # 6 not in its top-k
    assert compare(reference, unrelated).gap == math.inf


def test_compare_length_mismatch_is_a_divergence():
    result = compare(Trace([1, 2], [{1: 0.0}, {2: 0.0}]), Trace([1], [{1: 0.0}]))
    assert result.first_divergence == 1 and result.gap == math.inf


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt_token_ids": [5, 17, 300, 41, 9, 77, 12]}),
        json.dumps({"prompt": "Once upon a time"}),
        "plain text line",
        json.dumps({"prompt_token_ids": list(range(10, 45))}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_diff_agrees_in_float64_with_hf(llama_path, prompts_file, capsys):
    argv = ["--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float64"]
    code = diff.main([*argv, "--max-tokens", "10", "--hf", "--block-size", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4/4 requests agree" in out and "hf vs reference" in out
    assert out.count(" ok") == 4


def test_diff_fails_on_a_broken_fast_path(llama_path, prompts_file, capsys, monkeypatch):
    real_forward = TorchNativeAttention.forward

    def broken(self, q, k_cache, v_cache, meta, scale, sliding_window=None):
        return real_forward(self, q, k_cache, v_cache, meta, scale * 1.5, sliding_window)

    monkeypatch.setattr(TorchNativeAttention, "forward", broken)
    argv = ["--model", str(llama_path), "--prompts", str(prompts_file), "--dtype", "float64"]
    code = diff.main([*argv, "--max-tokens", "10", "--attention-backend", "torch"])
    out = capsys.readouterr().out
    assert code == 1
    assert "DISAGREE" in out and "0/4 requests agree" in out


def test_diff_reports_bad_prompt_files(llama_path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert diff.main(["--model", str(llama_path), "--prompts", str(bad)]) == 2
    assert "needs 'prompt' or 'prompt_token_ids'" in capsys.readouterr().err
