"""Adaptive CPU reservation: the engine thread steps with every core while the machine is
otherwise quiet, and with one thread fewer while other work competes for the cores.

Why: torch steps the model with an OpenMP team of one thread per core, and every op waits for
its slowest member. When anything else becomes runnable on those cores (the server's event loop,
its body-parser and chat-template worker processes, the tokenizer thread, other processes), the
kernel preempts a team member and the whole team waits for it: on a 2-core machine a decode step
of the demo model took 54-327 ms with 2 threads under load and 6-9 ms with 1 (see the README's
"Concurrent abuse"). A permanent reservation costs ~1.4x at one request on a quiet machine, so
`AdaptiveThreads` reserves a core only while it sees competition.

The signal, "cores used by others", over a window of at least `interval_s`:

    others = (busy CPU time of the CPUs this process may run on      [/proc/stat]
              - this process's CPU time                               [CLOCK_PROCESS_CPUTIME_ID]
              + CPU time of this process's Python threads other than
                the engine thread                                     [/proc/self/task/T/schedstat]
             ) / window

i.e. other processes plus the event loop, the tokenizer thread and any other Python thread of
the server; the engine thread and its OpenMP workers (threads libgomp created, never Python
threads) are the engine's own compute and do not count. /proc/stat counts in ticks (10 ms per
CPU), so one window's value moves in steps of 0.01 s / window: 0.1 core on 100 ms windows,
which made a quiet concurrency-1 run flip to reserved now and then; hence 200 ms windows
(0.05 core per tick), and the decision uses the mean of the last `smooth_windows` windows.

A window longer than `max_window_s` (the engine was idle: nothing called between steps) is
stale, its average mostly about a past that no longer matters (e.g. the server's own start-up,
whose template workers import transformers): it only starts a new window and the current choice
stays.

Only what does not fit beside the team competes with it: `spare = cpus - max_threads` cores
(the CPUs of the affinity mask the team leaves free, 0 by default since torch takes every core)
are subtracted first. So a team sized below the machine on purpose (OMP_NUM_THREADS, tensor-
parallel ranks or Ray replicas sharing a machine, each with its share of the cores) does not
see its siblings as competition, while the usual team of every core sees everything.

Decision (hysteresis, so it never flaps): reserve (max_threads - 1, at least 1) once the
smoothed `others - spare` exceeds `reserve_above` cores; release (max_threads) after
`release_windows` consecutive windows with `others - spare` below `release_below`. Between the
two thresholds the current choice stays.

Invariants: `threads` is always in [max(1, max_threads - 1), max_threads]; between windows
`next_step_threads()` only compares a clock (no system call); nothing here ever raises into the
engine thread: an unreadable source disables adaptation (all cores, logged once).

Also the parser of `ENGINE_CPU_NUM_OF_RESERVED_CPU` / `VLLM_CPU_NUM_OF_RESERVED_CPU`:
`parse_reserved_cpus`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "AdaptiveThreads",
    "CpuTimes",
    "ProcCpuTimes",
    "ThreadsSummary",
    "affinity_cpus",
    "others_cores",
    "parse_reserved_cpus",
]

AUTO: Literal["auto"] = "auto"

# Defaults of the decision, in cores (see the README part for the measured signal they fit).
INTERVAL_S = 0.2
RESERVE_ABOVE = 0.25
RELEASE_BELOW = 0.1
RELEASE_WINDOWS = 2
SMOOTH_WINDOWS = 2
MAX_WINDOW_S = 1.0


def parse_reserved_cpus(value: str | int, name: str = "reserved_cpus") -> int | Literal["auto"]:
    """`"auto"` (adaptive) or a count of cores >= 0 (static; 0 never reserves). Anything else
    raises ValueError naming `name` (the environment variable or field it came from)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be 'auto' or an integer >= 0, got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        text = str(value).strip()
        if text.lower() == AUTO:
            return AUTO
        try:
            count = int(text)
        except ValueError:
            raise ValueError(f"{name} must be 'auto' or an integer >= 0, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be 'auto' or an integer >= 0, got {value!r}")
    return count


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Cumulative CPU seconds at one instant (only differences between two readings mean
    anything)."""

    busy_s: float  # every task's, on the CPUs this process may run on
    own_s: float  # this process's, all its threads together
    # This process's threads that compete with the engine's team (native id -> seconds).
    threads: Mapping[int, float] = field(default_factory=dict)


def others_cores(before: CpuTimes, after: CpuTimes, wall_s: float) -> float:
    """Cores used by everything but the engine's own compute between two readings (>= 0). A
    thread present in only one reading (started or ended in between) is counted as the engine's
    (its time is in `own_s`), which errs toward not reserving."""
    if wall_s <= 0:
        return 0.0
    shared = sum(
        max(0.0, after.threads[tid] - before.threads[tid])
        for tid in after.threads.keys() & before.threads.keys()
    )
    cpu_s = (after.busy_s - before.busy_s) - (after.own_s - before.own_s) + shared
    return max(0.0, cpu_s / wall_s)


class ProcCpuTimes:
    """Reads `CpuTimes` from Linux accounting. `engine_tid` is the engine thread's native id
    (`threading.get_native_id()` on it): every other Python thread of this process competes.

    Costs ~30-60 us per reading (one /proc/stat, one clock, one small file per Python thread).
    Raises OSError / ValueError when the sources cannot be read (not Linux, no /proc).
    """

    def __init__(self, engine_tid: int, stat_path: str = "/proc/stat") -> None:
        self.engine_tid = engine_tid
        self.stat_path = stat_path
        try:
            cpus: set[int] | None = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = None
        self._cpu_names = None if cpus is None else {f"cpu{i}" for i in cpus}
        self._ticks = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._task_dir = f"/proc/{os.getpid()}/task"

    def __call__(self) -> CpuTimes:
        return CpuTimes(
            busy_s=self._busy_s(),
            own_s=time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID),
            threads=self._threads(),
        )

    def _busy_s(self) -> float:
        """Busy time of the CPUs in this process's affinity mask: user + nice + system + irq +
        softirq (steal, the hypervisor's, and guest, already in user, are left out)."""
        busy = 0
        with open(self.stat_path, encoding="ascii") as f:
            lines = f.read().splitlines()
        per_cpu = [ln for ln in lines if ln.startswith("cpu") and not ln.startswith("cpu ")]
        names = self._cpu_names
        chosen = [ln for ln in per_cpu if names is None or ln.split(None, 1)[0] in names]
        if not chosen:  # an affinity mask naming CPUs /proc/stat does not list: take them all
            chosen = per_cpu or [ln for ln in lines if ln.startswith("cpu ")]
        if not chosen:
            raise ValueError(f"{self.stat_path} has no cpu lines")
        for line in chosen:
            fields = line.split()
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
            busy += user + nice + system + irq + softirq
        return busy / self._ticks

    def _threads(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None or tid == self.engine_tid:
                continue
            seconds = _thread_cpu_s(self._task_dir, tid, self._ticks)
            if seconds is not None:
                out[tid] = seconds
        return out


def _thread_cpu_s(task_dir: str, tid: int, ticks: float) -> float | None:
    """One thread's CPU seconds: schedstat's nanoseconds, else stat's utime + stime ticks; None
    when the thread has gone."""
    try:
        with open(f"{task_dir}/{tid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[0]) / 1e9
    except FileNotFoundError:
        pass
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"{task_dir}/{tid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class ThreadsSummary:
    """Cumulative counters of an `AdaptiveThreads` (differences of two give an interval)."""

    threads: int  # the current choice
    windows: int  # windows measured
    others_sum: float  # sum of the windows' signal (cores)
    others_max: float  # largest window signal since the previous `summary(reset_max=True)`
    reduced_s: float  # wall seconds spent at the reduced thread count
    switches: int


class AdaptiveThreads:
    """Chooses the engine thread's torch thread count before each step (see the module doc).

    Call `start()` on the engine thread, then `next_step_threads()` before each step; it returns
    the count the next step should use (the caller applies it when it changes). `read` returns
    the current `CpuTimes` given the engine thread's native id (default: `ProcCpuTimes`), or
    raises when the accounting is unreadable: then adaptation stops at `max_threads`.
    """

    def __init__(
        self,
        max_threads: int | None = None,
        *,
        read: Callable[[int], CpuTimes] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = INTERVAL_S,
        reserve_above: float = RESERVE_ABOVE,
        release_below: float = RELEASE_BELOW,
        release_windows: int = RELEASE_WINDOWS,
        smooth_windows: int = SMOOTH_WINDOWS,
        max_window_s: float = MAX_WINDOW_S,
        cpus: int | None = None,
    ) -> None:
        if max_threads is not None and max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        if not 0 <= release_below <= reserve_above:
            raise ValueError(
                f"need 0 <= release_below <= reserve_above, got {release_below}, {reserve_above}"
            )
        if interval_s <= 0 or release_windows < 1 or smooth_windows < 1:
            raise ValueError("interval_s must be > 0, release_windows and smooth_windows >= 1")
        if max_window_s < interval_s:
            raise ValueError(f"max_window_s must be >= interval_s, got {max_window_s}")
        self.max_window_s = max_window_s
        self.interval_s = interval_s
        self.reserve_above = reserve_above
        self.release_below = release_below
        self.release_windows = release_windows
        self._read = read
        self._clock = clock
        self.others_cores: float | None = None  # the latest window's signal
        # CPUs the team may run on (None: this process's affinity mask, read at start()).
        self._cpus = cpus
        self.spare_cores = 0  # cpus - max_threads: free beside the team, set at start()
        self._set_max_threads(max_threads or 1)
        self._max_given = max_threads is not None
        self._recent: deque[float] = deque(maxlen=smooth_windows)
        self._quiet_windows = 0
        self._last: CpuTimes | None = None
        self._engine_tid = 0
        self._last_time = 0.0
        self._lock = threading.Lock()  # the counters below, read from the event loop
        self._windows = 0
        self._others_sum = 0.0
        self._others_max = 0.0
        self._reduced_s = 0.0
        self._switches = 0

    def _set_max_threads(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.reduced_threads = max(1, max_threads - 1)
        self.threads = max_threads
        self.enabled = self.reduced_threads < max_threads  # one thread: nothing to adapt

    def start(self, default_threads: int | None = None, engine_tid: int | None = None) -> None:
        """Takes the first reading; call on the engine thread (its native id is excluded).
        `default_threads`: the thread count when none was given to the constructor (the
        engine thread's torch default)."""
        if not self._max_given and default_threads is not None:
            self._set_max_threads(max(1, default_threads))
        cpus = self._cpus if self._cpus is not None else affinity_cpus()
        self.spare_cores = max(0, cpus - self.max_threads)
        if not self.enabled:
            return
        tid = threading.get_native_id() if engine_tid is None else engine_tid
        if self._read is None:
            self._read = _proc_reader(tid)
        self._engine_tid = tid
        self._last_time = self._clock()  # the clock, then the reading: as in each window
        self._last = self._sample()

    def next_step_threads(self) -> int:
        """The thread count for the next step: a clock comparison, plus one reading and a
        decision at most every `interval_s`."""
        if not self.enabled or self._last is None:
            return self.threads
        now = self._clock()
        wall = now - self._last_time
        if wall < self.interval_s:
            return self.threads
        current = self._sample()
        if current is None:
            return self.threads
        before, self._last, self._last_time = self._last, current, now
        if wall <= self.max_window_s:  # else stale (the engine was idle): a new window only
            self._decide(others_cores(before, current, wall), wall)
        return self.threads

    def summary(self, reset_max: bool = False) -> ThreadsSummary:
        """The counters so far (any thread)."""
        with self._lock:
            out = ThreadsSummary(
                threads=self.threads,
                windows=self._windows,
                others_sum=self._others_sum,
                others_max=self._others_max,
                reduced_s=self._reduced_s,
                switches=self._switches,
            )
            if reset_max:
                self._others_max = 0.0
            return out

    def _sample(self) -> CpuTimes | None:
        assert self._read is not None
        try:
            return self._read(self._engine_tid)
        except (OSError, ValueError, IndexError) as e:
            logger.warning(
                "cannot read CPU accounting (%s: %s): the engine steps with all %d threads",
                type(e).__name__,
                e,
                self.max_threads,
            )
            self.enabled = False
            self.threads = self.max_threads
            return None

    def _decide(self, others: float, wall: float) -> None:
        self.others_cores = others
        excess = others - self.spare_cores  # what does not fit beside the team
        self._recent.append(excess)
        smoothed = sum(self._recent) / len(self._recent)
        before = self.threads
        if excess < self.release_below:
            self._quiet_windows += 1
        else:
            self._quiet_windows = 0
        if before == self.max_threads and smoothed > self.reserve_above:
            self.threads = self.reduced_threads
        elif before != self.max_threads and self._quiet_windows >= self.release_windows:
            self.threads = self.max_threads
        with self._lock:
            self._windows += 1
            self._others_sum += others
            self._others_max = max(self._others_max, others)
            if before != self.max_threads:
                self._reduced_s += wall
            if self.threads != before:
                self._switches += 1
        if self.threads != before:
            logger.debug(
                "engine threads %d -> %d (others used %.2f cores; beyond the %d spare, "
                "%.2f smoothed)",
                before,
                self.threads,
                others,
                self.spare_cores,
                smoothed,
            )


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() without one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _proc_reader(engine_tid: int) -> Callable[[int], CpuTimes]:
    reader = ProcCpuTimes(engine_tid)
    return lambda tid: reader()
