"""Offline throughput: the engine against HF transformers `generate` on the same prompts.

    OMP_NUM_THREADS=2 python bench/throughput.py                 # SmolLM-135M-shaped, 128 requests
    python bench/throughput.py --quick                           # tiny model, seconds

The workload is synthetic, fixed by --seed, with a chat-like spread: prompt and output lengths are
log-normal (medians --prompt-median / --output-median tokens, clipped to [8, 4x median]), prompts
are random token ids. Every system generates exactly each request's output length (greedy, end-of-
sequence ignored), so the useful work is identical:

    engine            LLM.generate on all requests at once (continuous batching)
    HF one-at-a-time  model.generate per request (min_new_tokens = max_new_tokens = its length),
                      timed on a systematic sample of --hf-sequential-sample requests: its
                      tokens/s is a rate, the same on a representative sample
    HF static batch   batches of --hf-batch-size requests in arrival order, left-padded with an
                      attention mask; a batch runs until its longest request is done, and only
                      each request's own tokens count as generated

The table gives generated tokens/s, the engine's ratio to each HF mode, and the fraction of the
fp32 GEMM FLOP bound (measured in the same run) reached over all tokens processed: the FLOPs of
every forwarded token (linear layers and attention over its context) plus the LM head at every
sampled position, divided by wall time and by the measured GEMM FLOP/s. The bounds are measured
before and after the systems run, and the higher figure of each counts. The last row is that FLOP
bound itself (every FLOP at the measured GEMM rate, nothing else), with the ratios to HF it would
reach: no system can go faster, so it shows which speedup targets are reachable at all.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    SMOLLM_SHAPE,
    TINY_SHAPE,
    attended_keys,
    best_bounds,
    build_checkpoint,
    format_table,
    measure_bounds,
    model_cost,
)


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def generated_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    num_requests: int,
    prompt_median: int,
    output_median: int,
    vocab: int,
    max_len: int,
    seed: int = 0,
) -> Workload:
    rng = random.Random(seed)

    def lognormal(median: int) -> int:
        value = round(rng.lognormvariate(math.log(median), 0.7))
        return max(8, min(4 * median, value))

    prompts, output_lens = [], []
    for _ in range(num_requests):
        prompt_len, output_len = lognormal(prompt_median), lognormal(output_median)
        prompt_len = min(prompt_len, max_len - output_len)
        # Ids from 3 up skip the demo tokenizer's special tokens.
        prompts.append([rng.randrange(3, vocab) for _ in range(prompt_len)])
        output_lens.append(output_len)
    return Workload(prompts=prompts, output_lens=output_lens)


def run_engine(path: Path, workload: Workload, args: argparse.Namespace) -> float:
    """Seconds for the engine to generate the whole workload (after a warm-up request)."""
    from engine import LLM, SamplingParams

    llm = LLM(
        str(path),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.attention_backend,
        scheduler=args.scheduler,
        seed=0,
    )
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens
    ]
    llm.generate([workload.prompts[0]], params[0], use_tqdm=False)  # warm-up
    profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
    with profiler:
        start = time.perf_counter()
        outputs = llm.generate(workload.prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    if produced != workload.output_lens:
        raise RuntimeError("the engine did not generate the requested number of tokens")
    if args.profile:
        print(profile_table(profiler, elapsed))
    return elapsed


# torch ops by what they do in the engine's step, for --profile.
_OP_KINDS = {
    "aten::mm": "GEMM (linear layers, LM head)",
    "aten::addmm": "GEMM (linear layers, LM head)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention kernel (SDPA)",
    "aten::_scaled_dot_product_efficient_attention": "attention kernel (SDPA)",
    "aten::_scaled_dot_product_flash_attention": "attention kernel (SDPA)",
    "aten::index_select": "KV block gather (index_select)",
}


def profile_table(profiler: torch.profiler.profile, elapsed: float) -> str:
    """Where the engine's wall time went: self time of torch ops by kind; the rest is Python
    (scheduler, input preparation, sampling bookkeeping, detokenization)."""
    seconds: dict[str, float] = {}
    for event in profiler.key_averages():
        kind = _OP_KINDS.get(event.key, "other torch ops")
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    seconds["Python outside torch ops"] = max(0.0, elapsed - sum(seconds.values()))
    rows = [
        [kind, f"{s:.2f}", f"{s / elapsed:.0%}"]
        for kind, s in sorted(seconds.items(), key=lambda item: -item[1])
    ]
    return "engine profile (torch.profiler; wall time includes its overhead)\n" + format_table(
        ["", "seconds", "of wall time"], rows
    )


def load_hf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy generate for a left-padded batch; exactly new_tokens tokens per row."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    if out.shape[1] != width + new_tokens:
        raise RuntimeError("HF generate stopped early")
    return out


def run_hf_sequential(model, workload: Workload, sample: list[int]) -> tuple[float, int]:
    """(seconds, generated tokens) for the sampled requests, one at a time."""
    hf_generate(model, [workload.prompts[0][:8]], 2)  # warm-up
    start = time.perf_counter()
    for i in sample:
        hf_generate(model, [workload.prompts[i]], workload.output_lens[i])
    return time.perf_counter() - start, sum(workload.output_lens[i] for i in sample)


def run_hf_static(model, workload: Workload, batch_size: int) -> float:
    start = time.perf_counter()
    for lo in range(0, len(workload.prompts), batch_size):
        batch = range(lo, min(lo + batch_size, len(workload.prompts)))
        longest = max(workload.output_lens[i] for i in batch)
        hf_generate(model, [workload.prompts[i] for i in batch], longest)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM-135M-shaped)")
    p.add_argument("--quick", action="store_true", help="tiny model, few requests: a smoke run")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--prompt-median", type=int, default=128)
    p.add_argument("--output-median", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--scheduler", default="default")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--hf-sequential-sample", type=int, default=32)
    p.add_argument("--no-hf", action="store_true", help="skip the HF baselines")
    p.add_argument("--profile", action="store_true", help="print where the engine's time goes")
    args = p.parse_args(argv)
    if args.quick:
        args.num_requests = min(args.num_requests, 8)
        args.prompt_median, args.output_median = 16, 8
        args.max_model_len = min(args.max_model_len, 512)
        args.hf_batch_size = min(args.hf_batch_size, 4)
        args.hf_sequential_sample = min(args.hf_sequential_sample, 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is not None:
        path = Path(args.model)
    else:
        shape, name = (TINY_SHAPE, "tiny-llama") if args.quick else (SMOLLM_SHAPE, "smollm-135m")
        path = build_checkpoint(shape, name)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    cost = model_cost(hf_config, dtype)
    workload = make_workload(
        args.num_requests,
        args.prompt_median,
        args.output_median,
        hf_config.vocab_size,
        args.max_model_len,
        args.seed,
    )
    bounds = measure_bounds(quick=args.quick)
    print(bounds.describe())
    prompt_tokens = sum(len(p) for p in workload.prompts)
    print(
        f"model {path.name}: {cost.linear_params / 1e6:.1f}M linear + "
        f"{cost.head_params / 1e6:.1f}M head parameters, {args.dtype} | "
        f"{args.num_requests} requests, {prompt_tokens} prompt tokens, "
        f"{workload.generated_tokens} generated tokens (seed {args.seed})"
    )

    engine_s = run_engine(path, workload, args)
    flops = sum(
        cost.flops(len(p) + n - 1, n, attended_keys(len(p), n))
        for p, n in zip(workload.prompts, workload.output_lens, strict=True)
    )
    engine_tps = workload.generated_tokens / engine_s
    hf: list[tuple[str, float, float]] = []  # (label, seconds, generated tokens/s)
    if not args.no_hf:
        model = load_hf(path, dtype)
        step = max(1, len(workload.prompts) // args.hf_sequential_sample)
        sample = list(range(0, len(workload.prompts), step))[: args.hf_sequential_sample]
        seq_s, seq_tokens = run_hf_sequential(model, workload, sample)
        hf.append((f"HF one-at-a-time ({len(sample)} req)", seq_s, seq_tokens / seq_s))
        static_s = run_hf_static(model, workload, args.hf_batch_size)
        label = f"HF static batches of {args.hf_batch_size}"
        hf.append((label, static_s, workload.generated_tokens / static_s))
    if not args.quick:  # measured again after the runs; the higher figures count
        bounds = best_bounds(bounds, measure_bounds())
        print("after the runs: " + bounds.describe())

    rows = [
        [
            "engine",
            f"{engine_s:.1f}",
            f"{engine_tps:.1f}",
            "1.00",
            f"{flops / engine_s / 1e9:.1f}",
            f"{flops / engine_s / bounds.gemm_flops:.0%}",
        ]
    ]
    rows += [
        [label, f"{s:.1f}", f"{tps:.1f}", f"{engine_tps / tps:.1f}x", "", ""]
        for label, s, tps in hf
    ]
    # The best any system could do on this workload at the measured GEMM rate: all its FLOPs
    # at full speed, nothing else. Ratios to HF above what this row shows are out of reach.
    bound_s = flops / bounds.gemm_flops
    bound_tps = workload.generated_tokens / bound_s
    versus = ", ".join(f"{bound_tps / tps:.1f}x vs {label}" for label, _, tps in hf)
    bound_row = [
        "FLOP bound (no system beats it)",
        f"{bound_s:.1f}",
        f"{bound_tps:.1f}",
        versus,
        "",
        "",
    ]
    rows.append(bound_row)
    print(
        format_table(
            ["system", "seconds", "gen tok/s", "engine speedup", "GFLOP/s", "of GEMM bound"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
