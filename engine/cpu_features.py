"""What the CPU offers for reduced-precision matmuls, for the start-up log.

bfloat16 on a CPU is fast only with native instructions: AVX512-BF16 (dot products of bf16
pairs into float32) or AMX-BF16 (tile matmuls). Without them oneDNN emulates bf16 (convert to
float32, multiply, round back), which reads half the bytes but does more work per weight than
float32; on the machines this project measured, plain bf16 matmul ran about 5x slower than
float32. `bf16_support()` says which case applies; `log_dtype_support` logs it when a model is
loaded in bfloat16 on a CPU (a warning when it falls back to emulation).

Detection reads the kernel's CPU flags (/proc/cpuinfo, Linux); elsewhere it is "unknown" and
nothing is claimed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # best first


@dataclass(frozen=True, slots=True)
class Bf16Support:
    native: bool | None  # None: flags unreadable (not Linux)
    instructions: str  # e.g. "avx512_bf16", "emulated", "unknown"
    onednn_bf16: bool  # oneDNN has bf16 kernels here (native or emulated)

    def describe(self) -> str:
        if self.native is None:
            return "bfloat16 on CPU: instruction support unknown (no /proc/cpuinfo)"
        if self.native:
            return f"bfloat16 on CPU: native ({self.instructions})"
        return (
            "bfloat16 on CPU: no AVX512-BF16 or AMX-BF16; bf16 matmuls are emulated and "
            "usually slower than float32 (use --dtype float32)"
        )


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU feature flags of the first processor, or None when unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return None


def bf16_support(flags: set[str] | None = None) -> Bf16Support:
    """Native bf16 instructions on this CPU (`flags` defaults to /proc/cpuinfo's)."""
    if flags is None:
        flags = cpu_flags()
    onednn = bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    if flags is None:
        return Bf16Support(None, "unknown", onednn)
    for flag in NATIVE_BF16_FLAGS:
        if flag in flags:
            return Bf16Support(True, flag, onednn)
    return Bf16Support(False, "emulated", onednn)


def log_dtype_support(dtype: torch.dtype, device: torch.device) -> Bf16Support | None:
    """At load: for bfloat16 on a CPU, logs whether bf16 is native (info) or emulated
    (warning); returns what it found (None for other dtypes and devices)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    support = bf16_support()
    if support.native is False:
        logger.warning(support.describe())
    else:
        logger.info(support.describe())
    return support
