"""Batch-1 decode step A/B: dtypes and thread counts, interleaved, medians.

    python bench/step_ab.py --model DIR --variants float32:2,bfloat16:2     # fp32 vs bf16
    python bench/step_ab.py --model DIR --variants float32:1,float32:2     # 1 vs 2 threads
    python bench/step_ab.py --model DIR --variants bfloat16:2,bfloat16:2:packed   # bag GEMV or not
    python bench/step_ab.py --quick                                         # tiny, seconds

A variant is `dtype:threads`, or `dtype:threads:packed` for an engine loaded with
ENGINE_SPLIT_GEMV=0 (oneDNN's packed weights at every row count: no split GEMV in float32, no bag
GEMV in bfloat16). One engine per dtype (and packed flag) decodes one request (greedy, --prompt-len
prompt); rounds visit the variants in turn, each timing --steps `LLMEngine.step()` calls under
`torch.set_num_threads(threads)`, so a noisy shared machine's drift hits every variant alike. The
table gives the median ms per step, tokens/s and the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default="float32:2,bfloat16:2")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = min(args.rounds, 2), min(args.steps, 2)
    return args


def parse_variant(text: str) -> tuple[str, int, bool]:
    """`dtype:threads[:packed]` -> (dtype, threads, packed)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "packed"):
        raise SystemExit(f"--variants: {text!r} is not dtype:threads or dtype:threads:packed")
    return parts[0], int(parts[1]), len(parts) == 3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import TINY_SHAPE, build_checkpoint

    from engine import EngineArgs, LLMEngine, SamplingParams

    path = Path(args.model) if args.model else build_checkpoint(TINY_SHAPE, "tiny-llama")
    variants = [parse_variant(v) for v in args.variants.split(",")]
    engines: dict[tuple[str, bool], LLMEngine] = {}
    for dtype, _, packed in variants:
        if (dtype, packed) not in engines:
            env = {"ENGINE_SPLIT_GEMV": "0"} if packed else {}  # read while the weights load
            with mock.patch.dict(os.environ, env):
                engines[(dtype, packed)] = LLMEngine(
                    EngineArgs(model=str(path), dtype=dtype, max_model_len=512, max_num_seqs=4)
                )
    prompt = [3 + (i * 7919) % 1000 for i in range(args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    counter = [0]

    def ensure_request(engine: LLMEngine) -> None:
        if not engine.has_unfinished_requests():  # a fresh request, past its prefill
            counter[0] += 1
            engine.add_request(f"r{counter[0]}", prompt, params)
            engine.step()

    times: dict[tuple[str, int, bool], list[float]] = {v: [] for v in variants}
    default_threads = torch.get_num_threads()
    for engine in engines.values():
        for _ in range(3):  # warm
            ensure_request(engine)
            engine.step()
    for _ in range(args.rounds):
        for dtype, threads, packed in variants:
            torch.set_num_threads(threads)
            engine = engines[(dtype, packed)]
            for _ in range(args.steps):
                ensure_request(engine)
                start = time.perf_counter()
                engine.step()
                times[(dtype, threads, packed)].append(time.perf_counter() - start)
    torch.set_num_threads(default_threads)
    base = statistics.median(times[variants[0]])
    header = f"{'variant':24s} {'ms/step':>8s} {'tok/s':>7s} {'vs first':>8s}"
    print(f"{header}  (medians of {args.rounds} rounds x {args.steps} steps)")
    for v in variants:
        med = statistics.median(times[v])
        name = f"{v[0]}:{v[1]}" + (":packed" if v[2] else "")
        print(f"{name:24s} {med * 1e3:8.2f} {1 / med:7.1f} {base / med:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
