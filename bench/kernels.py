"""Paged attention kernels: the reference backend against the vectorised torch backend.

    OMP_NUM_THREADS=2 python bench/kernels.py                    # SmolLM-135M's attention shape
    python bench/kernels.py --quick                              # a small grid, seconds
    python bench/kernels.py --softcap 50 --query-len 64          # Gemma 2's capped prompt route

One decode step (every request has one query token) over a grid of batch sizes and context
lengths, with the attention shape of SmolLM-135M (9 query heads, 3 KV heads, head_dim 64), block
size 16, float32, each request's blocks scattered through the cache in random order. Contexts in
a row vary (uniformly in [L/2, L]), as they do in a live batch. Per cell: the best time of each
backend, the speedup, and the KV bytes the fast backend reads per second against the memory copy
bandwidth measured in the same run (an attention step must read every context token's K and V
once, so that is its bound).

`--query-len Q` gives every request Q new query tokens (prompt chunks over a cached prefix)
instead of one; `--softcap C` soft-caps the attention logits (Gemma 2), which the torch backend
computes with explicit GEMMs instead of SDPA for prompt chunks.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys

import torch
from common import best_time, format_table, measure_copy_bandwidth


def decode_batch(batch: int, context: int, args: argparse.Namespace, seed: int = 0):
    """q, caches and metadata of one step: contexts uniform in [context / 2, context], each
    request's last args.query_len tokens (at most its context) new."""
    from engine.attention import AttentionMetadata

    rng = random.Random(seed)
    seq_lens = [rng.randint(max(1, context // 2), context) for _ in range(batch)]
    q_lens = [min(args.query_len, s) for s in seq_lens]
    bs = args.block_size
    blocks = [-(-s // bs) for s in seq_lens]
    order = list(range(sum(blocks) + 8))
    rng.shuffle(order)
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    width = max(blocks)
    shape = (sum(blocks) + 8, bs, args.kv_heads, args.head_dim)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=bs,
        query_start_loc_cpu=tuple(qsl),
        seq_lens_cpu=tuple(seq_lens),
    )
    q = torch.randn(qsl[-1], args.q_heads, args.head_dim)
    kv_bytes = 2 * sum(seq_lens) * args.kv_heads * args.head_dim * 4
    return q, k_cache, v_cache, meta, kv_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small grid: a smoke run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--query-len", type=int, default=1, help="new tokens per request (1: decode)")
    p.add_argument("--softcap", type=float, default=None, help="attention-logit soft-cap")
    p.add_argument(
        "--profile",
        type=int,
        nargs=2,
        metavar=("BATCH", "CONTEXT"),
        help="print where the fast backend's time goes at one cell (torch.profiler)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.contexts, args.repeats = [1, 4], [32, 64], 2
    return args


def main(argv: list[str] | None = None) -> int:
    from engine.fast.torch_native import TorchNativeAttention
    from engine.reference.attention import ReferenceAttention

    args = parse_args(argv)
    bandwidth = measure_copy_bandwidth(16 * 2**20 if args.quick else 256 * 2**20)
    print(
        f"memory copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write, {torch.get_num_threads()}"
        f" threads) | decode attention, {args.q_heads} q heads, {args.kv_heads} KV heads, "
        f"head_dim {args.head_dim}, block size {args.block_size}, float32, "
        f"query length {args.query_len}, softcap {args.softcap}"
    )
    reference, fast = ReferenceAttention(), TorchNativeAttention()
    scale = args.head_dim**-0.5
    rows = []
    for batch in args.batch_sizes:
        for context in args.contexts:
            q, k_cache, v_cache, meta, kv_bytes = decode_batch(batch, context, args)
            inputs = (q, k_cache, v_cache, meta, scale, None, args.softcap)
            expected = reference.forward(*inputs)
            torch.testing.assert_close(fast.forward(*inputs), expected, rtol=1e-4, atol=1e-4)
            ref_s = best_time(functools.partial(reference.forward, *inputs), 2)
            fast_s = best_time(functools.partial(fast.forward, *inputs), args.repeats)
            rows.append(
                [
                    batch,
                    context,
                    f"{ref_s * 1e3:.2f}",
                    f"{fast_s * 1e3:.2f}",
                    f"{ref_s / fast_s:.1f}x",
                    f"{kv_bytes / fast_s / 1e9:.1f}",
                    f"{kv_bytes / fast_s / bandwidth:.0%}",
                ]
            )
    print(
        format_table(
            [
                "batch",
                "context",
                "reference ms",
                "torch ms",
                "speedup",
                "KV GB/s",
                "of copy bandwidth",
            ],
            rows,
        )
    )
    if args.profile:
        batch, context = args.profile
        q, k_cache, v_cache, meta, _ = decode_batch(batch, context, args)
        inputs = (q, k_cache, v_cache, meta, scale, None, args.softcap)
        fast.forward(*inputs)  # plan and scratch outside the profile
        with torch.profiler.profile() as prof:
            for _ in range(args.repeats):
                fast.forward(*inputs)
        print(f"fast backend at batch {batch}, context {context}: {args.repeats} calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
