"""oneDNN packed linears: memory over many distinct row counts, and the cost of row buckets.

    python bench/onednn_rows.py [--quick] [--max-rows N]
    python bench/onednn_rows.py --engine [--model M]    # RSS of the engine over prompt lengths

Prints (1) RSS growth after running one packed weight at every row count 1..N, exactly
(`_onednn_linear_exact`, what the engine did before buckets) and through the row buckets
(`onednn_linear`); (2) the time of one SmolLM-135M layer's four weight GEMMs at sampled row
counts, exact vs bucketed (best of several interleaved runs), and their ratio: the price of the
padding. Each memory measurement runs in a fresh process, so neither inherits the other's state.

--engine: the engine itself (float32, unquantized, default: the bundled SmolLM2 if installed)
runs one prompt of every length 1..N after a warm-up over the buckets, once with the buckets and
once with them switched off (every row count as is, the old behaviour), and prints the RSS growth
of each (measured: 0 MiB vs 383 MiB for lengths 1..299 on SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

# A SmolLM-135M layer's linears (out, in): fused q/k/v, o, fused gate/up, down.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def memory_child(mode: str, max_rows: int, size: int) -> dict[str, float]:
    from engine.models.cpu_gemm import (
        _onednn_linear_exact,
        onednn_linear,
        onednn_row_buckets,
        pack_weight,
    )

    torch.set_num_threads(1)
    w = pack_weight(torch.randn(size, size))
    run = onednn_linear if mode == "buckets" else _onednn_linear_exact
    for rows in onednn_row_buckets():  # warm up: every bucket once
        run(torch.randn(rows, size), w, None)
    before = _rss_mb()
    for rows in range(1, max_rows + 1):
        run(torch.randn(rows, size), w, None)
    return {"rss_growth_mb": _rss_mb() - before}


def measure_memory(mode: str, max_rows: int, size: int, model: str | None = None) -> float:
    extra = ["--engine", "--model", model] if model else []
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--max-rows",
            str(max_rows),
            "--size",
            str(size),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_mb"]


def engine_child(mode: str, max_rows: int, model: str) -> dict[str, float]:
    import engine.models.cpu_gemm as cpu_gemm

    if mode == "exact":
        cpu_gemm.onednn_row_bucket = lambda rows: rows  # the old behaviour
    from engine import LLM, SamplingParams

    llm = LLM(
        model,
        dtype="float32",
        quantization="none",
        max_model_len=max_rows + 8,
        kv_cache_memory_bytes=2**26,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for rows in cpu_gemm.onednn_row_buckets():  # warm up: every bucket once
        if rows <= max_rows:
            llm.generate([[5] * rows], params, use_tqdm=False)
    before = _rss_mb()
    for rows in range(1, max_rows + 1):
        llm.generate([[7 + rows % 50] * rows], params, use_tqdm=False)
    return {"rss_growth_mb": _rss_mb() - before}


def measure_time(rows_list: list[int], repeats: int) -> list[tuple[int, float, float]]:
    from engine.models.cpu_gemm import _onednn_linear_exact, onednn_linear, pack_weight

    weights = [(i, pack_weight(torch.randn(o, i))) for o, i in LAYER_SHAPES]

    def step(rows: int, fn) -> float:
        xs = [torch.randn(rows, i) for i, _ in weights]
        start = time.perf_counter()
        for x, (_, w) in zip(xs, weights, strict=True):
            fn(x, w, None)
        return time.perf_counter() - start

    results = []
    for rows in rows_list:
        step(rows, onednn_linear), step(rows, _onednn_linear_exact)  # warm up
        exact = bucketed = float("inf")
        for _ in range(repeats):  # interleaved, best of
            exact = min(exact, step(rows, _onednn_linear_exact))
            bucketed = min(bucketed, step(rows, onednn_linear))
        results.append((rows, exact * 1e3, bucketed * 1e3))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="square weight for the memory run")
    parser.add_argument("--engine", action="store_true", help="measure the engine's RSS")
    parser.add_argument("--model", default=None, help="with --engine (default: bundled)")
    parser.add_argument("--child", choices=["exact", "buckets"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_rows = args.max_rows or (120 if args.quick else 700)
    size = args.size or (64 if args.quick else 576)
    if args.child:
        if args.engine:
            print(json.dumps(engine_child(args.child, max_rows, args.model)))
        else:
            print(json.dumps(memory_child(args.child, max_rows, size)))
        return
    if args.engine:
        from engine.demo import demo_model_path
        from engine.models.bundled import default_model_path

        model = args.model or default_model_path() or str(demo_model_path())
        rows = args.max_rows or (40 if args.quick else 299)
        print(f"engine RSS growth over prompt lengths 1..{rows} after a warm-up, {model}:")
        for mode in ("exact", "buckets"):
            print(f"  {mode:8s} {measure_memory(mode, rows, size, model):8.1f} MB")
        return
    if not torch.backends.mkldnn.is_available():
        print("oneDNN is not available in this torch build")
        return
    print(f"RSS growth over row counts 1..{max_rows}, one {size} x {size} packed weight:")
    for mode in ("exact", "buckets"):
        print(f"  {mode:8s} {measure_memory(mode, max_rows, size):8.1f} MB")
    rows_list = (
        [1, 9, 33, 65, 130, 257] if args.quick else [1, 4, 9, 17, 33, 65, 100, 130, 257, 700]
    )
    print("one SmolLM-135M layer's weight GEMMs (1 thread, best of runs): ms exact / bucketed")
    print(f"{'rows':>6} {'bucket':>6} {'exact':>8} {'bucketed':>9} {'ratio':>6}")
    from engine.models.cpu_gemm import onednn_row_bucket

    for rows, exact, bucketed in measure_time(rows_list, 3 if args.quick else 15):
        bucket = onednn_row_bucket(min(rows, 512))
        print(f"{rows:6d} {bucket:6d} {exact:8.2f} {bucketed:9.2f} {bucketed / exact:6.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
