"""bf16 support detection and the start-up log line (native vs emulated)."""

from __future__ import annotations

import logging

import torch

from engine import cpu_features
from engine.cpu_features import bf16_support, cpu_flags, log_dtype_support

CPU = torch.device("cpu")


def test_flags_decide_native_or_emulated():
    assert bf16_support({"avx512f", "avx512_bf16"}).instructions == "avx512_bf16"
    assert bf16_support({"amx_bf16", "avx512_bf16"}).native is True
    emulated = bf16_support({"avx2", "avx512f"})
    assert emulated.native is False and "emulated" in emulated.describe()


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") is None


def test_emulated_bf16_warns_at_load(monkeypatch, caplog):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx2"})
    with caplog.at_level(logging.INFO, logger="engine.cpu_features"):
        support = log_dtype_support(torch.bfloat16, CPU)
    assert support is not None and support.native is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_native_bf16_is_an_info_line_and_other_dtypes_log_nothing(monkeypatch, caplog):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx512_bf16"})
    with caplog.at_level(logging.INFO, logger="engine.cpu_features"):
        assert log_dtype_support(torch.float32, CPU) is None
        assert log_dtype_support(torch.bfloat16, CPU).native is True
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "native (avx512_bf16)" in caplog.records[0].getMessage()
