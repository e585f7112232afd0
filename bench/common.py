"""What the benchmarks share: hardware bounds measured in the same run, the benchmark models, the
work a model does per token, and table printing.

Bounds (measured, never assumed, each the best of several timed repeats):

    gemm_flops      fp32 FLOP/s of a square matmul (2048 x 2048 by default): the compute bound
    copy_bandwidth  bytes/s of copying a large tensor, counting the bytes read and written
    read_bandwidth  bytes/s of summing a large tensor (reads only): the memory bound that weight
                    reads in batch-1 decode run into (a token reads every weight once)

Models: `SMOLLM_SHAPE` is a random-weight Llama shaped like SmolLM-135M (hidden 576, intermediate
1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings); `TINY_SHAPE` is a small one
for smoke tests (`--quick`). Checkpoints are built with `engine.demo.make_checkpoint` and the demo
tokenizer (1024 tokens): the benchmarks feed token-id prompts, and sampled ids past the tokenizer's
vocabulary simply detokenize to nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SMOLLM_SHAPE: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rope_theta=10000.0,
)
TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    tie_word_embeddings=True,
    max_position_embeddings=512,
)


def best_time(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.0) -> float:
    """The fastest of `repeats` timed calls (after one warm-up), continuing until min_seconds.

    The minimum is the least disturbed measurement on a shared machine."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    count = 0
    while count < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        count += 1
    return best


@dataclass(frozen=True, slots=True)
class HardwareBounds:
    gemm_flops: float  # fp32 FLOP/s
    copy_bandwidth: float  # bytes/s, read + write
    threads: int
    read_bandwidth: float = 0.0  # bytes/s, reads only (0: not measured)

    def describe(self) -> str:
        read = f", memory read {self.read_bandwidth / 1e9:.1f} GB/s" if self.read_bandwidth else ""
        return (
            f"measured bounds ({self.threads} threads): fp32 GEMM {self.gemm_flops / 1e9:.1f} "
            f"GFLOP/s, memory copy {self.copy_bandwidth / 1e9:.1f} GB/s (read + write){read}"
        )


def measure_gemm_flops(n: int = 2048, repeats: int = 5, min_seconds: float = 0.0) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    out = torch.empty(n, n)
    seconds = best_time(lambda: torch.mm(a, b, out=out), repeats, min_seconds)
    return 2 * n**3 / seconds


def measure_copy_bandwidth(
    num_bytes: int = 256 * 2**20, repeats: int = 5, min_seconds: float = 0.0
) -> float:
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), repeats, min_seconds)
    return 2 * num_bytes / seconds


def measure_read_bandwidth(
    num_bytes: int = 512 * 2**20, repeats: int = 5, min_seconds: float = 0.0
) -> float:
    """Bytes/s of `sum` over a tensor much larger than the caches (a streaming read)."""
    src = torch.ones(num_bytes // 4)
    seconds = best_time(src.sum, repeats, min_seconds)
    return num_bytes / seconds


def measure_bounds(quick: bool = False, read: bool = False) -> HardwareBounds:
    """`read`: also the read bandwidth (the batch-1 decode bound; ~2 s more)."""
    if quick:
        return HardwareBounds(
            gemm_flops=measure_gemm_flops(512, 3),
            copy_bandwidth=measure_copy_bandwidth(16 * 2**20, 3),
            threads=torch.get_num_threads(),
            read_bandwidth=measure_read_bandwidth(16 * 2**20, 3) if read else 0.0,
        )
    # Many repeats over a few seconds: the best of them is what the machine can do when
    # undisturbed (one disturbed half-second here once read 95 GFLOP/s against 150 minutes later).
    return HardwareBounds(
        gemm_flops=measure_gemm_flops(repeats=10, min_seconds=3.0),
        copy_bandwidth=measure_copy_bandwidth(repeats=10, min_seconds=2.0),
        threads=torch.get_num_threads(),
        read_bandwidth=measure_read_bandwidth(repeats=10, min_seconds=2.0) if read else 0.0,
    )


def best_bounds(first: HardwareBounds, second: HardwareBounds) -> HardwareBounds:
    """The higher of two measurements of each bound (before and after the systems ran): ratios
    against it are the conservative ones."""
    return HardwareBounds(
        gemm_flops=max(first.gemm_flops, second.gemm_flops),
        copy_bandwidth=max(first.copy_bandwidth, second.copy_bandwidth),
        threads=first.threads,
        read_bandwidth=max(first.read_bandwidth, second.read_bandwidth),
    )


def cache_dir() -> Path:
    env = os.environ.get("ENGINE_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "engine") / "bench"


def build_checkpoint(shape: dict[str, Any], name: str, root: Path | None = None) -> Path:
    """A random-weight Llama checkpoint of this shape, built once and reused (by name)."""
    from engine.demo import build_tokenizer, make_checkpoint

    path = (root or cache_dir()) / name
    marker = path / ".complete"
    if not marker.is_file():
        make_checkpoint(path, architecture="LlamaForCausalLM", tokenizer=build_tokenizer(), **shape)
        marker.write_text("ok\n")
    return path


@dataclass(frozen=True, slots=True)
class ModelCost:
    """The work of one token through a Llama-shaped model."""

    linear_params: int  # weights of the layers' linear maps (q, k, v, o, gate, up, down)
    head_params: int  # the LM head (the embedding matrix when tied)
    num_q_heads: int
    head_dim: int
    num_layers: int
    weight_bytes: int  # all weights read for one decode step at batch 1 (linear + head + norms)

    def flops(self, num_tokens: int, num_sampled: int, attended_keys: int) -> float:
        """FLOPs of a forward over num_tokens tokens that attend to attended_keys keys in all
        (summed over the tokens) and compute logits for num_sampled of them."""
        linear = 2 * self.linear_params * num_tokens
        attention = 4 * self.num_q_heads * self.head_dim * self.num_layers * attended_keys
        return linear + attention + 2 * self.head_params * num_sampled


def model_cost(hf_config: Any, dtype: torch.dtype = torch.float32) -> ModelCost:
    cfg = hf_config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter
    linear = per_layer * cfg.num_hidden_layers
    head = hidden * cfg.vocab_size
    norms = hidden * (2 * cfg.num_hidden_layers + 1)
    element = torch.empty((), dtype=dtype).element_size()
    return ModelCost(
        linear_params=linear,
        head_params=head,
        num_q_heads=heads,
        head_dim=head_dim,
        num_layers=cfg.num_hidden_layers,
        weight_bytes=(linear + head + norms) * element,
    )


def attended_keys(prompt_len: int, output_len: int) -> int:
    """Keys attended over all forward tokens of one request (no sliding window): the prompt
    tokens and every generated token but the last are forwarded once, at positions 0..n-1."""
    n = prompt_len + output_len - 1
    return n * (n + 1) // 2


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
