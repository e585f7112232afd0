"""Adaptive CPU reservation (engine/cpu_contention.py): the signal, the hysteresis, the setting's
parsing, the AsyncEngine applying it, and the server's gauge."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.cpu_contention import (
    AUTO,
    AdaptiveThreads,
    CpuTimes,
    ProcCpuTimes,
    others_cores,
    parse_reserved_cpus,
)

ENGINE_KW = {"dtype": "float32", "block_size": 4, "kv_cache_memory_bytes": 8 * 2**20, "seed": 0}


class FakeCpu:
    """Injected accounting: each window, `others` cores of other work and `own` of the engine,
    on a fake clock advanced by `window()`."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0
        self.own = 0.0
        self.loop_thread = 0.0  # a Python thread of this process (the event loop)
        self.fail = False

    def read(self, engine_tid: int) -> CpuTimes:
        if self.fail:
            raise OSError("no /proc here")
        return CpuTimes(busy_s=self.busy, own_s=self.own, threads={1: self.loop_thread})

    def window(self, others: float, engine: float = 1.9, loop: float = 0.0, dt: float = 0.25):
        """`dt` seconds (a binary fraction: exact sums) in which other processes use `others`
        cores, the engine's own threads `engine` and the event loop `loop` (the loop is part of
        this process's time)."""
        self.now += dt
        self.busy += (others + engine + loop) * dt
        self.own += (engine + loop) * dt
        self.loop_thread += loop * dt


def adaptive(fake: FakeCpu, max_threads: int = 2, **kw) -> AdaptiveThreads:
    kw.setdefault("cpus", max_threads)  # a team of every core, whatever this machine has
    a = AdaptiveThreads(max_threads, read=fake.read, clock=lambda: fake.now, **kw)
    a.start(engine_tid=99)
    return a


# ---- the signal -----------------------------------------------------------------------------


def test_others_counts_other_processes_and_own_python_threads_but_not_the_engine():
    before = CpuTimes(busy_s=10.0, own_s=4.0, threads={1: 1.0, 2: 0.5})
    # 1 s: 1.6 busy in all; 1.2 of it this process's, of which 0.2 the loop (tid 1), 0.1 a
    # thread that ended (tid 2, gone: counted as the engine's), a new thread 3 (not counted).
    after = CpuTimes(busy_s=11.6, own_s=5.2, threads={1: 1.2, 3: 0.4})
    assert others_cores(before, after, 1.0) == pytest.approx(0.4 + 0.2)
    assert others_cores(before, after, 0.0) == 0.0
    # accounting noise never yields a negative load
    assert others_cores(before, CpuTimes(busy_s=10.0, own_s=4.5, threads={}), 1.0) == 0.0


def test_reserves_above_the_threshold_and_releases_after_quiet_windows(caplog):
    caplog.set_level("DEBUG", logger="engine.cpu_contention")
    fake = FakeCpu()
    a = adaptive(fake)
    assert a.threads == a.next_step_threads() == 2
    for _ in range(5):  # a quiet machine: never reserves
        fake.window(others=0.03, loop=0.02)
        assert a.next_step_threads() == 2
    fake.window(others=0.9)  # one busy window: the 2-window mean 0.47 > 0.25
    assert a.next_step_threads() == 1
    assert a.others_cores == pytest.approx(0.9)
    fake.window(others=0.15)  # between the thresholds: stays reserved
    assert a.next_step_threads() == 1
    fake.window(others=0.0)  # one quiet window is not enough
    assert a.next_step_threads() == 1
    fake.window(others=0.0)
    assert a.next_step_threads() == 2  # two quiet windows release
    summary = a.summary()
    assert summary.switches == 2
    assert summary.windows == 9
    assert summary.others_max == pytest.approx(0.9)
    assert summary.reduced_s == pytest.approx(3 * 0.25)  # the windows measured while reserved
    switches = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert len(switches) == 2
    assert switches[0].startswith("engine threads 2 -> 1 (others used 0.90 cores")
    assert switches[1].startswith("engine threads 1 -> 2")


def test_the_event_loop_thread_counts_as_competition():
    fake = FakeCpu()
    a = adaptive(fake)
    fake.window(others=0.0, loop=0.6)
    assert a.next_step_threads() == 1  # 0.6 cores of event loop, no other process


def test_a_single_noisy_window_below_the_mean_threshold_does_not_reserve():
    fake = FakeCpu()
    a = adaptive(fake)
    fake.window(others=0.0)
    a.next_step_threads()
    fake.window(others=0.4)  # one window's tick noise; mean of the last two 0.2
    assert a.next_step_threads() == 2


def test_checks_at_most_every_interval():
    fake = FakeCpu()
    reads = []
    a = AdaptiveThreads(
        2, read=lambda tid: reads.append(tid) or fake.read(tid), clock=lambda: fake.now, cpus=2
    )
    a.start(engine_tid=7)
    for _ in range(100):  # 100 steps within one interval: no reading
        fake.window(others=2.0, dt=2**-11)
        assert a.next_step_threads() == 2
    fake.window(others=2.0, dt=0.25)
    assert a.next_step_threads() == 1
    assert reads == [7, 7]  # the engine thread's id, passed to the reader


def test_a_window_spanning_an_idle_engine_is_stale_and_only_restarts_the_measure():
    fake = FakeCpu()
    a = adaptive(fake)
    fake.window(others=1.5, dt=4.0)  # e.g. the server starting its template workers, then idle
    assert a.next_step_threads() == 2
    assert a.summary().windows == 0
    fake.window(others=1.5)  # a fresh window decides again
    assert a.next_step_threads() == 1


def test_cores_left_free_beside_the_team_are_not_competition():
    """A team of 2 threads on 4 CPUs (OMP_NUM_THREADS=2, or one of two tensor-parallel ranks or
    replicas): 2 cores of other work fit beside it; only what does not fit competes."""
    fake = FakeCpu()
    a = adaptive(fake, max_threads=2, cpus=4)
    assert a.spare_cores == 2
    for _ in range(4):
        fake.window(others=2.1)  # the sibling rank / replica, and a little more
        assert a.next_step_threads() == 2
    fake.window(others=2.6)
    fake.window(others=2.6)
    assert a.next_step_threads() == 1  # 0.6 cores beyond the 2 spare ones
    fake.window(others=2.05)
    fake.window(others=2.05)
    assert a.next_step_threads() == 1
    fake.window(others=2.0)
    assert a.next_step_threads() == 2
    every_core = adaptive(FakeCpu(), max_threads=4, cpus=4)
    assert every_core.spare_cores == 0


def test_never_below_one_thread_and_one_core_never_adapts():
    fake = FakeCpu()
    one = adaptive(fake, max_threads=1)
    fake.window(others=5.0)
    assert one.next_step_threads() == 1 and not one.enabled
    many = adaptive(fake, max_threads=8)
    fake.window(others=5.0)
    assert many.next_step_threads() == 7  # one fewer, not fewer still


def test_the_default_thread_count_comes_from_start():
    fake = FakeCpu()
    a = AdaptiveThreads(read=fake.read, clock=lambda: fake.now)
    a.start(default_threads=4, engine_tid=1)
    assert (a.max_threads, a.reduced_threads, a.threads) == (4, 3, 4)
    given = AdaptiveThreads(3, read=fake.read, clock=lambda: fake.now)
    given.start(default_threads=8, engine_tid=1)
    assert given.max_threads == 3


def test_unreadable_accounting_falls_back_to_all_threads_logged_once(caplog):
    fake = FakeCpu()
    a = adaptive(fake)
    fake.window(others=2.0)
    assert a.next_step_threads() == 1
    fake.fail = True
    with caplog.at_level("WARNING", logger="engine.cpu_contention"):
        for _ in range(3):
            fake.window(others=2.0)
            assert a.next_step_threads() == 2
    assert not a.enabled
    assert len([r for r in caplog.records if "CPU accounting" in r.message]) == 1
    broken = AdaptiveThreads(2, read=FakeCpu.read.__get__(fake), clock=lambda: fake.now)
    broken.start(engine_tid=1)  # unreadable from the start: all threads, no error
    assert broken.next_step_threads() == 2


def test_bad_thresholds_are_rejected():
    with pytest.raises(ValueError, match="max_threads"):
        AdaptiveThreads(0)
    with pytest.raises(ValueError, match="release_below"):
        AdaptiveThreads(2, reserve_above=0.1, release_below=0.2)
    with pytest.raises(ValueError, match="max_window_s"):
        AdaptiveThreads(2, interval_s=0.5, max_window_s=0.2)


# ---- the setting ------------------------------------------------------------------------------


def test_parse_reserved_cpus():
    assert parse_reserved_cpus("auto") == parse_reserved_cpus(" AUTO ") == AUTO
    assert parse_reserved_cpus("0") == 0
    assert parse_reserved_cpus("2") == 2
    assert parse_reserved_cpus(1) == 1
    for bad in ("-1", "1.5", "yes", "", -1, True):
        with pytest.raises(ValueError, match="ENGINE_CPU_NUM_OF_RESERVED_CPU"):
            parse_reserved_cpus(bad, "ENGINE_CPU_NUM_OF_RESERVED_CPU")


def test_reserved_cpus_environment_default_is_auto_and_bad_values_name_the_variable(
    monkeypatch,
):
    from engine.server import __main__ as cli
    from engine.server.app import ServerConfig, engine_threads

    for name in cli.RESERVED_CPU_ENV:
        monkeypatch.delenv(name, raising=False)
    assert cli.reserved_cpus_from_env() == AUTO
    assert ServerConfig().reserved_cpus == AUTO
    assert engine_threads(AUTO) == AUTO
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "auto")
    assert cli.reserved_cpus_from_env() == AUTO
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "lots")
    with pytest.raises(ValueError, match="VLLM_CPU_NUM_OF_RESERVED_CPU"):
        cli.reserved_cpus_from_env()
    monkeypatch.setenv("ENGINE_CPU_NUM_OF_RESERVED_CPU", "0")  # the engine's name wins
    assert cli.reserved_cpus_from_env() == 0
    monkeypatch.setenv("ENGINE_CPU_NUM_OF_RESERVED_CPU", "-2")
    with pytest.raises(ValueError, match="ENGINE_CPU_NUM_OF_RESERVED_CPU"):
        cli.reserved_cpus_from_env()
    assert ServerConfig(reserved_cpus="1").reserved_cpus == 1
    with pytest.raises(ValueError, match="reserved_cpus"):
        ServerConfig(reserved_cpus="sometimes")


# ---- the real accounting --------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux accounting")
def test_proc_reader_sees_this_processs_python_threads_but_not_the_engine_thread():
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        reader = ProcCpuTimes(engine_tid=threading.get_native_id())
        first = reader()
        time.sleep(0.3)
        second = reader()
    finally:
        stop.set()
        spinner.join()
    assert threading.get_native_id() not in second.threads
    assert spinner.native_id in second.threads
    spun = second.threads[spinner.native_id] - first.threads[spinner.native_id]
    assert spun > 0.05  # the spinner ran (it shares the GIL with this thread's sleep only)
    assert second.own_s - first.own_s >= spun * 0.9
    assert second.busy_s >= first.busy_s


# ---- the AsyncEngine applies it ---------------------------------------------------------------


@pytest.fixture
def engine_factory(async_engine_factory):
    return lambda **kwargs: async_engine_factory(ENGINE_KW, **kwargs)


def test_async_engine_applies_the_adaptive_choice_on_its_thread(engine_factory):
    """Injected accounting: the steps run with 2 threads, then 1 while others are busy, then 2
    again; torch.set_num_threads runs on the engine thread only when the count changes."""
    import torch

    fake = FakeCpu()
    adapt = AdaptiveThreads(2, read=fake.read, clock=lambda: fake.now, cpus=2)
    engine = engine_factory(num_threads=adapt)
    seen: list[int] = []
    loads = iter([0.0] * 3 + [1.5] * 4 + [0.0] * 6)

    def hook() -> None:  # on the engine thread, right before each step
        seen.append(torch.get_num_threads())
        fake.window(others=next(loads, 0.0))

    engine.fault_hook = hook
    before = torch.get_num_threads()
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)

    async def main():
        stream = await engine.add_request("r0", [5, 6, 7], params)
        await stream.final()
        threads = engine.cpu_threads
        await engine.shutdown()
        return threads

    try:
        final = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        torch.set_num_threads(before)
    assert seen[0] == 2
    assert 1 in seen  # reserved while others were busy
    first_one = seen.index(1)
    assert all(t == 1 for t in seen[first_one : first_one + 3])
    assert seen[-1] == 2 and final == 2  # released once quiet again
    assert adapt.summary().switches == 2
    assert torch.get_num_threads() == before  # the loop thread's setting is untouched


def machine_load(seconds: float = 0.5) -> float:
    """Cores used by everything but this thread, measured like the engine measures."""
    reader = ProcCpuTimes(engine_tid=threading.get_native_id())
    start, first = time.monotonic(), reader()
    time.sleep(seconds)
    return others_cores(first, reader(), time.monotonic() - start)


def test_a_failing_reservation_leaves_the_engine_stepping_with_every_thread(engine_factory, caplog):
    import torch

    class Broken(AdaptiveThreads):
        def next_step_threads(self) -> int:
            raise ZeroDivisionError("a bug")

    engine = engine_factory(num_threads=Broken(2, read=FakeCpu().read))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    before = torch.get_num_threads()

    async def main():
        stream = await engine.add_request("r0", [5, 6, 7], params)
        out = await stream.final()
        threads = engine.cpu_threads
        await engine.shutdown()
        return out, threads

    try:
        out, threads = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        torch.set_num_threads(before)
    assert len(out.outputs[0].token_ids) == 3 and threads == 2
    assert engine.adaptive is None
    assert "adaptive CPU reservation failed" in caplog.text


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to reserve one")
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux accounting")
def test_a_busy_process_makes_the_engine_reserve_a_core_and_its_end_releases_it(
    engine_factory,
):
    """The real accounting: while a child process burns a core the engine steps with one
    thread fewer; once it stops, with all of them again (each within a deadline)."""
    import torch

    baseline = machine_load()
    if baseline > 0.3:  # the release needs a quiet machine; CI runs the tests one at a time
        pytest.skip(f"the machine is busy ({baseline:.2f} cores of other work)")
    wanted = len(os.sched_getaffinity(0))  # a team of every core, as the server's default
    engine = engine_factory(num_threads=AdaptiveThreads(wanted))
    # Each step also sleeps 2 ms: the event loop then wakes a few hundred times a second, not
    # thousands (the tiny test model steps in microseconds), and stays a small load.
    engine.fault_hook = lambda: time.sleep(0.002)
    params = SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True)
    before = torch.get_num_threads()

    async def keep_busy(stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            stream = await engine.add_request(f"r{i}", [5, 6, 7], params)
            await stream.final()
            i += 1

    async def wait_for(threads: int, seconds: float) -> float | None:
        """Seconds until the engine steps with `threads` (None: not within `seconds`)."""
        start = time.monotonic()
        while time.monotonic() < start + seconds:
            if engine.cpu_threads == threads:
                return time.monotonic() - start
            await asyncio.sleep(0.02)
        return None

    async def main() -> tuple[float | None, float | None, float | None]:
        stop = asyncio.Event()
        busy = asyncio.create_task(keep_busy(stop))
        try:
            started = await wait_for(wanted, 5.0)
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                reserved = await wait_for(wanted - 1, 10.0)
            finally:
                burner.kill()
                burner.wait()
            released = await wait_for(wanted, 10.0)
            return started, reserved, released
        finally:
            stop.set()
            await asyncio.wait_for(busy, 30)
            await engine.shutdown()

    try:
        started, reserved, released = asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        torch.set_num_threads(before)
    print(f"reserved after {reserved} s, released after {released} s")
    assert started is not None
    assert reserved is not None, "a core burnt by another process must make the engine reserve"
    assert released is not None, "once the burner stopped, the engine must use every thread"


# ---- the server's gauges and log line -----------------------------------------------------------


def test_metrics_expose_the_engine_threads_and_the_contention_signal(llama_path):
    """/metrics carries `engine:cpu_threads` (the engine thread's count now) and, with the
    adaptive reservation, `engine:cpu_contention_cores`; the stats line summarises both."""
    import json
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from engine.server import OpenAIServer, ServerConfig, ServerThread
    from engine.server.metrics import StatsLogger

    now = [0.0]

    def clock() -> float:  # every look at the clock: another window passed
        now[0] += 0.25
        return now[0]

    def read(engine_tid: int) -> CpuTimes:  # 1.25 cores of other processes, 1 of the engine
        return CpuTimes(busy_s=2.25 * now[0], own_s=1.0 * now[0])

    engine = LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW))
    config = ServerConfig(served_model_names=("tiny",), log_stats_interval=None, access_log=False)
    assert config.reserved_cpus == AUTO
    server = OpenAIServer(engine, config)
    assert server.async_engine.num_threads == AUTO
    server.async_engine.adaptive = AdaptiveThreads(2, read=read, clock=clock, cpus=2)

    def metrics(url: str) -> dict[str, float]:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("engine:")
        }

    with ServerThread(server) as thread:
        stats_logger = StatsLogger(lambda: server.async_engine.stats, cpu=server._cpu_summary)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        request = urllib.request.Request(
            thread.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        seen = metrics(thread.url)
        line = stats_logger.line()
        cpu_line = stats_logger.cpu_line()
    assert seen["engine:cpu_threads"] == 1  # reserved: the fake says 1.25 cores of other work
    assert seen["engine:cpu_contention_cores"] == pytest.approx(1.25)
    assert line is not None and "Engine" not in line  # vLLM's throughput line, unchanged
    assert cpu_line is not None and cpu_line.startswith("Engine CPU threads: 1 (")
    assert cpu_line.endswith("other CPU use: avg 1.25, max 1.25 cores")


def test_static_reservation_exposes_its_thread_count_and_no_contention(llama_path):
    import urllib.request

    from engine.server import OpenAIServer, ServerConfig, ServerThread
    from engine.server.app import engine_threads

    engine = LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW))
    config = ServerConfig(
        served_model_names=("tiny",), log_stats_interval=None, access_log=False, reserved_cpus=1
    )
    server = OpenAIServer(engine, config)
    assert server.async_engine.num_threads == engine_threads(1)
    assert server.async_engine.adaptive is None
    with ServerThread(server) as thread:
        deadline = time.monotonic() + 10
        while server.async_engine.cpu_threads is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine thread sets its threads as it starts
        with urllib.request.urlopen(thread.url + "/metrics", timeout=30) as response:
            text = response.read().decode()
    assert f'engine:cpu_threads{{model_name="tiny"}} {float(engine_threads(1))}' in text
    assert "engine:cpu_contention_cores" not in text


def test_abuse_bench_reports_the_engine_threads_per_kind_of_phase():
    """bench/abuse.py's summary line of the gauges it sampled from /metrics."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "abuse.py"
    spec = importlib.util.spec_from_file_location("bench_abuse_gauges", path)
    assert spec is not None and spec.loader is not None
    abuse = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = abuse  # its dataclasses look their module up
    spec.loader.exec_module(abuse)
    report = abuse.Report()
    assert abuse._gauges_line(report) == ""  # a server without the gauges: no line
    report.threads_alone, report.threads_abuse = [2, 2, 2, 1], [1, 1, 2, 1]
    report.contention_alone, report.contention_abuse = [0.0, 0.1], [1.2, 1.6]
    assert abuse._gauges_line(report) == (
        "engine CPU threads: alone 1.75 (25% of samples reserved), under abuse 1.25 (75% of "
        "samples reserved); contention signal (cores, mean / max): alone 0.05 / 0.10, under "
        "abuse 1.40 / 1.60"
    )


def test_thread_switch_bench_quick():
    """bench/thread_switch.py --quick (demo model, seconds) prints its cost table."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "thread_switch.py"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "thread switch costs, 2 <-> 1 threads" in out
    for row in (
        "| torch.set_num_threads |",
        "| one accounting reading",
        "| 2 threads |",
        "| 1 threads |",
    ):
        assert row in out
    assert "RSS " in out
