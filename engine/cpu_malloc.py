"""Keeps glibc's malloc from returning big tensors' memory to the kernel after every op.

On CPU, torch allocates each op's output with malloc. glibc serves blocks above its mmap
threshold (128 KiB at start, raised dynamically up to 32 MiB) with a fresh mmap and unmaps them on
free, so every large activation (a [2048, 576] float32 hidden state is 4.7 MB) is page-faulted in
again on every op. Measured on the 2-core machines here: an RMSNorm over 2048 x 576 float32 takes
5.2 ms by default and 0.49 ms with the settings below; silu(gate) * up over 2048 x 1536, 13.7 ms
and 3.1 ms. Raising the mmap threshold and the trim threshold keeps freed blocks in the heap for
the next step, at the cost of the process keeping its peak heap size (as a serving engine that
preallocates its KV cache does anyway).

This is process-wide (it also speeds up anything else in the process, HF transformers
included). `ENGINE_CPU_MALLOC_TUNING=0` turns it off; so does a non-glibc libc (it is a no-op
there). The same settings are glibc's documented environment variables MALLOC_MMAP_THRESHOLD_
and MALLOC_TRIM_THRESHOLD_, and preloading tcmalloc or jemalloc has the same effect.

The price of never trimming: one oversized request (a long prompt's activations) leaves the heap
at its peak for good. `HeapTrimmer` gives that back: called between engine steps (the
AsyncEngine does), it asks glibc how much of the heap is free (`mallinfo2`) and, when that is
more than `min_free_bytes`, calls `malloc_trim(0)`, which returns free pages to the kernel. It
checks at most every `interval_s` seconds, so a steady load keeps its warm heap and only a spike's
excess goes back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks under 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # never give freed heap memory back to the kernel

_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Applies the settings once per process; True when they are in effect."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("ENGINE_CPU_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Older glibc refuses thresholds above 32 MiB: fall back to the largest it accepts.
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    trim_ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _tuned = bool(mmap_ok and trim_ok)
    if _tuned:
        logger.info("glibc malloc tuned for CPU tensors (ENGINE_CPU_MALLOC_TUNING=0 turns it off)")
    return _tuned


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def heap_free_bytes() -> int | None:
    """Free bytes inside glibc's heap arenas (`mallinfo2().fordblks`); None when unknown (not
    glibc, or glibc older than 2.33)."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return int(mallinfo2().fordblks)


def trim_heap() -> bool:
    """Returns the heap's free pages to the kernel (`malloc_trim(0)`); True if it released any."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))


class HeapTrimmer:
    """Trims the heap after a spike: see the module docstring. Not thread-safe (one caller)."""

    def __init__(self, min_free_bytes: int = 256 * 2**20, interval_s: float = 10.0) -> None:
        self.min_free_bytes = min_free_bytes
        self.interval_s = interval_s
        self.num_trims = 0
        self._next_check = 0.0
        self._enabled = os.environ.get("ENGINE_CPU_MALLOC_TUNING", "1") != "0"

    def maybe_trim(self, now: float | None = None) -> bool:
        """Trims when the last check is `interval_s` old and the heap holds more than
        `min_free_bytes` free; True when it trimmed."""
        if not self._enabled:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return False
        self._next_check = now + self.interval_s
        free = heap_free_bytes()
        if free is None or free < self.min_free_bytes:
            return False
        trim_heap()
        self.num_trims += 1
        logger.debug("returned %.0f MiB of free heap to the kernel", free / 2**20)
        return True
