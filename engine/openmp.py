"""Keeping the engine thread's OpenMP workers spinning, not sleeping, between parallel regions.

torch's CPU wheels use GNU OpenMP (libgomp). libgomp gives every thread that opens a parallel
region its own team of worker threads, kept for the life of that thread, and it counts all of
them: while more threads are managed than there are CPUs, an idle worker spins only ~1,000
iterations (instead of ~300,000) before sleeping on a futex, so every parallel region afterwards
pays a futex wake-up per worker.

In the server the weights are loaded (parallel regions) on the main thread, which then runs the
event loop, while the steps run on the AsyncEngine's thread: two teams on a 2-core machine, so
the step's workers sleep and wake at every op. Measured on SmolLM2-135M fp32 (2 cores): a decode
step on a second thread made ~490 voluntary context switches per token and took ~1.6x as long
as on the loading thread; after `release_openmp_pool()` on the loading thread, 0 switches per
token and the same time as on the loading thread (see /work/readme_parts/server-speed.md).

`release_openmp_pool()` frees the *calling* thread's team (libgomp's `omp_pause_resource_all`,
which in libgomp only frees the caller's pool; a later parallel region on that thread simply
creates a new team). Other OpenMP runtimes (LLVM libomp, Intel iomp) pause the whole runtime
instead, so this is a no-op there. `ENGINE_OMP_RELEASE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["libgomp_paths", "release_openmp_pool"]

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t in omp.h

# libgomp path -> its omp_pause_resource_all (None when it has none: older than GCC 9)
_pause_fns: dict[str, object] = {}


def libgomp_paths() -> list[str]:
    """The libgomp copies loaded in this process, in load order. Wheels bundle their own:
    torch's (torch/lib) and e.g. sentencepiece's can both be loaded, each with its own teams."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "libgomp" in os.path.basename(path) and path not in paths:
                    paths.append(path)
    except OSError:  # no /proc (macOS)
        return []
    return paths


def _pause_functions(rescan: bool) -> list[object]:
    paths = libgomp_paths() if rescan or not _pause_fns else []  # /proc/self/maps: ~1 ms
    for path in paths:
        if path not in _pause_fns:
            try:
                fn = ctypes.CDLL(path).omp_pause_resource_all
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = None
            _pause_fns[path] = fn
    return [fn for fn in _pause_fns.values() if fn is not None]


def release_openmp_pool(rescan: bool = True) -> bool:
    """Frees the calling thread's worker teams in every loaded libgomp; True when at least one
    libgomp accepted the call.

    `rescan=False` skips looking for libgomp copies loaded since the last call (reading
    /proc/self/maps takes ~1 ms); then it is one C call per libgomp when there is nothing to
    free. Never call it inside a parallel region (libgomp refuses then).
    """
    if os.environ.get("ENGINE_OMP_RELEASE", "1") == "0":
        return False
    results = [fn(_OMP_PAUSE_HARD) == 0 for fn in _pause_functions(rescan)]  # type: ignore[operator]
    return any(results)
