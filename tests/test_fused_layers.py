"""The hand-fused small-batch ops of the model layer against their unfused definitions:
RMSNorm's float32 fast path and its fused residual add, rotate-half RoPE, the gated MLP's
act(gate) * up. Exact in float64 (and in float32, where the same products are summed in the same
order); each also keeps its op-call budget (a decode step is thousands of these calls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from engine.models.layers import GatedMLP, RMSNorm
from engine.models.rotary import apply_rope

CPU = torch.device("cpu")


def _hf_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, verbatim arithmetic."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half form; `sin` here is the plain (unsigned) table."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _op_calls(fn) -> int:
    fn()  # warm
    with profile() as prof:
        fn()
    return len([e for e in prof.events() if e.name.startswith("aten::")])


def _norm(dim: int, dtype: torch.dtype, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(dim, eps, dtype, CPU)
    norm.weight.data = torch.randn(dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_rmsnorm_equals_transformers_bit_for_bit(dtype, rows):
    norm = _norm(576, dtype)
    x = (torch.randn(rows, 576, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    assert torch.equal(norm(x), _hf_rmsnorm(x, norm.weight, norm.eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_norm_is_the_residual_add_then_the_norm_in_place(dtype):
    norm = _norm(64, dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    residual = torch.randn(3, 64, generator=gen).to(dtype)
    want_sum = residual + x  # transformers: residual + hidden
    want = _hf_rmsnorm(want_sum, norm.weight, norm.eps)
    x_in, residual_in = x.clone(), residual.clone()
    out, summed = norm.add_norm(x_in, residual_in)
    assert torch.equal(summed, want_sum) and torch.equal(out, want)
    assert summed.data_ptr() == x_in.data_ptr()  # in place: no new residual tensor
    assert torch.equal(residual_in, residual)  # the residual operand is left as it was


def test_add_norm_runs_the_norms_forward_hooks():
    norm = _norm(8, torch.float32)
    seen = []
    norm.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    out, _ = norm.add_norm(torch.randn(2, 8), torch.randn(2, 8))
    assert len(seen) == 1 and torch.equal(seen[0], out)


@pytest.mark.parametrize(("dtype", "budget"), [(torch.float32, 8), (torch.bfloat16, 16)])
def test_rmsnorm_op_budget(dtype, budget):
    norm = _norm(576, dtype)
    x = torch.randn(1, 576).to(dtype)
    # before the tensor operands and in-place temporaries: 19 calls (float32), 27 (bfloat16)
    assert _op_calls(lambda: norm(x)) <= budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rope_equals_rotate_half_exactly(dtype, contiguous):
    gen = torch.Generator().manual_seed(4)
    t, h, d = 3, 5, 16
    if contiguous:
        x = torch.randn(t, h, d, generator=gen).to(dtype)
    else:  # a slice of a fused q/k/v output, as the attention module passes it
        x = torch.randn(t, h * d + 24, generator=gen).to(dtype)[:, : h * d].view(t, h, d)
    angles = torch.randn(t, 1, d // 2, generator=gen)
    cos = torch.cat((angles, angles), -1).cos().to(dtype)
    sin = torch.cat((angles, angles), -1).sin().to(dtype)
    signed = sin.clone()
    signed[..., : d // 2] *= -1  # RotaryEmbedding's table carries rotate-half's sign
    assert torch.equal(apply_rope(x, cos, signed), _rotate_half_rope(x, cos, sin))


def test_rope_partial_rotary_view_is_exact():
    x = torch.randn(2, 3, 24)[..., :16]  # the rotated head part of a partial-rotary head
    cos, sin = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    assert torch.equal(apply_rope(x, cos, sin), x * cos + x.roll(8, dims=-1) * sin)


def test_rope_op_budget():
    x = torch.randn(1, 12, 64)
    cos, sin = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    assert _op_calls(lambda: apply_rope(x, cos, sin)) <= 11  # 17 with roll


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_mlp_equals_the_unfused_product(act, dtype):
    mlp = GatedMLP(16, 24, False, act, dtype, CPU)
    gen = torch.Generator().manual_seed(5)
    mlp.gate_up_proj.weight.data = torch.randn(48, 16, generator=gen).to(dtype)
    mlp.down_proj.weight.data = torch.randn(16, 24, generator=gen).to(dtype)
    x = torch.randn(4, 16, generator=gen).to(dtype)
    w_gate, w_up = mlp.gate_up_proj.weight.data.split(24)
    act_fn = F.silu if act == "silu" else (lambda v: F.gelu(v, approximate="tanh"))
    want = F.linear(act_fn(F.linear(x, w_gate)) * F.linear(x, w_up), mlp.down_proj.weight)
    got = mlp(x)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    else:  # the fused gate/up GEMM may sum in another order than two separate ones
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
