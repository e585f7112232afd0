"""The step thread's OpenMP workers must not sleep and wake at every op (engine/openmp.py).

Counted, not timed: voluntary context switches of the process per parallel op run on a second
thread (what the AsyncEngine's step thread is), while the first thread still has a libgomp team
and after `release_openmp_pool()` freed it. Each case runs in a fresh interpreter, so no other
test's threads or teams are involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_SCRIPT = r"""
import json, os, sys, threading
import torch
from engine.openmp import libgomp_paths, release_openmp_pool

def switches():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total

a = torch.randn(256, 256)
b = torch.randn(256, 256)
for _ in range(20):  # parallel regions on this (the "loading") thread: it now has a team
    a @ b
    torch.randn(1 << 17).mul_(1.0)
threads_before = len(os.listdir("/proc/self/task"))
released = release_openmp_pool() if sys.argv[1] == "release" else False
threads_after = len(os.listdir("/proc/self/task"))
result = {}

def step_thread():
    x = torch.randn(1 << 17)  # above ATen's grain size: an elementwise op is a parallel region
    for _ in range(50):
        x.mul_(1.0)
    start = switches()
    ops = 2000
    for _ in range(ops):
        x.mul_(1.0)
    result["switches_per_op"] = (switches() - start) / ops

t = threading.Thread(target=step_thread)
t.start()
t.join()
print(json.dumps({**result, "released": released, "threads_before": threads_before,
                  "threads_after": threads_after, "libgomp": libgomp_paths()}))
"""


def _run(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("ENGINE_OMP_RELEASE", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _uses_libgomp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")


@pytest.mark.skipif(not _uses_libgomp(), reason="needs torch with GNU OpenMP on Linux")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for a 2-thread team")
def test_release_frees_the_calling_threads_team_and_stops_futex_wakeups() -> None:
    kept = _run("keep")
    released = _run("release")
    assert any("libgomp" in p for p in released["libgomp"])
    assert released["released"] is True
    # The freed team's worker thread is gone.
    assert released["threads_after"] < released["threads_before"]
    # With two teams on 2 CPUs libgomp throttles spinning: a sleep/wake per op (measured ~1).
    # With one team the worker spins between ops: (almost) no voluntary switches.
    assert kept["switches_per_op"] > 0.3, kept
    assert released["switches_per_op"] < kept["switches_per_op"] / 4, (kept, released)


def test_release_is_a_no_op_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.openmp import release_openmp_pool

    monkeypatch.setenv("ENGINE_OMP_RELEASE", "0")
    assert release_openmp_pool() is False
