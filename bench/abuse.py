"""Concurrent abuse: hostile and careless requests while /health and normal clients are timed.

    python bench/abuse.py                       # about a minute of abuse (the README's run)
    python bench/abuse.py --soak 600            # also a 10-minute RSS soak of steady load
    python bench/abuse.py --quick               # seconds (the test suite runs this)

Runs an in-process server (the demo model unless --model), or drives one started separately
(`--base-url`, `--served-model-name`, and `--server-pid` for its RSS): a separate process is the
honest measurement, since an in-process server shares the GIL with the abusive clients:

    python -m engine.server --model demo --trust-request-chat-template --max-connections 200 \
        --request-header-timeout 5 --chat-template-timeout 2 --disable-access-log &
    python bench/abuse.py --base-url http://127.0.0.1:8000 --served-model-name demo \
        --server-pid $! --soak 600

First it times normal requests alone
(the baseline); then, for --duration seconds, it keeps these running at once:

* huge `n` (2^63, 100000, n x prompts beyond the waiting limit), expecting 400s;
* slow connections: --slow-connections sockets (default: half the server's --max-connections)
  that send their headers a byte at a time and never finish: each must be closed by the server
  at its header timeout. (Beyond the cap, new connections get a 503 at once: the cap protects
  the process's file handles, not other clients; tests/test_server_limits.py checks it. Sharing
  the cap fairly between clients is a reverse proxy's job.)
* big bodies: a 30 MB prompt string, a 48 MB array of one-character prompts, a 20 MB /tokenize,
  JSON nested 100,000 deep (each a 4xx);
* long stops: 1,000 stop strings of 4,000 characters (400), and the largest allowed stop lists
  on a long generation (200);
* heavy chat templates: loops of 10^10 iterations and 21 MB outputs (the server runs with
  --trust-request-chat-template, so they are rendered and must hit their time / size bounds).

Meanwhile one client polls /health and another sends the baseline's normal requests. It passes
(exit 0) when every abusive request got its expected status, /health never took more than 1 s,
and the normal requests' median latency stayed within 2x the baseline's.

`--soak SECONDS` then runs steady normal load and samples RSS: it passes when RSS after the
warm-up (the first 20%) stays within 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MODEL = "abuse"  # the served model name (--served-model-name with --base-url)
_SERVER_PID: int | None = None  # whose RSS to sample (None: this process)


@dataclass
class Report:
    baseline_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    abuse: dict[str, list[int | str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    slow_closed: int = 0
    slow_opened: int = 0


def rss_bytes() -> int:
    import os

    with open(f"/proc/{_SERVER_PID or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
) -> int:
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
        # The server may close the connection after a 413 while the upload is still going.
        return 413 if "413" in str(e) or isinstance(e, aiohttp.ClientOSError) else -1


def abusive_requests(scale: float) -> list[tuple[str, str, bytes, set[int]]]:
    """(name, path, body, accepted statuses); `scale` shrinks the big ones for --quick."""
    big = int(30 * 2**20 * scale)
    count = int(12 * 2**20 * scale)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    loop_template = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )

    def js(body: Any) -> bytes:
        return json.dumps(body).encode()

    return [
        ("n = 2^63", "/v1/completions", js({"prompt": "hi", "n": 2**63}), {400}),
        ("n = 100000", "/v1/completions", js({"prompt": "hi", "n": 100000}), {400}),
        ("n x prompts", "/v1/completions", js({"prompt": ["hi"] * 200, "n": 200}), {400}),
        ("30 MB prompt", "/v1/completions", js({"prompt": "a" * big}), {400, 413}),
        (
            "12M prompts",
            "/v1/completions",
            b'{"prompt": [' + b'"a",' * count + b'"a"]}',
            {400, 413},
        ),
        ("20 MB tokenize", "/tokenize", js({"prompt": "a" * (big * 2 // 3)}), {400, 413}),
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


async def slow_connections(url: str, count: int, until: float, report: Report) -> None:
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
    report.slow_opened = len(socks)
    loop = asyncio.get_running_loop()
    header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
    sent = 0
    open_socks = list(socks)
    while time.monotonic() < until and open_socks:
        still = []
        for sock in open_socks:
            try:
                sock.send(header[sent : sent + 1] if sent < len(header) else b"a")
                data = sock.recv(1024)
                if data == b"" or data.startswith(b"HTTP/1.1 503"):
                    report.slow_closed += 1
                    sock.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                report.slow_closed += 1
                sock.close()
                continue
            still.append(sock)
        open_socks = still
        sent += 1
        await asyncio.sleep(0.5)
    del loop
    for sock in open_socks:
        sock.close()


async def abuse_phase(url: str, args: argparse.Namespace, report: Report) -> None:
    until = time.monotonic() + args.duration
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def health() -> None:
            while time.monotonic() < until:
                start = time.monotonic()
                async with session.get(url + "/health") as response:
                    await response.read()
                report.health_ms.append((time.monotonic() - start) * 1000)
                await asyncio.sleep(0.1)

        async def normal() -> None:
            while time.monotonic() < until:
                try:
                    report.during_ms.append(await normal_request(session, url))
                except RuntimeError as e:
                    report.unexpected.append(str(e))
                await asyncio.sleep(0.05)

        async def abuser(name: str, path: str, body: bytes, ok: set[int]) -> None:
            while time.monotonic() < until:
                status = await post_raw(session, url, path, body)
                report.abuse.setdefault(name, []).append(status)
                if status not in ok:
                    report.unexpected.append(f"{name}: HTTP {status}, expected {sorted(ok)}")
                await asyncio.sleep(0.2)

        requests = abusive_requests(args.scale)
        await asyncio.gather(
            health(),
            normal(),
            slow_connections(url, args.slow_connections, until, report),
            *(abuser(*item) for item in requests),
        )


async def baseline(url: str, num: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        await normal_request(session, url)  # warm-up
        return [await normal_request(session, url) for _ in range(num)]


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
    p.add_argument("--duration", type=float, default=60.0, help="seconds of abuse")
    p.add_argument("--baseline-requests", type=int, default=20)
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
    p.add_argument("--quick", action="store_true", help="seconds, small bodies (tests)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.slow_connections is None:
        args.slow_connections = args.max_connections // 2
    if args.quick:
        args.duration, args.baseline_requests, args.slow_connections = 5.0, 5, 10
        args.max_connections, args.request_header_timeout = 40, 1.0
        args.chat_template_timeout, args.scale = 0.5, 0.05
        args.soak = min(args.soak, 3.0) if args.soak else 0.0
        # A shared 2-core test machine: check the mechanics, not the latency ratios.
        args.max_latency_ratio, args.max_health_ms, args.max_rss_growth = 50.0, 5000.0, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report()
    soak: list[tuple[float, int]] = []
    global MODEL, _SERVER_PID
    MODEL, _SERVER_PID = args.served_model_name, args.server_pid
    with contextlib.ExitStack() as stack:
        url = args.base_url or stack.enter_context(build_server(args)).url
        report.baseline_ms = asyncio.run(baseline(url, args.baseline_requests))
        asyncio.run(abuse_phase(url, args, report))
        if args.soak:
            soak = asyncio.run(rss_soak(url, args.soak, args.soak_clients))
    base = statistics.median(report.baseline_ms)
    during = statistics.median(report.during_ms) if report.during_ms else float("inf")
    worst_health = max(report.health_ms, default=float("inf"))
    checks = {
        "every abusive request got its expected status": not report.unexpected,
        f"/health always answered within {args.max_health_ms:g} ms": worst_health
        <= args.max_health_ms,
        f"normal median latency within {args.max_latency_ratio:g}x": during
        <= args.max_latency_ratio * base,
        "the server closed every slow connection": report.slow_closed == report.slow_opened,
    }
    print(f"abuse: {args.duration:g} s, scale {args.scale:g}")
    print(
        "| normal p50 alone | normal p50 under abuse | ratio | /health max | health checks |"
        " slow connections closed |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {base:.1f} ms | {during:.1f} ms | {during / base:.2f}x | {worst_health:.1f} ms | "
        f"{len(report.health_ms)} | {report.slow_closed} / {report.slow_opened} |"
    )
    print("| abusive request | sent | statuses |")
    print("|---|---|---|")
    for name, statuses in report.abuse.items():
        counts = {s: statuses.count(s) for s in sorted(set(statuses), key=str)}
        print(f"| {name} | {len(statuses)} | {counts} |")
    result: dict[str, Any] = {"checks": checks, "unexpected": report.unexpected[:20]}
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
