"""The shared model layer: linear methods against their reference, the weight mapper's fused and
split names, injected rotary / norms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine.cpu_contention import affinity_cpus
from engine.models.cpu_gemm import (
    bag_gemv,
    bag_gemv_parts,
    bag_gemv_table,
    can_pack_for_cpu,
    split_gemv,
    split_gemv_parts,
    split_gemv_slices,
)
from engine.models.layers import (
    GatedMLP,
    Linear,
    OffsetRMSNorm,
    OneDNNLinearMethod,
    UnquantizedLinearMethod,
    activation,
)
from engine.models.rotary import RotaryEmbedding, apply_rope
from engine.models.weight_mapper import WeightMapper


def _filled_linear(out: int, inp: int, bias: bool = True, **kw) -> Linear:
    layer = Linear(inp, out, bias, torch.float32, torch.device("cpu"), **kw)
    torch.manual_seed(0)
    layer.weight.data.normal_()
    if layer.bias is not None:
        layer.bias.data.normal_()
    return layer


@pytest.mark.parametrize(
    "method",
    [
        UnquantizedLinearMethod(),
        UnquantizedLinearMethod(cpu_gemm_layout=True),
        *(
            pytest.param(
                OneDNNLinearMethod(split_gemv=split, bag_gemv=bag),
                marks=pytest.mark.skipif(
                    not can_pack_for_cpu(torch.float32, torch.device("cpu")), reason="no oneDNN"
                ),
            )
            for split, bag in ((False, False), (True, False), (False, True))
        ),
    ],
    ids=lambda m: (
        f"{m.name}-split{m.split_gemv}-bag{m.bag_gemv}"
        if isinstance(m, OneDNNLinearMethod)
        else m.name
    ),
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_methods_match_their_reference(method, dtype, threads):
    """Every row count on both sides of the split GEMV's limit, with 1 thread and 2 (40 output
    rows in up to twice the CPUs' slices); the bag GEMV at one row (in its 8 bags of 5 rows' table,
    built for whichever thread count loaded it) in both dtypes."""
    if isinstance(method, OneDNNLinearMethod) and not can_pack_for_cpu(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN {dtype} kernels")
    layer = _filled_linear(40, 24)
    layer.to(dtype)
    plain = layer.weight.data.clone()
    layer.process_weights_after_loading(method)
    torch.testing.assert_close(layer.dequantized_weight(), plain)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: 8 bits of mantissa
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 2, 3, 4, 5, 17):
            x = torch.randn(rows, 24).to(dtype)
            ref = (x.float() @ plain.float().T + layer.bias.float()).to(dtype)
            torch.testing.assert_close(layer(x), ref, rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(saved)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = GatedMLP(8, 6, False, "silu", torch.float32, torch.device("cpu"))


def test_weight_mapper_takes_split_or_fused_tensors_and_names_missing_ones():
    model = _Block()
    gate, up, down = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)
    WeightMapper(model).load(
        [("model.mlp.gate_proj.weight", gate), ("model.mlp.up_proj.weight", up),
         ("model.mlp.down_proj.weight", down)]
    )  # fmt: skip
    torch.testing.assert_close(model.mlp.gate_up_proj.weight.data, torch.cat([gate, up]))

    fused = _Block()
    WeightMapper(fused).load(
        [("model.mlp.gate_up_proj.weight", torch.cat([gate, up])),
         ("model.mlp.down_proj.weight", down)]
    )  # fmt: skip
    torch.testing.assert_close(fused.mlp.gate_up_proj.weight.data, torch.cat([gate, up]))

    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model\.mlp\.up_proj\.weight"):
        WeightMapper(_Block()).load(
            [("model.mlp.gate_proj.weight", gate), ("model.mlp.down_proj.weight", down)]
        )
    with pytest.raises(ValueError, match=r"model\.mlp\.up_proj\.weight has shape \(5, 8\)"):
        WeightMapper(_Block()).load([("model.mlp.up_proj.weight", torch.randn(5, 8))])


def test_offset_rmsnorm_is_one_plus_weight():
    norm = OffsetRMSNorm(4, 1e-6, torch.float32, torch.device("cpu"))
    norm.weight.data.zero_()
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(norm(x), x, rtol=1e-5, atol=1e-5)


def test_partial_rotary_passes_the_tail_through():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4))
    rope = RotaryEmbedding(inv_freq, 1.0, 8, 16, torch.float64, torch.device("cpu"))
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    cos, sin = rope(torch.tensor([0, 5, 9]))
    out = rope.apply(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[..., :4], apply_rope(x[..., :4], cos, sin))
    torch.testing.assert_close(out[0], x[0])  # position 0: identity


def test_unknown_activation_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"hidden_act 'relu2'.*silu"):
        activation("relu2")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),  # the engine runs it at one row; any T works
    parts=st.sampled_from([1, 2, 3, 4, 6]),
    slice_rows=st.integers(1, 9),
    in_features=st.integers(1, 33),
    bias=st.booleans(),
)
def test_split_gemv_equals_the_plain_product(rows, parts, slice_rows, in_features, bias):
    """The weight's row slices in one batched GEMM give x @ W.T (+ b) at one row (where the
    engine runs it) and at a few, and the output is one contiguous [T, out]."""
    torch.manual_seed(rows * 1000 + parts * 100 + slice_rows)
    out_features = parts * slice_rows
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    x = torch.randn(rows, in_features)
    out = split_gemv(x, split_gemv_slices(w, parts), b)
    assert out.shape == (rows, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_split_gemv_parts_divide_the_rows():
    """The largest divisor of the rows up to twice the CPUs, and at least a split in two."""
    assert split_gemv_parts(576, 2) == 4 and split_gemv_parts(576, 8) == 16
    assert split_gemv_parts(49152, 1) == 2  # one CPU still splits (one slice is torch's slow path)
    assert split_gemv_parts(7, 2) == 1  # no divisor up to 4: no split (oneDNN instead)
    assert split_gemv_parts(30, 2) == 3  # the largest divisor within twice the CPUs


@pytest.mark.skipif(
    not can_pack_for_cpu(torch.float32, torch.device("cpu")), reason="no oneDNN float32"
)
def test_one_row_results_do_not_depend_on_the_thread_count():
    """The adaptive CPU reservation moves the engine between 1 and all threads mid-request: a
    one-row product (batch-1 decode, the LM head) gives the same bits at every thread count
    (the split GEMV's slicing is fixed per layer; oneDNN at one thread rounded differently), and
    its first call fixes the slicing whatever the thread count then."""
    saved = torch.get_num_threads()
    try:
        for first_threads in (1, 2):
            layer = _filled_linear(96, 300)
            layer.process_weights_after_loading(OneDNNLinearMethod(split_gemv=True))
            x = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
            results = []
            for threads in (first_threads, 1, 2, 3):
                torch.set_num_threads(threads)
                results.append(layer(x))
            for out in results[1:]:
                assert torch.equal(out, results[0])
            assert layer.gemv_slices.shape[0] == split_gemv_parts(96, affinity_cpus()) > 1
            weight, bias = layer.weight.data.double(), layer.bias.data.double()
            ref = torch.nn.functional.linear(x.double(), weight, bias).float()
            torch.testing.assert_close(results[0], ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(saved)


@settings(max_examples=40, deadline=None)
@given(
    parts=st.sampled_from([1, 2, 3, 8, 16]),
    slice_rows=st.integers(1, 9),
    in_features=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_bag_gemv_equals_the_plain_product(parts, slice_rows, in_features, bias, dtype):
    """One embedding_bag over the weight's table (P bags, one per row slice) gives x @ W.T
    (+ b) at one row, as one contiguous [1, out]: exactly in float64, and in bfloat16 the
    correctly rounded float32-accumulated product (what oneDNN's linear returns too)."""
    torch.manual_seed(parts * 1000 + slice_rows * 100 + in_features)
    out_features = parts * slice_rows
    w = torch.randn(out_features, in_features).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    x = torch.randn(1, in_features).to(dtype)
    table = bag_gemv_table(w, parts)
    assert table.shape == (parts * in_features, slice_rows) and table.is_contiguous()
    out = bag_gemv(x, table, b)
    assert out.shape == (1, out_features) and out.is_contiguous() and out.dtype == dtype
    exact = x.double() @ w.double().T
    if dtype == torch.bfloat16:  # float32 sums, rounded once; then the bias in bfloat16
        expected = exact.to(dtype)
        expected = expected + b if b is not None else expected
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-6)
    else:
        expected = exact + b.double() if b is not None else exact
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_bag_gemv_parts_divide_the_rows_and_cover_the_threads():
    assert bag_gemv_parts(576, 2) == 8 and bag_gemv_parts(3072, 1) == 8
    assert bag_gemv_parts(576, 32) == 64  # two bags per thread on big machines
    assert bag_gemv_parts(49152, 2) == 128  # an LM head: table rows of 384 elements
    assert bag_gemv_parts(7, 2) == 7 and bag_gemv_parts(17, 2) == 1  # prime: one bag
    assert bag_gemv_parts(30, 2) == 6  # the largest divisor within the limit
