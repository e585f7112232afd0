"""The fast quantized linears equal their reference, x @ W.T with W the dequantized weight.

Tolerances, per output element y[t, n] (|x| @ |W|.T is the sum of the absolute products):
- bfloat16 kernels (int8pack, int4pack, and oneDNN on the int8 values held in bfloat16 for
  layers without int8 activations): x, the scales/zeros (or the weights) and the output are
  rounded to bfloat16 (relative error 2^-9 each, so at most 3 * 2^-9 * sum_k |x_k W_nk|
  together with the float32 accumulation), bounded by 2^-7 * (|x| @ Wabs.T) where
  Wabs >= |W| elementwise (for int4, Wabs = |q - 8| * scale + |zero|, as the kernel rounds
  scale and zero separately).
- the int8 bag GEMV (one row, where FBGEMM's 8-bit bag kernel exists), against a float64
  reference: float32 activations and k float32 additions of x_k * q_nk (2^-24 * k * (|x| @
  |W|.T) at worst), each code read as (q + 128) - 128 (2^-24 * 256 * sum_k |x_k| * s_n if the
  kernel adds the two parts apart), the channel scale s_n and the output (2^-22 * |y|);
  bfloat16 outputs add their rounding (2^-8 * |x W.T|, then 2^-8 * |y| for the bias added in
  bfloat16).
- oneDNN qlinear (int8, rows >= QLINEAR_MIN_ROWS, or every row count where a load-time
  measurement found it faster at one row): each row's activations are quantized to
  int8 with step s_t = max_k |x_tk| / 127: |dx| <= s_t / 2, so |dy| <= s_t / 2 * sum_k |W_nk|,
  plus the float32 rounding of the output.
The quantizers themselves are checked too: int8 codes are within half a step of the weight,
int4 codes within half a group step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models.cpu_gemm import int8_bag_available
from engine.models.layers import Linear
from engine.quantization.int4 import Int4LinearMethod, dequantize_int4, quantize_int4
from engine.quantization.int8 import Int8LinearMethod, quantize_activations, quantize_int8


def _layer(n: int, k: int, bias: bool, seed: int) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = Linear(k, n, bias, torch.float32, torch.device("cpu"))
    layer.weight.data = torch.randn(n, k, generator=gen) * 0.05
    if bias:
        layer.bias.data = torch.randn(n, generator=gen)
    return layer


def _input(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=gen)
    x[:, 0] *= 20.0  # an outlier channel, as LLM activations have
    return x.to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    k=st.sampled_from([32, 64, 96, 256]),
    rows=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    quantizable_input=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_matches_dequantized_reference(
    n, k, rows, bias, dtype, quantizable_input, seed
):
    layer = _layer(n, k, bias, seed)
    layer.quantizable_input = quantizable_input  # False: int8 values in bfloat16, oneDNN
    w = layer.weight.data.clone()
    q, scale = quantize_int8(w)
    assert (q.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-7).all()
    layer.process_weights_after_loading(Int8LinearMethod())
    assert layer.weight.numel() == 0  # the float weight is not kept
    wd = layer.dequantized_weight()
    torch.testing.assert_close(wd, q.float() * scale[:, None])
    x = _input(rows, k, dtype, seed)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    x32 = x.to(torch.float32)
    ref = x32 @ wd.T + (layer.bias if bias else 0)
    bound = 2**-7 * (x32.abs() @ wd.abs().T) + 2**-7 * ref.abs() + 1e-5
    if layer.qlinear_weight is not None and rows >= layer.int8_min_qlinear_rows:
        _, step = quantize_activations(x32)  # [rows, 1]
        bound = bound + step / 2 * wd.abs().sum(1)
    err = (out.to(torch.float32) - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


needs_int8_bag = pytest.mark.skipif(
    not int8_bag_available(), reason="no FBGEMM 8-bit embedding bag in this torch"
)


@needs_int8_bag
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.sampled_from([32, 64, 96, 576]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    quantizable_input=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_one_row_runs_the_bag_gemv_at_float32_accuracy(
    n, k, bias, dtype, quantizable_input, seed
):
    """At one row every int8 layer (with or without int8 activations elsewhere) takes the bag
    GEMV: float32 accuracy, thousands of times inside the bfloat16 kernels' bound."""
    layer = _layer(n, k, bias, seed)
    layer.quantizable_input = quantizable_input
    layer.process_weights_after_loading(Int8LinearMethod())
    assert layer.int8_bag_table is not None
    wd = layer.dequantized_weight()
    x = _input(1, k, dtype, seed)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (1, n)
    x64, wd64 = x.to(torch.float64), wd.to(torch.float64)
    product = x64 @ wd64.T  # exact reference (float64)
    ref = product + (layer.bias.double() if bias else 0)
    # k float32 additions of the products (|x| @ |W|.T), the code split, the scale and output.
    sums = x64.abs() @ wd64.abs().T
    split = 256 * x64.abs().sum() * layer.wscale.double()
    bound = 2**-24 * (k * sums + split) + 2**-22 * ref.abs() + 1e-9
    if dtype == torch.bfloat16:  # the product rounded to bfloat16, then the bias added in it
        bound = bound + 2**-8 * (product.abs() + ref.abs())
    err = (out.to(torch.float64) - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


@needs_int8_bag
def test_int8_bag_gemv_is_off_without_one_row_copies(monkeypatch):
    """ENGINE_SPLIT_GEMV=0 (no one-row copies of any weight): one row runs int8pack again."""
    monkeypatch.setenv("ENGINE_SPLIT_GEMV", "0")
    layer = _layer(16, 64, False, 0)
    layer.process_weights_after_loading(Int8LinearMethod())
    assert layer.int8_bag_table is None
    x = _input(1, 64, torch.float32, 0)
    ref = torch._weight_int8pack_mm(x.to(torch.bfloat16), layer.qweight, layer.wscale_bf16)
    torch.testing.assert_close(layer(x), ref.to(torch.float32), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 64, 128]),
    rows=st.integers(1, 20),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_int4_linear_matches_dequantized_reference(n, groups, group_size, rows, bias, dtype, seed):
    k = groups * group_size
    layer = _layer(n, k, bias, seed)
    w = layer.weight.data.clone()
    q, scale, zero = quantize_int4(w, group_size)
    deq = dequantize_int4(q, scale, zero, group_size)
    half_step = scale.repeat_interleave(group_size, 1) / 2
    assert ((deq - w).abs() <= half_step + 1e-6).all()
    layer.process_weights_after_loading(Int4LinearMethod(group_size))
    assert layer.weight.numel() == 0
    wd = layer.dequantized_weight()
    torch.testing.assert_close(wd, deq, rtol=1e-5, atol=1e-6)
    x = _input(rows, k, dtype, seed)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    x32 = x.to(torch.float32)
    ref = x32 @ wd.T + (layer.bias if bias else 0)
    wabs = (q.float() - 8).abs() * scale.repeat_interleave(
        group_size, 1
    ) + zero.abs().repeat_interleave(group_size, 1)
    bound = 2**-7 * (x32.abs() @ wabs.T) + 2**-7 * ref.abs() + 1e-5
    err = (out.to(torch.float32) - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


def test_float64_runs_the_reference_arithmetic():
    layer = Linear(64, 8, True, torch.float64, torch.device("cpu"))
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    layer.process_weights_after_loading(Int8LinearMethod())
    x = torch.randn(3, 64, dtype=torch.float64)
    ref = x @ layer.dequantized_weight().double().T + layer.bias
    torch.testing.assert_close(layer(x), ref)
