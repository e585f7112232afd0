"""Prometheus metrics under vLLM's names, and the periodic throughput log line.

Each server owns one `CollectorRegistry` (never the process-global one), so several servers can
run in one process (tests). Two kinds of series:

* Read at scrape time from the engine's latest stats snapshot (`AsyncEngine.stats`): the gauges
  `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a
  fraction, 1 = all blocks in use, as in vLLM) and the counters `vllm:prompt_tokens_total`,
  `vllm:generation_tokens_total`, `vllm:prefix_cache_queries_total`,
  `vllm:prefix_cache_hits_total`, `vllm:num_preemptions_total`. The engine owns these totals, so
  the server never double counts.
* Observed by the server per request on the event-loop thread: `vllm:request_success_total`
  (label finished_reason), and the histograms `vllm:time_to_first_token_seconds`,
  `vllm:inter_token_latency_seconds`, `vllm:e2e_request_latency_seconds`.

Every series carries the `model_name` label. Two more gauges, not vLLM's (hence the `engine:`
prefix), read at scrape time from the AsyncEngine: `engine:cpu_threads` (the torch threads the
engine thread steps with now) and, with the adaptive reservation (`reserved_cpus="auto"`),
`engine:cpu_contention_cores` (cores used by work other than the engine's steps in the latest
window, the signal that decides; engine/cpu_contention.py); with it, `StatsLogger.cpu_line`
adds a line of its own after the throughput line (which keeps vLLM's format).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from engine.cpu_contention import ThreadsSummary
from engine.engine import EngineStats

logger = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics", "StatsLogger"]

# Bucket bounds in seconds, spanning a fast GPU to a slow CPU (the same ranges vLLM uses).
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class _EngineStatsCollector(Collector):
    """Turns the engine's latest stats snapshot into gauge and counter families at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        sched = stats.scheduler
        labels = ["model_name"]
        value = [self._model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(value, v)
            return family

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)  # exposed as name_total
            family.add_metric(value, v)
            return family

        yield gauge(
            "vllm:num_requests_running", "Requests in the running batch.", sched.num_running
        )
        yield gauge("vllm:num_requests_waiting", "Requests waiting to run.", sched.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 means 100 percent).",
            sched.kv_cache_usage,
        )
        yield counter(
            "vllm:prompt_tokens", "Prompt tokens of requests added.", stats.prompt_tokens_total
        )
        yield counter("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            sched.prefix_cache_queries_total,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            sched.prefix_cache_hits_total,
        )
        yield counter(
            "vllm:num_preemptions",
            "Requests preempted by the scheduler.",
            sched.num_preemptions_total,
        )
        spec = stats.spec_decode
        if spec is not None:
            yield counter(
                "vllm:spec_decode_num_drafts",
                "Verification steps with at least one draft token.",
                spec.num_drafts,
            )
            yield counter(
                "vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens
            )
            yield counter(
                "vllm:spec_decode_num_accepted_tokens",
                "Draft tokens accepted.",
                spec.num_accepted_tokens,
            )
            per_position = CounterMetricFamily(
                "vllm:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in the draft.",
                labels=[*labels, "position"],
            )
            for position, accepted in enumerate(spec.accepted_per_position):
                per_position.add_metric([*value, str(position)], accepted)
            yield per_position


class _CpuCollector(Collector):
    """The engine thread's CPU threads and, when adaptive, the contention signal."""

    def __init__(
        self,
        model_name: str,
        threads: Callable[[], int | None],
        contention: Callable[[], float | None] | None,
    ) -> None:
        self._model_name = model_name
        self._threads = threads
        self._contention = contention

    def collect(self) -> Iterator[Metric]:
        threads = self._threads()
        if threads is not None:
            family = GaugeMetricFamily(
                "engine:cpu_threads",
                "Torch (OpenMP) threads the engine thread steps with now.",
                labels=["model_name"],
            )
            family.add_metric([self._model_name], threads)
            yield family
        contention = self._contention() if self._contention is not None else None
        if contention is not None:
            family = GaugeMetricFamily(
                "engine:cpu_contention_cores",
                "CPU cores used by work other than the engine's steps in the latest window "
                "(what the adaptive CPU reservation decides on).",
                labels=["model_name"],
            )
            family.add_metric([self._model_name], contention)
            yield family


class ServerMetrics:
    """The server's registry; implements `engine.async_engine.RequestObserver`.

    `cpu_threads` / `cpu_contention` (optional) return the engine thread's current thread count
    and the adaptive reservation's latest signal (None: not known, no series)."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        cpu_threads: Callable[[], int | None] | None = None,
        cpu_contention: Callable[[], float | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self._success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Seconds between a request's successive token steps.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.registry.register(_EngineStatsCollector(model_name, stats))
        if cpu_threads is not None:
            self.registry.register(_CpuCollector(model_name, cpu_threads, cpu_contention))

    # RequestObserver
    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self._itl.observe(itl_s)

    def on_finished(self, finish_reasons: Sequence[str], e2e_s: float) -> None:
        # One request, counted once: by its first sample's reason when n > 1.
        reason = finish_reasons[0] if finish_reasons else "abort"
        self._success.labels(self.model_name, reason).inc()
        self._e2e.observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatsLogger:
    """Builds the periodic log line from successive stats snapshots (vLLM's format)."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        cpu: Callable[[], ThreadsSummary | None] | None = None,
    ) -> None:
        self._stats = stats
        self._last = stats()
        self._last_time = time.monotonic()
        # The adaptive CPU reservation's counters (None: static thread count, no summary).
        self._cpu = cpu
        self._last_cpu = cpu() if cpu is not None else None
        self._last_cpu_time = self._last_time

    def line(self) -> str | None:
        """The line for the interval since the previous call; None when the engine was idle."""
        now = time.monotonic()
        current = self._stats()
        prev, elapsed = self._last, max(now - self._last_time, 1e-9)
        self._last, self._last_time = current, now
        sched = current.scheduler
        prompt_tokens = current.prompt_tokens_total - prev.prompt_tokens_total
        generated = current.generation_tokens_total - prev.generation_tokens_total
        if not (prompt_tokens or generated or sched.num_running or sched.num_waiting):
            return None
        queries = sched.prefix_cache_queries_total - prev.scheduler.prefix_cache_queries_total
        hits = sched.prefix_cache_hits_total - prev.scheduler.prefix_cache_hits_total
        hit_rate = 100.0 * hits / queries if queries else 0.0
        return (
            f"Avg prompt throughput: {prompt_tokens / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {generated / elapsed:.1f} tokens/s, "
            f"Running: {sched.num_running} reqs, Waiting: {sched.num_waiting} reqs, "
            f"KV cache usage: {100.0 * sched.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {hit_rate:.1f}%" + _spec_decode_part(current, prev)
        )

    def cpu_line(self) -> str | None:
        """With the adaptive CPU reservation, its line for the interval since the previous call
        (None without it, or when it measured nothing): "Engine CPU threads: 2 (30% of the time
        reserved), other CPU use: avg 0.21, max 0.90 cores". A line of its own, so the
        throughput line keeps vLLM's format."""
        now = time.monotonic()
        current, prev = (self._cpu() if self._cpu is not None else None), self._last_cpu
        elapsed = max(now - self._last_cpu_time, 1e-9)
        self._last_cpu, self._last_cpu_time = current, now
        if current is None or prev is None or current.windows == prev.windows:
            return None
        reduced = 100.0 * min(1.0, (current.reduced_s - prev.reduced_s) / elapsed)
        avg = (current.others_sum - prev.others_sum) / (current.windows - prev.windows)
        return (
            f"Engine CPU threads: {current.threads} ({reduced:.0f}% of the time reserved), "
            f"other CPU use: avg {avg:.2f}, max {current.others_max:.2f} cores"
        )


def _spec_decode_part(current: EngineStats, prev: EngineStats) -> str:
    """ ", Draft acceptance rate: ..." for the interval, when speculative decoding is on."""
    if current.spec_decode is None or prev.spec_decode is None:
        return ""
    drafted = current.spec_decode.num_draft_tokens - prev.spec_decode.num_draft_tokens
    accepted = current.spec_decode.num_accepted_tokens - prev.spec_decode.num_accepted_tokens
    rate = 100.0 * accepted / drafted if drafted else 0.0
    return f", Draft acceptance rate: {rate:.1f}%"
