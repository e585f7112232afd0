"""CPU GEMM kernels for the linear layers (float32 and bfloat16 weights, stock torch).

Two kernels, picked per call by the number of rows T of the input:

- **oneDNN's linear** (`onednn_linear`), at any T: `torch.ops.mkldnn._linear_pointwise` on the
  weight packed into oneDNN's blocked layout (`pack_weight`). On the plain weight oneDNN is
  1.2-1.9x slower from 5 to 64 rows (measured per SmolLM-135M weight shape, 2 threads, cache
  resident: 1.57x at 5 rows for q/k/v, 1.94x for gate/up, 1.2x at 32, ~1.05x from 256), and the
  engine's offline throughput fell from 146 to 113 tok/s with plain weights, hence the packing.
  oneDNN keeps state for every row count it runs at and never frees it, so it runs only at
  bucketed row counts (`onednn_row_bucket`).
- **The split GEMV** (`split_gemv`), for float32 at T <= `SPLIT_GEMV_MAX_ROWS` (one row: batch-1
  decode, and the LM head of a step that samples one token), on a plain copy of the weight: [out,
  in] viewed as P slices of out / P rows ([P, out / P, in], no copy; P from `split_gemv_parts`, up
  to twice the CPUs) and multiplied by one batched GEMM, so the threads stream their own slices of
  the weight. At one row a linear is a matrix-vector product bound by how fast the weight is read;
  oneDNN's GEMV leaves a third of the bandwidth unused on the 2-core machines here, the batched one
  does not. Measured (SmolLM-135M's 30 layers and LM head, 538 MB, 2 threads, AMD EPYC): 17.5-18.6
  ms vs oneDNN's 26.3-29.8 at 1 row (30 GB/s; a streaming `sum` over the same tensors reads 29
  GB/s). From 2 rows it does not pay inside the engine: alone, 2 rows took 19-21 ms, but within
  engine steps the linears took 1.6-1.7x their one-row time (batch-2 and batch-4 decode steps 41
  and 57 ms against oneDNN's 41 and 37), and oneDNN packed for 128 rows takes 22-23 ms at 3-4 rows.
  It also serves one thread (the adaptive CPU reservation's, OMP_NUM_THREADS=1): 2-8 slices on one
  thread took 25.7-26.3 ms for SmolLM2's 121 linears against oneDNN's 41.2 (a single slice, 51.6
  ms, takes torch's slower one-matrix path, which made an earlier measurement favour oneDNN at one
  thread). The slicing is fixed per layer (`split_gemv_parts`), so the results do not depend on the
  thread count. Not for bfloat16: torch's bfloat16 batched GEMM is slower (35 vs 15.8 ms).
- **The bag GEMV** (`bag_gemv`), for bfloat16 at one row, on a copy of the weight laid out for
  `F.embedding_bag`: the weight's P row slices, each transposed ([in, out / P]), stacked as a
  [P * in, out / P] table (`bag_gemv_table`). One embedding_bag in mode "sum" with P bags (bag p:
  table rows p * in ... p * in + in - 1, each weighted by the matching input element) adds up
  x[i] * W[p-th slice].T[i, :] over i: bag p is slice p of x @ W.T. The bag kernel reads the
  table rows in order (contiguous runs of out / P elements), converts them to float32 and
  accumulates in float32, rounding once to bfloat16 at the end, as oneDNN's linear does
  (measured: the two agree on 99.99-100% of outputs, each the correctly rounded product; 1 ulp
  apart on the rest), and the bags run in parallel over the threads. Measured (SmolLM2-135M's
  30 layers, 212 MB in bfloat16, 2 threads, AMD EPYC with AVX512-BF16): the four body GEMMs
  9.1-9.2 ms against oneDNN's 11.1 (P = 8; P = 2 and 4: 10.7-11.4), the LM head 2.1 ms against
  2.5 (P = 128, `bag_gemv_parts`), and whole decode steps 19.1 ms against 24.8 with oneDNN
  (bench/step_ab.py, interleaved), tokens identical. At more rows it would read
  the table once per row; oneDNN stays from two rows up. float32 keeps the split GEMV (its
  bag GEMV took 19-22 ms against the split's 14-16.5). Int8 weights (engine/quantization/int8.py)
  take the same layout through FBGEMM's 8-bit rowwise bag kernel (`int8_bag_gemv`): SmolLM2's
  30 layers' int8 GEMMs at one row in 5.8-6.1 ms against `_weight_int8pack_mm`'s 9.0-9.6, the LM
  head in 1.0 ms (P = 128) against 2.1, with float32 activations instead of bfloat16 ones.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "SPLIT_GEMV_MAX_ROWS",
    "bag_gemv",
    "bag_gemv_parts",
    "bag_gemv_table",
    "can_pack_for_cpu",
    "in_row_buckets",
    "int8_bag_available",
    "int8_bag_gemv",
    "int8_bag_table",
    "one_row_copies_enabled",
    "onednn_linear",
    "onednn_row_bucket",
    "onednn_row_buckets",
    "pack_weight",
    "split_gemv",
    "split_gemv_parts",
    "split_gemv_slices",
]

_PACK_BATCH_HINT = 128  # the row count oneDNN picks its blocking for; any row count works

# The split GEMV beats oneDNN up to this many rows in engine steps (see the module docstring).
SPLIT_GEMV_MAX_ROWS = 1


def one_row_copies_enabled() -> bool:
    """Whether weights keep a second copy for one-row inputs (float32's split GEMV, bfloat16's
    and int8's bag GEMV tables): yes unless ENGINE_SPLIT_GEMV=0, the one switch for all three
    (read when the weights load)."""
    return os.environ.get("ENGINE_SPLIT_GEMV", "1") != "0"


def can_pack_for_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """float32 (or bfloat16 where oneDNN has bf16 kernels) on a CPU with oneDNN;
    ENGINE_ONEDNN_LINEAR=0 keeps plain torch GEMMs.

    bfloat16, measured (one SmolLM-135M layer's four GEMMs, 1 thread): 0.19 ms packed vs 0.39
    column-major at 1 row, 0.59 vs 0.86 at 16, 2.2 vs 2.7 at 64.
    """
    if device.type != "cpu" or os.environ.get("ENGINE_ONEDNN_LINEAR", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:  # [out, in] -> oneDNN-blocked
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)


def onednn_linear(
    x: torch.Tensor,  # [T, in]
    weight: torch.Tensor,  # from pack_weight (a plain [out, in] works too, slower)
    bias: torch.Tensor | None,
) -> torch.Tensor:  # [T, out]
    """oneDNN's linear, run only at the row counts of `onednn_row_bucket` (see there)."""
    return in_row_buckets(lambda rows: _onednn_linear_exact(rows, weight, bias), x)


def _onednn_linear_exact(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


@functools.lru_cache(maxsize=256)
def split_gemv_parts(out_features: int, cpus: int) -> int:
    """The number of weight slices on a machine with `cpus` CPUs: the largest divisor of
    out_features that is <= 2 * cpus (at least 2 allowed; 1: no split, oneDNN instead).

    A constant per layer and machine, never the current thread count: the split GEMV's output
    depends on the slicing (for some shapes a row's float32 sum rounds differently with other
    slices) but not on how many threads run the slices (measured: 1,552 shape/slicing pairs bit
    for bit equal at 1-4 threads), so one fixed slicing keeps one-row results the same when the
    adaptive CPU reservation changes the thread count. Twice the CPUs keeps the slices balanced
    when a thread is reserved."""
    limit = max(2, 2 * cpus)
    return max(p for p in range(1, limit + 1) if out_features % p == 0)


def split_gemv(
    x: torch.Tensor,  # [T, in], T small
    slices: torch.Tensor,  # [P, out / P, in]: a contiguous weight's `split_gemv_slices`
    bias: torch.Tensor | None,
) -> torch.Tensor:  # [T, out]
    """x @ weight.T (+ bias) as one batched GEMM over the weight's P row slices."""
    rows, in_features = x.shape
    parts = slices.shape[0]
    # x.T's strides, (1, in), let the batched GEMM call BLAS; the same values through
    # x.reshape(1, in, 1) (strides (in, 1, 1)) took a 4x slower path at one row.
    out = torch.bmm(slices, x.t().expand(parts, in_features, rows))  # [P, out / P, T]
    if rows > 1:  # [T, P, out / P]; at one row [P, out / P, 1] is already [1, out]
        out = out.permute(2, 0, 1).contiguous()
    out = out.view(rows, -1)
    if bias is not None:
        out += bias
    return out


def split_gemv_slices(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """weight [out, in] (contiguous) as [parts, out / parts, in], a view."""
    return weight.view(parts, weight.shape[0] // parts, weight.shape[1])


# The bag GEMV's table rows are best about this long (out / P elements): measured on 2 threads,
# bfloat16, weights beyond the cache, the 49152 x 576 LM head took 2.1 ms at P = 128 (rows of
# 384) against 3.0-3.1 at P = 8-64, while 3072 x 576 and 576 x 1536 were fastest at P = 8-16
# (147-154 and 84-85 us; 1.2-2.6x slower at P = 64).
_BAG_ROW_ELEMENTS = 384


@functools.lru_cache(maxsize=256)
def bag_gemv_parts(out_features: int, threads: int) -> int:
    """The bag GEMV's bag count: the largest divisor of out_features that is at most
    max(8, 2 * threads, out_features / 384): enough bags for every thread, and table rows of
    about 384 elements for wide outputs such as an LM head."""
    limit = max(8, 2 * threads, out_features // _BAG_ROW_ELEMENTS)
    return max(p for p in range(1, limit + 1) if out_features % p == 0)


def bag_gemv_table(weight: torch.Tensor, parts: int) -> torch.Tensor:  # [P * in, out / P]
    """weight [out, in] as the bag GEMV's table: slice p's rows transposed, slices stacked."""
    out_features, in_features = weight.shape
    slices = weight.reshape(parts, out_features // parts, in_features)
    return slices.transpose(1, 2).contiguous().view(parts * in_features, out_features // parts)


@functools.lru_cache(maxsize=64)
def _bag_indices(parts: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every table row in order, and the first row of each of the P bags."""
    with torch.inference_mode(False):  # plain tensors, usable in and outside inference mode
        indices = torch.arange(parts * in_features)
        return indices, indices[::in_features].clone()


def bag_gemv(
    x: torch.Tensor,  # [1, in]
    table: torch.Tensor,  # [P * in, out / P]: bag_gemv_table(weight, P)
    bias: torch.Tensor | None,
) -> torch.Tensor:  # [1, out]
    """x @ weight.T (+ bias) at one row as one embedding_bag over the weight's table."""
    in_features = x.shape[1]
    parts = table.shape[0] // in_features
    indices, offsets = _bag_indices(parts, in_features)
    # [P * in]: x once per bag (expand + copy: `repeat` costs 3x as many op calls)
    weights = x.to(table.dtype).expand(parts, in_features).reshape(-1)
    out = F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
    out = out.view(1, -1)  # bag p is output slice p: [P, out / P] is [1, out] in order
    if bias is not None:
        out += bias
    return out


def int8_bag_available() -> bool:
    """Whether this torch has FBGEMM's 8-bit rowwise embedding bag (x86 CPU builds do)."""
    return hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets")


def int8_bag_table(q: torch.Tensor, parts: int) -> torch.Tensor:  # [P * in, out / P + 8] uint8
    """int8 codes q [out, in] as the int8 bag GEMV's table: `bag_gemv_table`'s layout in
    FBGEMM's fused 8-bit rowwise format, each row's codes + 128 as uint8 followed by its float32
    scale 1 and bias -128, so the kernel reads back exactly 1 * (q + 128) - 128 = q."""
    codes = bag_gemv_table(q, parts)  # [P * in, out / P] int8
    rows, width = codes.shape
    table = torch.empty(rows, width + 8, dtype=torch.uint8)
    table[:, :width] = (codes.to(torch.int16) + 128).to(torch.uint8)
    scale_bias = torch.tensor([1.0, -128.0], dtype=torch.float32).expand(rows, 2).contiguous()
    table[:, width:] = scale_bias.view(torch.uint8)  # [rows, 8]: the two floats' bytes
    return table


def int8_bag_gemv(
    x: torch.Tensor,  # [1, in] float32 or bfloat16
    table: torch.Tensor,  # int8_bag_table(q, P)
    scale: torch.Tensor,  # [out] float32: the output channels' scales
) -> torch.Tensor:  # [1, out] float32: x @ (q * scale[:, None]).T
    """The int8 weights' product at one row, as `bag_gemv` with FBGEMM's 8-bit bag kernel:
    float32 activations (exact from bfloat16) and float32 sums of x[i] * q[o, i], then the
    channel scales. (Each code is read as (q + 128) - 128, an exact integer; the kernel may add
    the two parts separately, which rounds at most 2^-24 * 256 * |x[i]| per term.)"""
    in_features = x.shape[1]
    parts = table.shape[0] // in_features
    indices, offsets = _bag_indices(parts, in_features)
    weights = x.to(torch.float32).expand(parts, in_features).reshape(-1)  # [P * in]
    out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        table, indices, offsets, False, 0, False, weights, None, False
    )  # [P, out / P] float32
    return out.view(1, -1).mul_(scale)


def in_row_buckets(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,  # [T, in]
) -> torch.Tensor:  # fn(x) [T, out], with fn only ever called at a bucket's row count
    """Runs a row-wise op at bucketed row counts: zero-padded up to the bucket, in chunks of
    the largest bucket above it. Valid for ops whose output row i depends on input row i only."""
    rows = x.shape[0]
    if rows > _MAX_BUCKET:  # in chunks of _MAX_BUCKET rows; the last one padded
        return torch.cat(
            [in_row_buckets(fn, x[i : i + _MAX_BUCKET]) for i in range(0, rows, _MAX_BUCKET)]
        )
    bucket = onednn_row_bucket(rows)
    if bucket != rows:
        padded = x.new_zeros(bucket, x.shape[1])
        padded[:rows] = x
        return fn(padded)[:rows]
    return fn(x)


# oneDNN keeps state (primitives, JIT code) for every distinct row count it has run a weight at
# and never frees it: measured here, 0.6 MB per row count for one 64 x 64 weight and about 2.7
# MB for the four weight shapes of a SmolLM-135M layer, so a server seeing every batch size from
# 1 to 690 grew by gigabytes. Rows are therefore padded up to a fixed set of buckets (38 row
# counts, larger inputs run in chunks of the largest): 1-8 exact (decode at small batches),
# multiples of 4 to 32, of 8 to 64, of 16 to 256 and of 32 to 512. A padded row costs its share
# of the GEMM's FLOPs: at most 3/9 more rows (at 9 rows), 23% at 65 rows, 12% above 256;
# bench/onednn_rows.py measures the cost (about 1.0-1.3x of the exact call at the worst row
# counts, 1.0x at the buckets themselves) and the memory (flat instead of +0.5 MB per row
# count).
_MAX_BUCKET = 512


def onednn_row_bucket(rows: int) -> int:
    """The row count a oneDNN linear runs at for `rows` (1 <= rows <= 512) rows."""
    if rows <= 8:
        return rows
    step = 4 if rows <= 32 else 8 if rows <= 64 else 16 if rows <= 256 else 32
    return -(-rows // step) * step


def onednn_row_buckets() -> list[int]:
    """Every row count `onednn_linear` runs oneDNN at."""
    return sorted({onednn_row_bucket(r) for r in range(1, _MAX_BUCKET + 1)})
