"""1 vs 2 engine replicas behind Ray Serve (one thread each), under bench/serve.py's load.

    python bench/replicas.py --model demo --replicas 1 2 --concurrency 16 \\
        --num-prompts 128 --input-len 64 --output-len 64 [engine flags...]
    python bench/replicas.py --quick          # a smoke run in well under a minute of load

For each configuration it starts the server, drives it with bench/serve.py's load generator
(its `run`: streaming requests at each `--concurrency` level, fresh random prompts per level) and
stops it:

* `direct`: `python -m engine.server` in a subprocess with OMP_NUM_THREADS=1 (no Ray: what one
  replica costs without the proxy, the ingress and the relay);
* `ray xN`: `engine.serve.ray` with N replicas of `--num-threads-per-replica` threads, on a local
  Ray cluster (or the one this process already joined).

It prints bench/serve.py's table per configuration, then one summary row per configuration and
level with output throughput relative to one Ray replica at that level, measured in the same run.
Unknown flags go to the engine (`--max-num-seqs 64`, `--dtype float32`...). Ray must be installed
(`pip install -e .[ray]`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engine.server.thread import free_port

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
bench_serve = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = bench_serve  # its dataclasses look their module up there
_spec.loader.exec_module(bench_serve)

QUICK = dict(concurrency=[4], num_prompts=8, input_len=16, output_len=8, model="demo")


@dataclass(frozen=True, slots=True)
class Row:
    server: str  # "direct" or "ray"
    replicas: int
    level: object  # bench_serve.LevelResult


def _wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


def _load(args: argparse.Namespace, base_url: str) -> list:
    """bench/serve.py's levels against `base_url` (its own parser checks the flags)."""
    argv = [
        "--base-url", base_url, "--num-prompts", str(args.num_prompts),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--concurrency", *map(str, args.concurrency), "--seed", str(args.seed),
    ]  # fmt: skip
    ns = bench_serve.build_parser().parse_args(argv)
    levels = asyncio.run(bench_serve.run(ns))
    print(bench_serve.format_table(levels), flush=True)
    return levels


def _engine_flags(args: argparse.Namespace, engine_argv: list[str]) -> list[str]:
    flags = ["--disable-log-stats", "--disable-access-log", *engine_argv]
    if args.model is not None:
        flags = ["--model", args.model, *flags]
    return flags


def run_direct(args: argparse.Namespace, engine_argv: list[str]) -> list:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.num_threads_per_replica)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "engine.server", "--port", str(port)]
    process = subprocess.Popen([*command, *_engine_flags(args, engine_argv)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, args.start_timeout, process)
        print(f"\n## direct: python -m engine.server, {args.num_threads_per_replica} thread(s)")
        return _load(args, url)
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_ray(args: argparse.Namespace, engine_argv: list[str], replicas: int, url: str) -> list:
    from ray import serve

    from engine.serve.ray import build_app, build_parser

    flags = [
        *_engine_flags(args, engine_argv), "--replicas", str(replicas),
        "--num-threads-per-replica", str(args.num_threads_per_replica),
    ]  # fmt: skip
    name = f"bench-replicas-{replicas}"
    prefix = f"/{name}"
    serve.run(build_app(build_parser().parse_args(flags)), name=name, route_prefix=prefix)
    try:
        _wait_healthy(url + prefix, args.start_timeout)
        print(f"\n## ray x{replicas}: {args.num_threads_per_replica} thread(s) per replica")
        return _load(args, url + prefix)
    finally:
        serve.delete(name)


def summary(rows: list[Row]) -> str:
    """One row per configuration and level; output tok/s relative to 1 Ray replica."""
    base = {
        r.level.concurrency: r.level.output_throughput
        for r in rows
        if r.server == "ray" and r.replicas == 1
    }
    header = (
        "| server | replicas | concurrency | ok / failed | req/s | output tok/s "
        "| TTFT ms p50 | TPOT ms p50 | E2E ms p50 | output tok/s vs 1 Ray replica |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        level = r.level
        ref = base.get(level.concurrency)
        ratio = level.output_throughput / ref if ref else math.nan
        lines.append(
            f"| {r.server} | {r.replicas} | {level.concurrency} "
            f"| {level.num_ok} / {level.num_failed} | {level.request_throughput:.2f} "
            f"| {level.output_throughput:.1f} | {level.ttft_ms['p50']:.1f} "
            f"| {level.tpot_ms['p50']:.1f} | {level.e2e_ms['p50']:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/replicas.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default=None, help="default: python -m engine.server's default")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-threads-per-replica", type=int, default=1)
    p.add_argument("--no-direct", dest="direct", action="store_false", help="skip the direct row")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16])
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take")
    p.add_argument(
        "--serve-url",
        default=None,
        help="the Serve proxy's URL when this process already joined a Ray cluster with Serve "
        "running (tests); default: start a local cluster and Serve on a free port",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: " + str(QUICK))
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    args, engine_argv = build_parser().parse_known_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key != "model" or args.model is None:
                setattr(args, key, value)
    import ray
    from ray import serve

    rows: list[Row] = []
    if args.direct:
        rows += [Row("direct", 1, level) for level in run_direct(args, engine_argv)]
    own_cluster = args.serve_url is None
    url = args.serve_url
    if own_cluster:
        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.num_threads_per_replica)}
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
    try:
        for replicas in args.replicas:
            levels = run_ray(args, engine_argv, replicas, url.rstrip("/"))
            rows += [Row("ray", replicas, level) for level in levels]
    finally:
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
    print(
        f"\n{args.num_prompts} requests per level, input ~{args.input_len} words, output "
        f"{args.output_len} tokens, {args.num_threads_per_replica} thread(s) per server/replica"
    )
    print(summary(rows))
    return rows


if __name__ == "__main__":
    results = main()
    sys.exit(1 if any(r.level.num_failed for r in results) else 0)
