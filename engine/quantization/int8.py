"""Weight-only int8 linears: symmetric, one scale per output channel.

    W[n, k] = q[n, k] * scale[n],  q in [-127, 127] (int8)

Kernels (CPU, stock torch), chosen per call by the number of rows T:
  T == 1                 the int8 bag GEMV (engine/models/cpu_gemm.py `int8_bag_gemv`): the codes
                         in FBGEMM's 8-bit rowwise embedding-bag layout (`int8_bag_table`), float32
                         activations, float32 sums, then the channel scales. 1.5x faster than
                         int8pack on SmolLM2's layers and 2x on its LM head, and closer to the
                         reference (no bfloat16 rounding of x). A third copy of the codes;
                         ENGINE_SPLIT_GEMV=0 (no one-row copies) keeps the kernels below.
  T <  QLINEAR_MIN_ROWS  `torch._weight_int8pack_mm` with bfloat16 activations (its AVX-512
                         path; with float32 activations it runs scalar loops, 5-40x slower).
                         A float32 model casts x to bfloat16 and the output back.
  T >= QLINEAR_MIN_ROWS  oneDNN's int8 `qlinear` with dynamic activations: x quantized per row
                         (token) to int8, int8 x int8 GEMM, float output scaled per row; rows
                         bucketed as for the packed float32 linears (cpu_gemm.in_row_buckets).
                         ENGINE_INT8_QLINEAR=0 turns it off.
  Layers whose input has outlier channels (`Linear.quantizable_input` False: the MLP's down
  projection) never quantize activations: on CPUs with oneDNN bfloat16 they hold the int8 values
  in bfloat16, oneDNN-packed (as fast as int8pack at 1 row, 2.5x faster at 32).
Measured on the 2-core machine (one SmolLM-135M layer's four GEMMs, 1 thread, ms):
      rows  fp32 oneDNN  int8pack(bf16)  qlinear
         1      0.60         0.21          0.30
         4      0.71         0.40          0.33
        16      1.50         1.57          0.57
        64      4.88         6.51          1.73
       128     12.97        16.81          3.22
Other devices and dtypes (CUDA, float64) dequantize the weight per call (`F.linear`), the
reference arithmetic itself.

Rounding against the reference x @ W.T (W dequantized, in float32), justified in
tests/property/test_quantized_linear.py: bfloat16 activations add at most 2^-7 * (|x| @ |W|.T);
qlinear's activation quantization adds at most scale_t / 2 * sum_k |W[n, k]| (scale_t = the
row's max |x| / 127).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from engine.models.cpu_gemm import (
    bag_gemv_parts,
    can_pack_for_cpu,
    in_row_buckets,
    int8_bag_available,
    int8_bag_gemv,
    int8_bag_table,
    one_row_copies_enabled,
    onednn_linear,
    pack_weight,
)
from engine.models.layers import Linear, LinearMethod

logger = logging.getLogger(__name__)

QLINEAR_MIN_ROWS = 4


def _default_qlinear_min_rows() -> int | None:
    """QLINEAR_MIN_ROWS, or None (never) with ENGINE_INT8_QLINEAR=0."""
    return None if os.environ.get("ENGINE_INT8_QLINEAR", "1") == "0" else QLINEAR_MIN_ROWS


def quantize_int8(
    weight: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] int8, scale [N] float32), symmetric per output channel.
    `absmax` [N]: the rows' largest magnitudes when `weight` is only a slice of the columns
    (tensor parallelism), so the scales are the whole rows'."""
    w = weight.to(torch.float32)
    if absmax is None:
        absmax = w.abs().amax(dim=1)
    scale = (absmax / 127.0).clamp_min(1e-12)  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _qlinear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class Int8LinearMethod(LinearMethod):
    """Layer state after processing: `qweight` [N, K] int8, `wscale` [N] float32, on CPU also
    `qlinear_weight` (the same codes in oneDNN's layout), `int8_bag_table` (the one-row
    kernel's copy) and `wscale_bf16`. `layer.weight` keeps only its shape. A layer may carry
    `pre_quantized = (q, scale)` (e.g. from a GGUF file) to use instead of quantizing its float
    weight."""

    name = "int8"

    def __init__(self, qlinear_min_rows: int | str | None = "default") -> None:
        # None: never use qlinear
        self.qlinear_min_rows = (
            _default_qlinear_min_rows() if qlinear_min_rows == "default" else qlinear_min_rows
        )

    def process_weights_after_loading(self, layer: Linear) -> None:
        pre = getattr(layer, "pre_quantized", None)
        q, scale = pre if pre is not None else quantize_int8(layer.weight.data, _row_absmax(layer))
        device = layer.weight.device
        layer.qweight = q.to(device).contiguous()
        layer.wscale = scale.to(device=device, dtype=torch.float32)
        layer.wscale_bf16 = layer.wscale.to(torch.bfloat16)
        layer.qlinear_weight = None
        layer.int8_min_qlinear_rows = self.qlinear_min_rows
        layer.int8_bf16_packed = None
        layer.int8_bag_table = None
        if device.type == "cpu" and _one_row_bag_enabled():
            parts = bag_gemv_parts(layer.out_features, torch.get_num_threads())
            layer.int8_bag_table = int8_bag_table(layer.qweight, parts)
        if (
            device.type == "cpu"
            and not getattr(layer, "quantizable_input", True)
            and can_pack_for_cpu(torch.bfloat16, device)
        ):
            # Input with outlier channels (no int8 activations): the int8 values, held in
            # bfloat16 in oneDNN's layout, beat int8pack from 8 rows on (down projection
            # 576 x 1536, 1 thread: 0.27 vs 0.69 ms at 32 rows; equal at 1 row).
            layer.int8_bf16_packed = pack_weight(
                (q.to(torch.float32) * layer.wscale[:, None]).to(torch.bfloat16)
            )
        elif (
            device.type == "cpu"
            and self.qlinear_min_rows is not None
            and getattr(layer, "quantizable_input", True)
            and _qlinear_available()
        ):
            layer.qlinear_weight = torch.ops.onednn.qlinear_prepack(layer.qweight, None)
            layer.wzero = torch.zeros(q.shape[0], dtype=torch.int64)
            # (One row runs the bag GEMV when there is a table: nothing to choose then.)
            if layer.int8_bag_table is None and _qlinear_faster_at_one_row(layer):
                layer.int8_min_qlinear_rows = 1
        layer.pre_quantized = None
        layer.weight.data = layer.weight.data.new_empty(0, layer.in_features)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return F.linear(x, self.dequantized_weight(layer).to(x.dtype), layer.bias)
        if x.shape[0] == 1 and layer.int8_bag_table is not None:
            out = int8_bag_gemv(x, layer.int8_bag_table, layer.wscale).to(x.dtype)
        elif layer.int8_bf16_packed is not None:
            out = onednn_linear(x.to(torch.bfloat16), layer.int8_bf16_packed, None).to(x.dtype)
        elif layer.qlinear_weight is not None and x.shape[0] >= layer.int8_min_qlinear_rows:
            out = in_row_buckets(lambda rows: _qlinear(rows, layer), x)
        else:
            out = torch._weight_int8pack_mm(
                x.to(torch.bfloat16).contiguous(), layer.qweight, layer.wscale_bf16
            ).to(x.dtype)
        if layer.bias is not None:
            out = out.add_(layer.bias)
        return out

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:  # [N, K] float32
        return layer.qweight.to(torch.float32) * layer.wscale[:, None]

    def weight_tensors(self, layer: Linear) -> list[torch.Tensor]:
        tensors = [layer.qweight, layer.wscale, layer.wscale_bf16]
        if layer.qlinear_weight is not None:
            tensors.append(layer.qlinear_weight)
        if layer.int8_bf16_packed is not None:
            tensors.append(layer.int8_bf16_packed)
        if layer.int8_bag_table is not None:
            tensors.append(layer.int8_bag_table)
        return tensors


def _one_row_bag_enabled() -> bool:
    """The int8 bag GEMV's table, unless ENGINE_SPLIT_GEMV=0 (the switch for every one-row
    copy of the weights, as for float32's split GEMV and bfloat16's bag GEMV)."""
    return one_row_copies_enabled() and int8_bag_available()


def _row_absmax(layer: Linear) -> torch.Tensor | None:
    """A row-parallel layer's row maxima over every rank's columns (None otherwise)."""
    if layer.col_slice is None:
        return None
    from engine.distributed.communication import all_reduce_max

    absmax = layer.weight.data.to(torch.float32).abs().amax(dim=1).contiguous()
    return all_reduce_max(absmax, layer.tp)


_ONE_ROW_CHOICE: dict[tuple[int, int], bool] = {}  # (out, in) -> qlinear faster at one row


def _qlinear_faster_at_one_row(layer: Linear) -> bool:
    """Times both kernels at one row for this weight shape (once per shape, best of 3).

    int8pack wins on the layers' shapes (SmolLM-135M: 0.21 ms vs 0.30 for a layer's four
    GEMMs) but loses badly on a large LM head (49152 x 576: 8.0 ms vs 2.0), so it is measured.
    """
    key = (layer.out_features, layer.in_features)
    if key not in _ONE_ROW_CHOICE:
        import time

        x = torch.full((1, layer.in_features), 0.5)  # (no draw from the global RNG)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        int8pack = best(
            lambda: torch._weight_int8pack_mm(
                x.to(torch.bfloat16), layer.qweight, layer.wscale_bf16
            )
        )
        qlinear = best(lambda: _qlinear(x, layer))
        _ONE_ROW_CHOICE[key] = qlinear < 0.8 * int8pack  # a clear win only: timings are noisy
        logger.debug(
            "int8 %s at one row: int8pack %.3f ms, qlinear %.3f ms",
            key,
            int8pack * 1e3,
            qlinear * 1e3,
        )
    return _ONE_ROW_CHOICE[key]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float -> (uint8 codes [T, K], scale [T, 1] float32): symmetric per row (token),
    stored with a zero point of 128: x ~ (codes - 128) * scale, |error| <= scale / 2.

    Per row, not per tensor: one token's outlier then coarsens only its own row (a per-tensor
    scale garbled SmolLM2's answers)."""
    x32 = x.to(torch.float32)
    scale = (x32.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min_(1e-12)  # [T, 1]
    q = torch.round(x32 / scale).add_(128.0).clamp_(1, 255)
    return q.to(torch.uint8), scale


def _qlinear(x: torch.Tensor, layer: Linear) -> torch.Tensor:  # [T, K] -> [T, N], x.dtype
    # oneDNN's activation scale is one number: pass 1 and scale each output row afterwards.
    qx, scale = quantize_activations(x)
    out = torch.ops.onednn.qlinear_pointwise(
        qx,
        1.0,
        128,
        layer.qlinear_weight,
        layer.wscale,
        layer.wzero,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )
    return out.mul_(scale).to(x.dtype)
