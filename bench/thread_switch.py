"""What the adaptive CPU reservation costs (engine/cpu_contention.py): switching the engine
thread's torch threads, reading the accounting, and checking before each step.

    python bench/thread_switch.py                 # the default model (SmolLM2 when installed)
    python bench/thread_switch.py --model demo
    python bench/thread_switch.py --quick         # demo model, few steps (the test suite)

Runs on a thread of its own, as the AsyncEngine's steps do, and prints:

* `torch.set_num_threads` alternating max <-> max - 1 (mean per call);
* one matmul right after a switch vs steady (median), at each thread count;
* one `ProcCpuTimes` reading (what each 200 ms window costs) and one `next_step_threads()` call
  between windows (what every step costs);
* through the engine: one request decoded while the threads alternate every `--toggle-every`
  steps: the step right after a switch vs the steady steps at each count (oneDNN primitives and
  the split GEMV's weight views depend on the thread count), and RSS before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch

from engine.cpu_contention import AdaptiveThreads, ProcCpuTimes


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def micro(high: int, repeats: int) -> dict[str, Any]:
    """set_num_threads, a matmul after a switch vs steady, a reading, a check."""
    low = max(1, high - 1)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    for i in range(repeats * 20):
        torch.set_num_threads(low if i % 2 else high)
    out["set_num_threads_us"] = (time.perf_counter() - start) / (repeats * 20) * 1e6
    x, w = torch.randn(64, 576), torch.randn(2304, 576)
    for threads in (high, low):
        torch.set_num_threads(threads)
        for _ in range(10):
            x @ w.t()
        steady = []
        for _ in range(repeats):
            t = time.perf_counter()
            x @ w.t()
            steady.append(time.perf_counter() - t)
        after = []
        for _ in range(repeats):
            torch.set_num_threads(high + low - threads)
            x @ w.t()
            torch.set_num_threads(threads)
            t = time.perf_counter()
            x @ w.t()
            after.append(time.perf_counter() - t)
        out[f"matmul_{threads}"] = (statistics.median(steady) * 1e6, statistics.median(after) * 1e6)
    torch.set_num_threads(high)
    reader = ProcCpuTimes(threading.get_native_id())
    start = time.perf_counter()
    for _ in range(repeats):
        reader()
    out["reading_us"] = (time.perf_counter() - start) / repeats * 1e6
    adaptive = AdaptiveThreads(high)
    adaptive.start()
    start = time.perf_counter()
    for _ in range(repeats * 100):
        adaptive.next_step_threads()
    out["check_us"] = (time.perf_counter() - start) / (repeats * 100) * 1e6
    return out


def through_engine(model: str, high: int, steps: int, toggle_every: int) -> dict[str, Any]:
    from engine import EngineArgs, LLMEngine, SamplingParams

    low = max(1, high - 1)
    engine = LLMEngine(EngineArgs(model=model, seed=0))
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    torch.set_num_threads(high)
    engine.add_request("warm", "Once upon a time", SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("r", "Once upon a time there was", params)
    engine.step()  # the prefill
    before = rss_mib()
    threads = high
    after: dict[int, list[float]] = {high: [], low: []}
    steady: dict[int, list[float]] = {high: [], low: []}
    for i in range(1, steps + 1):
        switched = i % toggle_every == 0
        if switched:
            threads = high + low - threads
            torch.set_num_threads(threads)
        start = time.perf_counter()
        engine.step()
        (after if switched else steady)[threads].append((time.perf_counter() - start) * 1000)
    engine.abort_request(["r"])
    torch.set_num_threads(high)
    return {"after": after, "steady": steady, "rss": (before, rss_mib())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint, or demo (default: the server's)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="max threads")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--toggle-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="demo model, few steps (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.toggle_every, args.repeats = "demo", 24, 4, 20
    from engine.server.__main__ import default_model

    if args.model is None:
        model = default_model()[0]
    elif args.model == "demo":
        from engine.demo import demo_model_path

        model = str(demo_model_path())
    else:
        model = args.model
    result: dict[str, Any] = {}

    def run() -> None:  # a thread of its own, like the AsyncEngine's steps
        result["micro"] = micro(args.threads, args.repeats)
        result["engine"] = through_engine(model, args.threads, args.steps, args.toggle_every)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "engine" not in result:
        return 1
    m, e = result["micro"], result["engine"]
    high, low = args.threads, max(1, args.threads - 1)
    print(f"thread switch costs, {high} <-> {low} threads ({os.cpu_count()} CPUs), model {model}")
    print("| what | cost |")
    print("|---|---|")
    print(f"| torch.set_num_threads | {m['set_num_threads_us']:.2f} us |")
    for threads in (high, low):
        steady, after = m[f"matmul_{threads}"]
        print(
            f"| 64x576 @ 576x2304 at {threads} threads: steady / right after a switch | "
            f"{steady:.0f} / {after:.0f} us |"
        )
    print(f"| one accounting reading (once per 200 ms window) | {m['reading_us']:.1f} us |")
    print(f"| the check before a step, between windows | {m['check_us']:.2f} us |")
    print("| engine step | steady p50 | right after a switch (each) |")
    print("|---|---|---|")
    for threads in (high, low):
        steady = e["steady"][threads]
        after = ", ".join(f"{x:.1f}" for x in e["after"][threads])
        median = statistics.median(steady) if steady else float("nan")
        print(f"| {threads} threads | {median:.2f} ms | {after} ms |")
    print(f"RSS {e['rss'][0]:.0f} -> {e['rss'][1]:.0f} MiB over {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
