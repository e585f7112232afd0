"""Weight-only int4 linears: asymmetric, one scale and zero per group of G inputs.

    W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],  q in [0, 15],  g = k // G

(torch's int4 layout; GGUF's Q4_0, Q4_1 and Q4_K blocks are exactly of this form with G = 32,
see engine/models/gguf_quants.py). G is 32, 64, 128 or 256.

Kernel (CPU, stock torch): `torch.ops.aten._weight_int4pack_mm_for_cpu` with bfloat16
activations and bfloat16 scales/zeros (its AVX-512 path; float32 activations run scalar loops,
10-100x slower); a float32 model casts x to bfloat16 and the output back. Measured (one
SmolLM-135M layer's four GEMMs, 1 thread): 0.20 ms at 1 row against 0.60 for the float32 oneDNN
GEMM, 0.35 at 4 rows, 1.3 at 16 and 9.4 at 64 (there float32 takes 4.6: int4 is for
small-batch decode). The packed layout needs N divisible by 16: rows are zero-padded to it.
Other devices and dtypes dequantize per call (`F.linear`), the reference arithmetic.

Rounding against the reference x @ W.T (float32 scales and zeros): bfloat16 activations,
scales, zeros and output add at most 2^-7 * (|x| @ Wabs.T), Wabs = |q - 8| * scale + |zero|
(see tests/property/test_quantized_linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models.layers import Linear, LinearMethod

GROUP_SIZES = (32, 64, 128, 256)
_N_ALIGN = 16  # the int4 packing's required multiple of output rows


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] uint8 in 0..15, scale [N, K/G], zero [N, K/G]) float32,
    asymmetric min/max per group (so a group's min and max are represented exactly, up to
    float32 rounding)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    w = weight.to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K/G]
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + 8.0 * scale  # (q - 8) * scale + zero = q * scale + lo
    return q.to(torch.uint8).reshape(n, k), scale, zero


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:  # [N, K] float32
    s = scale.repeat_interleave(group_size, dim=1)
    z = zero.repeat_interleave(group_size, dim=1)
    return (q.to(torch.float32) - 8.0) * s + z


class Int4LinearMethod(LinearMethod):
    """Layer state after processing: `q4_packed` (torch's CPU int4 layout, rows padded to 16),
    `q4_scale_zero` [K/G, N_padded, 2] bfloat16, and for the reference `q4_scale`, `q4_zero`
    [N, K/G] float32. A layer may carry `pre_quantized = (q, scale, zero, G)` (from GGUF)."""

    name = "int4"

    def __init__(self, group_size: int = 32) -> None:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
        self.group_size = group_size

    def process_weights_after_loading(self, layer: Linear) -> None:
        pre = getattr(layer, "pre_quantized", None)
        if pre is not None:
            q, scale, zero, group_size = pre
        else:
            group_size = self.group_size
            col = layer.col_slice
            if col is not None and (col.start % group_size or col.size % group_size):
                raise ValueError(
                    f"quantization int4: tensor_parallel_size {layer.tp.size} gives each rank "
                    f"{col.size} of a row-parallel layer's {col.full} input columns, not a "
                    f"multiple of the group size {group_size}; use int8 or another "
                    "tensor_parallel_size"
                )
            q, scale, zero = quantize_int4(layer.weight.data, group_size)
        n, k = q.shape
        pad = -n % _N_ALIGN
        q_pad = torch.cat([q, q.new_full((pad, k), 8)]) if pad else q  # padded rows: 0
        s_pad = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])]) if pad else scale
        z_pad = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])]) if pad else zero
        layer.q4_group_size = group_size
        layer.q4_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q_pad.to(torch.int32).contiguous(), 1
        )
        layer.q4_scale_zero = (
            torch.stack([s_pad.t(), z_pad.t()], dim=-1).to(torch.bfloat16).contiguous()
        )
        layer.q4_scale = scale.to(torch.float32).contiguous()
        layer.q4_zero = zero.to(torch.float32).contiguous()
        layer.q4_rows = n
        layer.pre_quantized = None
        layer.weight.data = layer.weight.data.new_empty(0, layer.in_features)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return F.linear(x, self.dequantized_weight(layer).to(x.dtype), layer.bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(),
            layer.q4_packed,
            layer.q4_group_size,
            layer.q4_scale_zero,
        )
        out = out[:, : layer.q4_rows].to(x.dtype)
        if layer.bias is not None:
            out = out.add_(layer.bias)
        return out

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:  # [N, K] float32
        # The codes live only in the packed layout: multiplying the identity by the packed
        # weight in float32 (exact: one product per output) recovers them.
        k = layer.in_features
        eye = torch.eye(k, dtype=torch.float32)
        scale_zero = torch.stack([layer.q4_scale.t(), layer.q4_zero.t()], dim=-1)
        pad = layer.q4_packed.shape[0] - layer.q4_rows
        if pad:
            scale_zero = torch.cat(
                [scale_zero, scale_zero.new_zeros(k // layer.q4_group_size, pad, 2)], 1
            )
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, layer.q4_packed, layer.q4_group_size, scale_zero.contiguous()
        )  # [K, N_padded] = W^T
        return wt[:, : layer.q4_rows].t().contiguous()

    def weight_tensors(self, layer: Linear) -> list[torch.Tensor]:
        return [layer.q4_packed, layer.q4_scale_zero, layer.q4_scale, layer.q4_zero]
