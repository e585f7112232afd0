"""Tensor parallelism on this machine: TP=1 with two threads against TP=2 with one thread per
rank (two gloo processes), offline throughput and batch-1 decode latency, same run.

    python bench/tp.py            # SmolLM-135M-sized Llama with 8 heads / 4 KV heads (TP=2
                                  # needs heads divisible by 2), 32 requests, 128 + 128 tokens
    python bench/tp.py --quick    # tiny model, seconds (the test suite runs this)

Both configurations use the same two cores: TP=1 runs one process with 2 torch threads, TP=2
two processes with 1 thread each. So the comparison isolates what sharding costs or saves at
equal compute: per layer, TP=2 adds two all-reduces of [tokens, hidden] (after o_proj and
down_proj) plus one for the vocab-parallel embedding, a step header broadcast and a logits
gather per step, and each rank's GEMMs are half as wide. On a CPU this is not expected to
speed anything up (the two threads of TP=1 already use both cores; gloo's collectives go
through the kernel's loopback); the point of TP is a model that does not fit one device, and
GPUs with NVLink, where the all-reduce is microseconds.

Printed: generated tokens/s over the offline batch, and the median time of a batch-1 decode
step (one request, after its prompt), with TP=2's ratio to TP=1 from the same run; then the
time of one gloo all-reduce of a decode row measured on the TP=2 engine's own group, and what
the step's 2L + 1 of them add up to.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOLLM_SHAPE, TINY_SHAPE, build_checkpoint, format_table

from engine import LLM, SamplingParams

# SmolLM-135M's sizes, but 8 query / 4 KV heads of 72 (9 / 3 do not split over 2 ranks).
TP_SHAPE = {**SMOLLM_SHAPE, "num_attention_heads": 8, "num_key_value_heads": 4}


def offline_tokens_per_s(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def decode_step_ms(llm: LLM, prompt: list[int], steps: int) -> float:
    """Median wall time of one batch-1 decode step (the prompt's step excluded)."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    engine.add_request("latency", prompt, params)
    engine.step()  # the prompt
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run(
    path: Path, tp: int, threads: int, args: argparse.Namespace
) -> tuple[float, float, float | None]:
    """(offline tokens/s, batch-1 decode ms/step, TP only: seconds per all-reduce of one
    decode row [1, hidden])."""
    torch.set_num_threads(threads)  # TP=2's worker takes the same count (one per rank)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1024) for _ in range(args.prompt_len)] for _ in range(args.n)]
    llm = LLM(
        str(path),
        tensor_parallel_size=tp,
        dtype="float32",
        max_model_len=args.prompt_len + args.output_len + 8,
        max_num_seqs=args.n,
        seed=0,
    )
    try:
        throughput = offline_tokens_per_s(llm, prompts, args.output_len)
        latency = decode_step_ms(llm, prompts[0], args.latency_steps)
        all_reduce_s = None
        executor = llm.llm_engine.executor
        if executor is not None:
            hidden = llm.llm_engine.model_config.hf_config.hidden_size
            all_reduce_s = executor.time_all_reduce((1, hidden), torch.float32, repeats=200)
    finally:
        llm.llm_engine.shutdown()
    return throughput, latency, all_reduce_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and workload (seconds)")
    p.add_argument("--n", type=int, default=None, help="offline requests")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--latency-steps", type=int, default=None)
    args = p.parse_args(argv)
    defaults = (4, 16, 8, 8) if args.quick else (32, 128, 128, 64)
    names = ("n", "prompt_len", "output_len", "latency_steps")
    for name, value in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    shape, name = (TINY_SHAPE, "tp-tiny") if args.quick else (TP_SHAPE, "tp-smollm-8h")
    path = build_checkpoint(shape, name)

    base_tps, base_ms, _ = run(path, tp=1, threads=2, args=args)
    tp_tps, tp_ms, all_reduce_s = run(path, tp=2, threads=1, args=args)
    assert all_reduce_s is not None
    print(
        f"model {name}: {args.n} requests x ({args.prompt_len} prompt + {args.output_len} "
        f"output) tokens; batch-1 decode over {args.latency_steps} steps; float32"
    )
    rows = [
        ["TP=1", "1 x 2", base_tps, "1.00x", base_ms, "1.00x"],
        ["TP=2", "2 x 1", tp_tps, f"{tp_tps / base_tps:.2f}x", tp_ms, f"{tp_ms / base_ms:.2f}x"],
    ]
    headers = [
        "config",
        "processes x threads",
        "offline tok/s",
        "vs TP=1",
        "batch-1 decode ms/step",
        "vs TP=1",
    ]
    print(format_table(headers, rows))
    layers = int(shape["num_hidden_layers"])
    per_step = 2 * layers + 1  # o_proj and down_proj per layer, the embedding
    print(
        f"gloo all-reduce of one decode row [1, {shape['hidden_size']}] float32: "
        f"{all_reduce_s * 1e6:.0f} us; a decode step has {per_step} (2 x {layers} layers + "
        f"the embedding): {per_step * all_reduce_s * 1e3:.2f} ms of TP=2's {tp_ms:.2f} ms/step "
        "(plus the step header and the logits gather)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
