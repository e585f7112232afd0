"""Concurrent abuse: hostile and careless requests while /health and normal clients are timed.

    python bench/abuse.py                       # 3 rounds of 20 s alone + 20 s under abuse
    python bench/abuse.py --soak 600            # then a 10-minute RSS soak of steady load
    python bench/abuse.py --quick               # ~20 s, small bodies (the test suite runs this)

Runs an in-process server (the demo model unless --model), or drives one started separately
(`--base-url`, `--served-model-name`, and `--server-pid` for its RSS and CPU): a separate
process is the honest measurement, since an in-process server shares the GIL with the normal
client:

    python -m engine.server --model demo --trust-request-chat-template --max-connections 200 \
        --request-header-timeout 5 --chat-template-timeout 2 --disable-access-log &
    python bench/abuse.py --base-url http://127.0.0.1:8000 --served-model-name demo \
        --server-pid $! --soak 600

On a machine with few cores, compare `ENGINE_CPU_NUM_OF_RESERVED_CPU=0` (the engine always
steps with every core), `1` (one core always left to the rest) and the default `auto` (one
core left while other work competes): with an OpenMP team as large as the machine, every
other runnable thread (the event loop, the template workers, this script's abusive client)
stalls the engine's steps. The summary prints the engine's thread count and contention signal
per kind of phase, sampled from the server's /metrics.

The abusive client is a separate process (this script run with `--abuser-child`), which builds
every abusive body before any timing starts; `--abuser-nice N` lowers its CPU priority (on a
small machine the abusive client itself competes with the server for the cores, and the summary
reports its CPU use so the reader can judge). The normal client and the /health poller run in
this process. The run alternates phases, `--rounds` times: normal requests alone, then the same
normal requests while the abuser runs, so both medians come from the same minutes of a shared
machine. During the abuse phases the abuser keeps these running at once:

* huge `n` (2^63, 100000, n x prompts beyond the waiting limit), expecting 400s;
* slow connections: --slow-connections sockets (default: half the server's --max-connections)
  that send their headers a byte at a time and never finish: each must be closed by the server
  at its header timeout. (Beyond the cap, new connections get a 503 at once: the cap protects
  the process's file handles, not other clients; tests/test_server_limits.py checks it.)
* big bodies: a 30 MB prompt string, a 48 MB array of one-character prompts, a 20 MB /tokenize,
  a 16 MB array of 8M token ids (under the demo model's body limit: parsed, in the server's
  parser process, and refused for holding more values than a valid request), JSON nested
  100,000 deep (each a 4xx);
* long stops: 1,000 stop strings of 4,000 characters (400), and the largest allowed stop lists
  on a 64-token generation (200);
* heavy chat templates: loops of 10^10 iterations and 21 MB outputs (the server runs with
  --trust-request-chat-template, so they are rendered and must hit their time / size bounds).

It passes (exit 0) when every abusive request got its expected status, /health never took more
than 1 s, the normal requests' median latency under abuse stayed within 2x of their median
alone, and the server closed every slow connection. `--soak SECONDS` then runs steady normal
load and samples RSS: it passes when RSS after the warm-up (the first 20%) stays within 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MODEL = "abuse"  # the served model name (--served-model-name with --base-url)
_SERVER_PID: int | None = None  # whose RSS to sample (None: this process)


@dataclass
class Report:
    baseline_ms: list[float] = field(default_factory=list)  # normal requests, alone phases
    during_ms: list[float] = field(default_factory=list)  # normal requests, abuse phases
    health_ms: list[float] = field(default_factory=list)  # /health, abuse phases
    rounds: list[tuple[float, float]] = field(default_factory=list)  # per round: p50 alone, abuse
    abuse: dict[str, list[int | str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    slow_closed: int = 0
    slow_opened: int = 0
    abuser_cpu_s: float = 0.0  # the abusive client's CPU time during the abuse phases
    abuse_wall_s: float = 0.0
    server_cpu_alone: list[float] = field(default_factory=list)  # server cores used, per phase
    server_cpu_abuse: list[float] = field(default_factory=list)
    # The engine's CPU threads (`engine:cpu_threads`) and, with the adaptive reservation, its
    # contention signal (`engine:cpu_contention_cores`), sampled from /metrics every 0.25 s.
    threads_alone: list[float] = field(default_factory=list)
    threads_abuse: list[float] = field(default_factory=list)
    contention_alone: list[float] = field(default_factory=list)
    contention_abuse: list[float] = field(default_factory=list)


def rss_bytes() -> int:
    with open(f"/proc/{_SERVER_PID or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (its threads included) so far."""
    with open(f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def normal_request(session: aiohttp.ClientSession, url: str) -> float:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    start = time.monotonic()
    async with session.post(url + "/v1/completions", json=body) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"normal request got HTTP {response.status}")
    return (time.monotonic() - start) * 1000


async def post_raw(
    session: aiohttp.ClientSession, url: str, path: str, data: bytes, timeout: float = 120
) -> int | str:
    try:
        async with session.post(
            url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, ConnectionError) as e:
        # The server answers an oversized body's 413 and closes the connection 0.5 s later,
        # while the upload may still be going: a client that has not read the 413 by then sees
        # the connection reset ("reset"). Any other failure is -1.
        if "413" in str(e):
            return 413
        return "reset" if isinstance(e, (aiohttp.ClientOSError, ConnectionError)) else -1


def abusive_requests(scale: float) -> list[tuple[str, str, bytes, set[int | str]]]:
    """(name, path, body, accepted statuses); `scale` shrinks the big ones for --quick."""
    big = int(30 * 2**20 * scale)
    count = int(12 * 2**20 * scale)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    loop_template = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )

    def js(body: Any) -> bytes:
        return json.dumps(body).encode()

    # A body the server may refuse unread (413, then the connection closes under the upload).
    refused: set[int | str] = {400, 413, "reset"}

    return [
        ("n = 2^63", "/v1/completions", js({"prompt": "hi", "n": 2**63}), {400}),
        ("n = 100000", "/v1/completions", js({"prompt": "hi", "n": 100000}), {400}),
        ("n x prompts", "/v1/completions", js({"prompt": ["hi"] * 200, "n": 200}), {400}),
        ("30 MB prompt", "/v1/completions", js({"prompt": "a" * big}), refused),
        (
            "12M prompts",
            "/v1/completions",
            b'{"prompt": [' + b'"a",' * count + b'"a"]}',
            refused,
        ),
        ("20 MB tokenize", "/tokenize", js({"prompt": "a" * (big * 2 // 3)}), refused),
        (
            "8M token ids (16 MB)",
            "/v1/completions",
            b'{"prompt": [' + b"1," * (count * 2 // 3) + b"1]}",
            refused,
        ),
        (
            "deep JSON",
            "/v1/completions",
            b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            {400},
        ),
        (
            "1000 stops x 4000 chars",
            "/v1/completions",
            js({"prompt": "hi", "stop": ["x" * 4000] * 1000}),
            {400},
        ),
        (
            "largest allowed stops",
            "/v1/completions",
            js(
                {
                    "prompt": "hi",
                    "max_tokens": 64,
                    "ignore_eos": True,
                    "stop": [f"{i:02d}" + "a" * 1022 for i in range(64)],
                }
            ),
            {200},
        ),
        (
            "template loop 10^10",
            "/v1/chat/completions",
            js({**chat, "chat_template": loop_template}),
            {400},
        ),
        (
            "template 21 MB output",
            "/v1/chat/completions",
            js({**chat, "chat_template": "{{ 'ab ' * 7000000 }}"}),
            {400},
        ),
        ("lone surrogate", "/v1/completions", b'{"prompt": "a\\ud800"}', {400}),
    ]


# ---- the abusive client (a child process) ---------------------------------------------------


async def slow_connections(url: str, count: int, active: threading.Event, tally: dict) -> None:
    """Sockets that dribble their headers and never finish; counts those the server closed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for _ in range(count):
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.setblocking(False)
            socks.append(sock)
        except OSError:
            break
    tally["opened"] += len(socks)
    header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
    sent = 0
    open_socks = list(socks)
    while active.is_set() and open_socks:
        still = []
        for sock in open_socks:
            try:
                sock.send(header[sent : sent + 1] if sent < len(header) else b"a")
                data = sock.recv(1024)
                if data == b"" or data.startswith(b"HTTP/1.1 503"):
                    tally["closed"] += 1
                    sock.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                tally["closed"] += 1
                sock.close()
                continue
            still.append(sock)
        open_socks = still
        sent += 1
        await asyncio.sleep(0.5)
    for sock in open_socks:
        sock.close()


async def _abuse_while(
    url: str,
    requests: list[tuple[str, str, bytes, set[int | str]]],
    slow_count: int,
    active: threading.Event,
    out: dict[str, Any],
) -> None:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def abuser(name: str, path: str, body: bytes, ok: set[int | str]) -> None:
            while active.is_set():
                status = await post_raw(session, url, path, body)
                out["statuses"].setdefault(name, []).append(status)
                if status not in ok:
                    expected = sorted(ok, key=str)
                    out["unexpected"].append(f"{name}: HTTP {status}, expected {expected}")
                await asyncio.sleep(0.2)

        await asyncio.gather(
            slow_connections(url, slow_count, active, out["slow"]),
            *(abuser(*item) for item in requests),
        )


def abuser_child(argv: list[str]) -> int:
    """`--abuser-child URL MODEL SCALE SLOW_COUNT NICENESS ONLY`: builds the bodies (those whose
    name contains one of the comma-separated ONLY, or all for ""), says "ready",
    then runs the abuse between "start" and "stop" lines on stdin (answering "idle" once every
    abusive request of the phase has returned) until "exit"; the last line it writes is a JSON
    report (statuses, CPU seconds and wall seconds spent in the abuse phases)."""
    global MODEL
    url, MODEL, scale, slow_count, niceness = (
        argv[0],
        argv[1],
        float(argv[2]),
        int(argv[3]),
        int(argv[4]),
    )
    only = [name for name in argv[5].split(",") if name] if len(argv) > 5 else []
    if niceness:
        os.nice(niceness)
    requests = [  # built before any timing starts
        item for item in abusive_requests(scale) if not only or any(o in item[0] for o in only)
    ]
    if only and not any("slow" in o for o in only):
        slow_count = 0
    out: dict[str, Any] = {"statuses": {}, "unexpected": [], "slow": {"opened": 0, "closed": 0}}
    cpu = wall = 0.0

    def say(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    active = threading.Event()
    for line in sys.stdin:
        command = line.strip()
        if command == "start":
            active.set()
            start_cpu, start_wall = _own_cpu(), time.monotonic()
            runner = threading.Thread(
                target=asyncio.run,
                args=(_abuse_while(url, requests, slow_count, active, out),),
            )
            runner.start()
            say({"started": True})
        elif command == "stop":
            active.clear()
            runner.join()
            cpu += _own_cpu() - start_cpu
            wall += time.monotonic() - start_wall
            say({"idle": True})
        elif command == "exit":
            break
    say({**out, "cpu_s": cpu, "wall_s": wall})
    return 0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Abuser:
    """The parent's handle on the abusive child process."""

    def __init__(
        self, url: str, scale: float, slow_count: int, niceness: int, only: str = ""
    ) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, os.path.abspath(__file__), "--abuser-child", url, MODEL),
                *(str(scale), str(slow_count), str(niceness), only),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def _expect(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the abusive client exited")
        reply = json.loads(line)
        if key not in reply:
            raise RuntimeError(f"the abusive client said {line!r}, expected {key!r}")
        return reply

    def start(self) -> None:
        self._send("start")
        self._expect("started")

    def stop(self) -> None:
        """Ends the phase; returns once every abusive request in flight has returned."""
        self._send("stop")
        self._expect("idle")

    def finish(self) -> dict[str, Any]:
        self._send("exit")
        report = self._expect("statuses")
        self.proc.wait(30)
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---- the timed clients (this process) -------------------------------------------------------


async def sample_cpu_gauges(
    session: aiohttp.ClientSession, url: str, threads: list[float], contention: list[float]
) -> None:
    """Appends the server's `engine:cpu_threads` and `engine:cpu_contention_cores` (when it
    exposes them) from one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as response:
        text = await response.text()
    into = {"engine:cpu_threads": threads, "engine:cpu_contention_cores": contention}
    for family in text_string_to_metric_families(text):
        if family.name in into:
            into[family.name].extend(sample.value for sample in family.samples)


async def timed_phase(
    url: str,
    seconds: float,
    with_health: bool,
    threads: list[float] | None = None,
    contention: list[float] | None = None,
) -> tuple[list, list]:
    """Sequential normal requests (and, with_health, a /health poll every 0.1 s) for `seconds`:
    (normal latencies in ms, /health latencies in ms). With `threads` / `contention`, the
    engine's CPU gauges are sampled into them every 0.25 s."""
    until = time.monotonic() + seconds
    latencies: list[float] = []
    health: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def normal() -> None:
            while time.monotonic() < until:
                latencies.append(await normal_request(session, url))
                await asyncio.sleep(0.05)

        async def poll_health() -> None:
            while with_health and time.monotonic() < until:
                start = time.monotonic()
                async with session.get(url + "/health") as response:
                    await response.read()
                health.append((time.monotonic() - start) * 1000)
                await asyncio.sleep(0.1)

        async def poll_gauges() -> None:
            while threads is not None and contention is not None and time.monotonic() < until:
                await sample_cpu_gauges(session, url, threads, contention)
                await asyncio.sleep(0.25)

        await asyncio.gather(normal(), poll_health(), poll_gauges())
    return latencies, health


def run_rounds(url: str, args: argparse.Namespace, report: Report) -> None:
    asyncio.run(timed_phase(url, 1.0, with_health=False))  # warm-up
    abuser = Abuser(url, args.scale, args.slow_connections, args.abuser_nice, args.only)
    try:
        phase = args.duration / args.rounds
        for _ in range(args.rounds):
            cpu0, t0 = cpu_seconds(_SERVER_PID), time.monotonic()
            alone, _ = asyncio.run(
                timed_phase(url, phase, True, report.threads_alone, report.contention_alone)
            )
            cpu1, t1 = cpu_seconds(_SERVER_PID), time.monotonic()
            abuser.start()
            during, health = asyncio.run(
                timed_phase(url, phase, True, report.threads_abuse, report.contention_abuse)
            )
            cpu2, t2 = cpu_seconds(_SERVER_PID), time.monotonic()
            abuser.stop()
            report.baseline_ms += alone
            report.during_ms += during
            report.health_ms += health
            report.rounds.append((_median(alone), _median(during)))
            report.server_cpu_alone.append((cpu1 - cpu0) / (t1 - t0))
            report.server_cpu_abuse.append((cpu2 - cpu1) / (t2 - t1))
        result = abuser.finish()
    finally:
        abuser.kill()
    for name, statuses in result["statuses"].items():
        report.abuse.setdefault(name, []).extend(statuses)
    report.unexpected += result["unexpected"]
    report.slow_opened, report.slow_closed = result["slow"]["opened"], result["slow"]["closed"]
    report.abuser_cpu_s, report.abuse_wall_s = result["cpu_s"], result["wall_s"]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("inf")


async def rss_soak(url: str, seconds: float, clients: int) -> list[tuple[float, int]]:
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    until = start + seconds

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < until:
                await normal_request(session, url)

    async def sample() -> None:
        while time.monotonic() < until:
            samples.append((time.monotonic() - start, rss_bytes()))
            await asyncio.sleep(max(0.2, seconds / 60))

    await asyncio.gather(sample(), *(client() for _ in range(clients)))
    samples.append((time.monotonic() - start, rss_bytes()))
    return samples


def build_server(args: argparse.Namespace) -> Any:
    from engine import EngineArgs, LLMEngine
    from engine.server import OpenAIServer, ServerConfig, ServerThread

    model = args.model
    if model is None:
        from engine.demo import demo_model_path

        model = str(demo_model_path())
    engine = LLMEngine(EngineArgs(model=model, max_model_len=args.max_model_len, seed=0))
    config = ServerConfig(
        served_model_names=(MODEL,),
        log_stats_interval=None,
        access_log=False,
        trust_request_chat_template=True,
        chat_template_timeout=args.chat_template_timeout,
        max_connections=args.max_connections,
        request_header_timeout=args.request_header_timeout,
    )
    return ServerThread(OpenAIServer(engine, config))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: demo model)")
    p.add_argument("--base-url", default=None, help="drive this server instead of one in-process")
    p.add_argument("--served-model-name", default=MODEL)
    p.add_argument("--server-pid", type=int, default=None, help="the --base-url server's pid")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of abuse in all")
    p.add_argument("--rounds", type=int, default=3, help="alone / abuse phase pairs")
    p.add_argument("--abuser-nice", type=int, default=0, help="the abusive client's niceness")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated parts of abusive request names to send (and 'slow' for the slow "
        "connections); default: all",
    )
    p.add_argument("--slow-connections", type=int, default=None)
    p.add_argument("--max-connections", type=int, default=200)
    p.add_argument("--request-header-timeout", type=float, default=5.0)
    p.add_argument("--chat-template-timeout", type=float, default=2.0)
    p.add_argument("--scale", type=float, default=1.0, help="size factor of the big bodies")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of RSS soak (0: none)")
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--max-health-ms", type=float, default=1000.0)
    p.add_argument("--max-latency-ratio", type=float, default=2.0)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="~20 s, small bodies (tests)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.slow_connections is None:
        args.slow_connections = args.max_connections // 2
    if args.quick:
        args.duration, args.rounds, args.slow_connections = 4.0, 2, 10
        args.max_connections, args.request_header_timeout = 40, 1.0
        args.chat_template_timeout, args.scale = 0.5, 0.05
        args.soak = min(args.soak, 3.0) if args.soak else 0.0
        # A shared 2-core test machine: check the mechanics, not the latency ratios.
        args.max_latency_ratio, args.max_health_ms, args.max_rss_growth = 50.0, 5000.0, 1.0
    return args


def summarize(args: argparse.Namespace, report: Report, soak: list) -> tuple[dict, dict]:
    base = _median(report.baseline_ms)
    during = _median(report.during_ms)
    worst_health = max(report.health_ms, default=float("inf"))
    ratio = during / base
    checks = {
        "every abusive request got its expected status": not report.unexpected,
        f"/health always answered within {args.max_health_ms:g} ms": worst_health
        <= args.max_health_ms,
        f"normal median latency under abuse within {args.max_latency_ratio:g}x of alone": ratio
        <= args.max_latency_ratio,
        "the server closed every slow connection": report.slow_closed == report.slow_opened,
    }
    abuser_cores = report.abuser_cpu_s / report.abuse_wall_s if report.abuse_wall_s else 0.0
    print(
        f"abuse: {args.rounds} rounds of {args.duration / args.rounds:g} s alone + "
        f"{args.duration / args.rounds:g} s under abuse, scale {args.scale:g}, abusive client "
        f"niceness {args.abuser_nice}"
    )
    print("| round | normal p50 alone | normal p50 under abuse | ratio |")
    print("|---|---|---|---|")
    for i, (alone, abused) in enumerate(report.rounds, 1):
        print(f"| {i} | {alone:.1f} ms | {abused:.1f} ms | {abused / alone:.2f}x |")
    print("| abusive request | sent | statuses |")
    print("|---|---|---|")
    for name, statuses in report.abuse.items():
        counts = {s: statuses.count(s) for s in sorted(set(statuses), key=str)}
        print(f"| {name} | {len(statuses)} | {counts} |")
    server_cpu = ""
    if report.server_cpu_alone:
        server_cpu = (
            f"; server process CPU {statistics.mean(report.server_cpu_alone):.2f} cores alone, "
            f"{statistics.mean(report.server_cpu_abuse):.2f} under abuse"
            + ("" if args.base_url else " (in-process: the normal client included)")
        )
    print(
        f"abusive client CPU: {abuser_cores:.2f} cores during the abuse phases "
        f"({os.cpu_count()} cores here){server_cpu}"
    )
    gauges = _gauges_line(report)
    if gauges:
        print(gauges)
    result: dict[str, Any] = {
        "checks": checks,
        "unexpected": report.unexpected[:20],
        "normal_p50_alone_ms": base,
        "normal_p50_abuse_ms": during,
        "ratio": ratio,
        "health_max_ms": worst_health,
        "abuser_cpu_cores": abuser_cores,
        "rounds": report.rounds,
        "engine_threads": {"alone": report.threads_alone, "abuse": report.threads_abuse},
        "contention_cores": {"alone": report.contention_alone, "abuse": report.contention_abuse},
    }
    if soak:
        warm = [v for t, v in soak if t >= 0.2 * args.soak] or [soak[-1][1]]
        growth = (max(warm) - warm[0]) / warm[0]
        checks[f"RSS within {args.max_rss_growth:.0%} after warm-up"] = (
            growth <= args.max_rss_growth
        )
        print(
            f"RSS soak: {args.soak:g} s, {args.soak_clients} clients: "
            f"{warm[0] / 2**20:.0f} MiB after warm-up, max {max(warm) / 2**20:.0f} MiB, "
            f"end {soak[-1][1] / 2**20:.0f} MiB ({growth:+.1%})"
        )
        result["rss_mib"] = [(round(t, 1), v / 2**20) for t, v in soak]
    print("summary:")
    print("| normal p50 alone | normal p50 under abuse | ratio | /health max | health checks |")
    print("|---|---|---|---|---|")
    print(
        f"| {base:.1f} ms | {during:.1f} ms | {ratio:.2f}x | {worst_health:.1f} ms | "
        f"{len(report.health_ms)} |"
    )
    print(f"slow connections closed by the server: {report.slow_closed} / {report.slow_opened}")
    return checks, result


def _gauges_line(report: Report) -> str:
    """The engine's CPU threads (mean, and share of samples below the maximum) and contention
    signal (mean / max) per kind of phase; empty when the server exposes neither."""
    if not (report.threads_alone or report.threads_abuse):
        return ""
    top = max(report.threads_alone + report.threads_abuse)

    def threads(samples: list[float]) -> str:
        if not samples:
            return "-"
        reduced = sum(1 for t in samples if t < top) / len(samples)
        return f"{statistics.mean(samples):.2f} ({reduced:.0%} of samples reserved)"

    def signal(samples: list[float]) -> str:
        return f"{statistics.mean(samples):.2f} / {max(samples):.2f}" if samples else "-"

    return (
        f"engine CPU threads: alone {threads(report.threads_alone)}, under abuse "
        f"{threads(report.threads_abuse)}; contention signal (cores, mean / max): alone "
        f"{signal(report.contention_alone)}, under abuse {signal(report.contention_abuse)}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--abuser-child"]:
        return abuser_child(argv[1:])
    args = parse_args(argv)
    report = Report()
    soak: list[tuple[float, int]] = []
    global MODEL, _SERVER_PID
    MODEL, _SERVER_PID = args.served_model_name, args.server_pid
    with contextlib.ExitStack() as stack:
        url = args.base_url or stack.enter_context(build_server(args)).url
        run_rounds(url, args, report)
        if args.soak:
            soak = asyncio.run(rss_soak(url, args.soak, args.soak_clients))
    checks, result = summarize(args, report, soak)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    for line in report.unexpected[:5]:
        print(f"  unexpected: {line}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
