"""Fault-injection soak: a server under mixed load where steps fail, clients vanish and requests
are aborted; afterwards nothing is wrong.

    python bench/fault_soak.py --duration 300            # several minutes (the README's run)
    python bench/fault_soak.py --quick                   # seconds (the test suite runs this)

Runs an in-process server (the demo model unless --model; float64, so seeded sampling is exact
whatever the batch) and, for --duration seconds, --clients concurrent clients that send a fixed
set of seeded requests (completions and chat, streaming or not, n = 1 or 2) in random order. At
random:

* a step fails (probability --fault-rate per step): half the faults are raised through the
  AsyncEngine's `fault_hook` before a step, half inside the step's forward (the model runner),
  after the scheduler has committed to the step: the engine must roll back, the server fails
  only that step's requests (500 / SSE error event) and keeps serving;
* a streaming client disconnects after a few chunks (--disconnect-rate);
* a client gives up on a non-streaming request after a short timeout (--abort-rate).

Afterwards it checks, and exits non-zero unless all hold: every request that completed
returned exactly the text and finish reason of the same request in a clean run (no faults, one
at a time) before the soak; no request is running or waiting and no KV block is in use; the
server still answers; resident memory (RSS) grew by at most --max-rss-growth from the end of
the warm-up (the first --warmup fraction of the soak) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    mismatched: int = 0
    failed_by_fault: int = 0
    disconnected: int = 0
    aborted: int = 0
    other_errors: list[str] = field(default_factory=list)
    faults: int = 0


def rss_bytes() -> int:
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def workload(num: int, max_tokens: int, model: str) -> list[tuple[str, dict[str, Any]]]:
    """(route, body) pairs: seeded, so each has one right answer whatever else runs."""
    rng = random.Random(0)
    words = ["the", "river", "stone", "light", "bread", "sea", "old", "man", "came", "year"]
    items = []
    for i in range(num):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 24)))
        common = {
            "model": model,
            "max_tokens": rng.randint(4, max_tokens),
            "temperature": rng.choice([0.0, 0.8]),
            "seed": i,
            "n": rng.choice([1, 1, 2]),
            "ignore_eos": True,
        }
        if i % 3 == 2:
            items.append(
                (
                    "/v1/chat/completions",
                    {**common, "messages": [{"role": "user", "content": text}]},
                )
            )
        else:
            items.append(("/v1/completions", {**common, "prompt": text}))
    return items


def choices_of(body: dict[str, Any]) -> list[tuple[str, str | None]]:
    out = []
    for c in sorted(body["choices"], key=lambda c: c["index"]):
        text = c["text"] if "text" in c else c["message"]["content"]
        out.append((text, c["finish_reason"]))
    return out


async def request_once(
    session: aiohttp.ClientSession, url: str, route: str, body: dict[str, Any]
) -> list[tuple[str, str | None]]:
    async with session.post(url + route, json=body) as response:
        payload = await response.json()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload['error']['message'][:200]}")
        return choices_of(payload)


async def stream_once(
    session: aiohttp.ClientSession,
    url: str,
    route: str,
    body: dict[str, Any],
    disconnect_after: int | None,
) -> list[tuple[str, str | None]] | None:
    """The joined stream; None when it disconnected on purpose."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    events = 0
    async with session.post(url + route, json={**body, "stream": True}) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']['message'][:200]}")
            for c in chunk["choices"]:
                piece = c.get("text")
                if piece is None:
                    piece = c.get("delta", {}).get("content") or ""
                texts.setdefault(c["index"], []).append(piece)
                if c.get("finish_reason"):
                    finish[c["index"]] = c["finish_reason"]
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                return None  # leaving the block closes the connection mid-stream
    return [("".join(texts[i]), finish.get(i)) for i in sorted(texts)]


async def clean_run(url: str, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async with aiohttp.ClientSession() as session:
        return [await request_once(session, url, route, body) for route, body in items]


async def client_loop(
    url: str,
    items: list[tuple[str, dict[str, Any]]],
    expected: list[Any],
    deadline: float,
    args: argparse.Namespace,
    rng: random.Random,
    tally: Tally,
) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            index = rng.randrange(len(items))
            route, body = items[index]
            tally.sent += 1
            streaming = rng.random() < 0.5
            try:
                if streaming:
                    cut = rng.randint(1, 3) if rng.random() < args.disconnect_rate else None
                    got = await stream_once(session, url, route, body, cut)
                    if got is None:
                        tally.disconnected += 1
                        continue
                elif rng.random() < args.abort_rate:
                    try:
                        await asyncio.wait_for(
                            request_once(session, url, route, body), rng.uniform(0.001, 0.05)
                        )
                    except TimeoutError:
                        tally.aborted += 1
                        continue
                    got = None
                else:
                    got = await request_once(session, url, route, body)
            except RuntimeError as e:
                if "injected" in str(e):
                    tally.failed_by_fault += 1
                else:
                    tally.other_errors.append(str(e))
                continue
            if got is None:
                continue  # an abort that finished first: nothing to compare
            if got == expected[index]:
                tally.ok += 1
            else:
                tally.mismatched += 1
                tally.other_errors.append(f"request {index}: {got} != {expected[index]}")


def install_faults(server: Any, rate: float, seed: int, tally: Tally) -> threading.Event:
    """Random step failures: before a step (AsyncEngine.fault_hook) and inside its forward,
    until the returned event is set."""
    rng = random.Random(seed)
    lock = threading.Lock()
    stop = threading.Event()

    def roll() -> bool:
        if stop.is_set():
            return False
        with lock:
            hit = rng.random() < rate / 2
        if hit:
            tally.faults += 1
        return hit

    def before_step() -> None:
        if roll():
            raise RuntimeError("injected fault before the step")

    server.async_engine.fault_hook = before_step
    runner = getattr(server.async_engine.engine, "runner", None)
    if runner is not None and hasattr(runner, "execute"):
        real_execute = runner.execute

        def execute(*a: Any, **k: Any) -> Any:
            if roll():
                raise RuntimeError("injected fault inside the forward")
            return real_execute(*a, **k)

        runner.execute = execute
    return stop


async def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(url + "/metrics") as response:
                text = await response.text()
            values = {}
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in (
                    "vllm:num_requests_running",
                    "vllm:num_requests_waiting",
                    "vllm:kv_cache_usage_perc",
                ):
                    values[name] = float(line.rsplit(" ", 1)[1])
            if not any(values.values()) or time.monotonic() > deadline:
                return values
            await asyncio.sleep(0.05)


def build_server(args: argparse.Namespace) -> Any:
    from engine import EngineArgs, LLMEngine
    from engine.server import OpenAIServer, ServerConfig, ServerThread

    model = args.model
    if model is None:
        from engine.demo import demo_model_path

        model = str(demo_model_path())
    engine = LLMEngine(
        EngineArgs(
            model=model,
            dtype=args.dtype,
            seed=0,
            max_model_len=args.max_model_len,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        )
    )
    config = ServerConfig(
        served_model_names=("soak",),
        log_stats_interval=None,
        access_log=False,
        max_waiting_requests=None,
    )
    return ServerThread(OpenAIServer(engine, config))


async def soak(url: str, server: Any, args: argparse.Namespace) -> dict[str, Any]:
    items = workload(args.num_requests, args.max_tokens, "soak")
    expected = await clean_run(url, items)
    tally = Tally()
    faults_off = install_faults(server, args.fault_rate, args.seed, tally)
    start = time.monotonic()
    deadline = start + args.duration
    rss: list[tuple[float, int]] = []

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, rss_bytes()))
            await asyncio.sleep(max(0.2, args.duration / 50))

    rngs = [random.Random(args.seed * 1000 + i) for i in range(args.clients)]
    await asyncio.gather(
        sample_rss(),
        *(client_loop(url, items, expected, deadline, args, rng, tally) for rng in rngs),
    )
    faults_off.set()
    idle = await wait_idle(url)
    after = await clean_run(url, items[:5])
    rss.append((time.monotonic() - start, rss_bytes()))
    warm = [value for t, value in rss if t >= args.warmup * args.duration] or [rss[-1][1]]
    growth = (rss[-1][1] - warm[0]) / warm[0]
    return {
        "tally": tally,
        "idle": idle,
        "still_serves_correctly": after == expected[:5],
        "engine_running": server.async_engine.is_running,
        "rss_start_mib": warm[0] / 2**20,
        "rss_end_mib": rss[-1][1] / 2**20,
        "rss_growth": growth,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: demo model)")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=64 * 2**20)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=40, help="distinct seeded requests")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--fault-rate", type=float, default=0.02, help="probability per step")
    p.add_argument("--disconnect-rate", type=float, default=0.15)
    p.add_argument("--abort-rate", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of --duration")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few seconds (tests)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true", help="keep the engine's error logs")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.clients, args.num_requests = 4.0, 4, 8
        args.max_tokens, args.fault_rate, args.max_rss_growth = 12, 0.1, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:  # every injected fault logs a traceback; keep the table readable
        for name in ("engine.async_engine", "engine.server", "engine.engine"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with build_server(args) as thread:
        result = asyncio.run(soak(thread.url, thread.server, args))
    tally: Tally = result["tally"]
    checks = {
        "every completed request equals the clean run": tally.mismatched == 0 and tally.ok > 0,
        "no other errors": not tally.other_errors,
        "nothing running or waiting, no block in use": not any(result["idle"].values()),
        "engine running and still correct": result["engine_running"]
        and result["still_serves_correctly"],
        f"RSS grew at most {args.max_rss_growth:.0%}": result["rss_growth"] <= args.max_rss_growth,
    }
    print(f"fault soak: {args.duration:g} s, {args.clients} clients, fault rate {args.fault_rate}")
    print(
        "| sent | completed and equal | mismatched | failed by a fault | disconnected | aborted |"
        " faults injected | RSS after warm-up -> end |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {tally.sent} | {tally.ok} | {tally.mismatched} | {tally.failed_by_fault} | "
        f"{tally.disconnected} | {tally.aborted} | {tally.faults} | "
        f"{result['rss_start_mib']:.0f} -> {result['rss_end_mib']:.0f} MiB "
        f"({result['rss_growth']:+.1%}) |"
    )
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    for error in tally.other_errors[:5]:
        print(f"  error: {error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    **{k: v for k, v in result.items() if k != "tally"},
                    "tally": {**tally.__dict__, "other_errors": tally.other_errors[:20]},
                    "checks": checks,
                },
                f,
                indent=1,
            )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
