"""Load generator for any OpenAI-compatible server (this engine, vLLM, llama.cpp's server...).

    python bench/serve.py --base-url http://127.0.0.1:8000 --concurrency 1 4 16 \\
        --num-prompts 64 --input-len 64 --output-len 64

Sends `--num-prompts` streaming requests per level, either with a fixed number in flight
(`--concurrency`) or arriving as a Poisson process (`--request-rate` requests/s, optionally also
capped by `--concurrency`); each level gets its own random prompts, so a server's prefix cache
gains nothing from the previous level. It prints one table row per level: request and token
throughput, and p50/p90/p99 of TTFT (time to first token), TPOT (time per output token after the
first), ITL (gap between successive streamed chunks) and end-to-end latency. The last column is
the level's output throughput divided by the first level's, measured in the same run.

Only the standard library and aiohttp are used, so it runs without the engine installed. Output
token counts come from the server's `usage` (requested with `stream_options.include_usage`);
when a server sends none, each non-empty chunk counts as one token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import aiohttp

# Common English words: with a BPE tokenizer most are one token, so a prompt of N words is
# roughly N tokens on any model (the table reports the real count from the server's usage).
_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or had not but have they one their you all we there been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three light sea river bread stone"
)
_WORDS = _WORD_LIST.split()


@dataclass(frozen=True, slots=True)
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: tuple[float, ...] = ()
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class LevelResult:
    concurrency: int | None
    request_rate: float
    num_ok: int
    num_failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def request_throughput(self) -> float:
        return self.num_ok / self.duration_s if self.duration_s else 0.0

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    @property
    def total_throughput(self) -> float:
        total = self.prompt_tokens + self.output_tokens
        return total / self.duration_s if self.duration_s else 0.0


PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    stats = {f"p{q}": 1000.0 * percentile(values, q) for q in PERCENTILES}
    stats["mean"] = 1000.0 * sum(values) / len(values) if values else math.nan
    return stats


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Gaps before each request: 0 for an infinite rate, else exponential with mean 1/rate."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(num)]


def make_prompts(num: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(num)]


def _request_body(args: argparse.Namespace, model: str, prompt: str) -> tuple[str, dict]:
    body: dict = {
        "model": model,
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension; OpenAI-compatible servers ignore it
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


async def one_request(
    session: aiohttp.ClientSession, args: argparse.Namespace, model: str, prompt: str
) -> RequestResult:
    path, body = _request_body(args, model, prompt)
    start = time.perf_counter()
    ttft = 0.0
    last = start
    itl: list[float] = []
    chunks = 0
    usage: dict | None = None
    try:
        async with session.post(args.base_url + path, json=body) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                return RequestResult(ok=False, error=f"HTTP {response.status}: {text}")
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestResult(ok=False, error=str(event["error"])[:200])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last = now
                    chunks += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}"[:200])
    end = time.perf_counter()
    if chunks == 0:
        return RequestResult(ok=False, error="no output chunk")
    return RequestResult(
        ok=True,
        prompt_tokens=int(usage["prompt_tokens"]) if usage else 0,
        output_tokens=int(usage["completion_tokens"]) if usage else chunks,
        ttft_s=ttft,
        e2e_s=end - start,
        itl_s=tuple(itl),
    )


async def run_level(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    model: str,
    prompts: list[str],
    concurrency: int | None,
    rate: float,
) -> LevelResult:
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def limited(prompt: str) -> RequestResult:
        if limit is None:
            return await one_request(session, args, model, prompt)
        async with limit:
            return await one_request(session, args, model, prompt)

    tasks = []
    start = time.perf_counter()
    for prompt, delay in zip(prompts, arrival_delays(len(prompts), rate, args.seed), strict=True):
        if delay:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(prompt)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    return LevelResult(
        concurrency=concurrency,
        request_rate=rate,
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=sum(r.output_tokens for r in ok),
        ttft_ms=summary_ms([r.ttft_s for r in ok]),
        tpot_ms=summary_ms([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=summary_ms([gap for r in ok for gap in r.itl_s]),
        e2e_ms=summary_ms([r.e2e_s for r in ok]),
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )


def format_table(levels: list[LevelResult]) -> str:
    def trio(stats: dict[str, float]) -> str:
        return " / ".join(f"{stats[f'p{q}']:.1f}" for q in PERCENTILES)

    header = (
        "| concurrency | rate (req/s) | ok / failed | req/s | output tok/s | total tok/s "
        "| TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 | E2E ms p50/p90/p99 "
        "| output tok/s vs first row |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base = levels[0].output_throughput if levels else 0.0
    for level in levels:
        ratio = level.output_throughput / base if base else math.nan
        lines.append(
            f"| {level.concurrency or 'unbounded'} "
            f"| {'inf' if math.isinf(level.request_rate) else f'{level.request_rate:g}'} "
            f"| {level.num_ok} / {level.num_failed} | {level.request_throughput:.2f} "
            f"| {level.output_throughput:.1f} | {level.total_throughput:.1f} "
            f"| {trio(level.ttft_ms)} | {trio(level.tpot_ms)} | {trio(level.itl_ms)} "
            f"| {trio(level.e2e_ms)} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


async def _resolve_model(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(base_url + "/v1/models") as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def run(args: argparse.Namespace) -> list[LevelResult]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    # One connection per request: reusing a kept-alive connection that the server is closing at
    # that moment fails the request (seen with llama-server at 32 streams); a loopback connect
    # costs well under a millisecond against requests of seconds.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector
    ) as session:
        model = args.model or await _resolve_model(session, args.base_url)
        if args.warmup:
            warmup_prompt = make_prompts(1, args.input_len, seed=args.seed - 1)[0]
            await one_request(session, args, model, warmup_prompt)
        levels = []
        for concurrency in args.concurrency or [None]:
            for rate in args.request_rate:
                # Fresh prompts per level: a server with prefix caching must not get the
                # previous level's prompts for free.
                seed = args.seed + 1000 * (len(levels) + 1)
                prompts = make_prompts(args.num_prompts, args.input_len, seed)
                level = await run_level(session, args, model, prompts, concurrency, rate)
                levels.append(level)
                if args.verbose:
                    print(format_table([level]).splitlines()[-1], file=sys.stderr)
        return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/serve.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64, help="requests per level")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="requests in flight; one level per value (default: unbounded)",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="Poisson arrival rate in requests/s; one level per value (default inf: all at once)",
    )
    p.add_argument("--input-len", type=int, default=64, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at EOS (by default they generate --output-len tokens)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--verbose", action="store_true", help="print each level as it finishes")
    return p


def main(argv: list[str] | None = None) -> list[LevelResult]:
    args = build_parser().parse_args(argv)
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    levels = asyncio.run(run(args))
    print(
        f"{args.num_prompts} requests per level, {args.endpoint}, input ~{args.input_len} words, "
        f"output {args.output_len} tokens, {args.base_url}"
    )
    print(format_table(levels))
    for level in levels:
        for error in level.errors:
            print(f"error (concurrency {level.concurrency}): {error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            records = [
                {
                    **asdict(level),
                    "request_throughput": level.request_throughput,
                    "output_throughput": level.output_throughput,
                    "total_throughput": level.total_throughput,
                }
                for level in levels
            ]
            json.dump(records, f, indent=2)
    return levels


if __name__ == "__main__":
    results = main()
    sys.exit(1 if any(level.num_failed for level in results) else 0)
