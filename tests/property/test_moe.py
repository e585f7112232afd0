"""The grouped MoE equals the plain expert loop, for any routing.

Hypothesis draws token counts (including a single token, so most experts get nothing), expert
counts, top-k, renormalisation, and a router bias that can starve or flood experts; the grouped
implementation (sort + GEMM per active expert, and torch._grouped_mm where it runs) must equal
`moe_reference`, and the routing must match transformers' (softmax in float32, then top-k).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models.moe import SparseMoeBlock, moe_grouped, moe_reference, route


@st.composite
def moe_cases(draw):
    num_experts = draw(st.integers(1, 8))
    return dict(
        num_tokens=draw(st.integers(1, 24)),
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        renormalize=draw(st.booleans()),
        hidden=draw(st.sampled_from([4, 8, 16])),
        inter=draw(st.sampled_from([2, 6, 16])),
        # A large bias on a few experts sends every token there: the others get none.
        skew=draw(st.sampled_from([0.0, 20.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_case(num_tokens, num_experts, top_k, renormalize, hidden, inter, skew, seed, dtype):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = randn(num_tokens, hidden)
    logits = randn(num_tokens, num_experts).to(torch.float64)
    logits[:, : min(top_k, num_experts)] += skew
    weights, ids = route(logits.to(dtype), top_k, renormalize)
    return x, weights, ids, randn(num_experts, 2 * inter, hidden), randn(num_experts, hidden, inter)


@settings(max_examples=120, deadline=None)
@given(moe_cases())
def test_grouped_equals_reference_float64(case):
    x, weights, ids, w13, w2 = make_case(**case, dtype=torch.float64)
    expected = moe_reference(x, weights, ids, w13, w2, F.silu)
    out = moe_grouped(x, weights, ids, w13, w2, F.silu)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(moe_cases())
def test_grouped_mm_equals_reference_float32(case):
    x, weights, ids, w13, w2 = make_case(**case, dtype=torch.float32)
    expected = moe_reference(x, weights, ids, w13, w2, F.silu)
    for use_grouped_mm in (False, True):
        out = moe_grouped(x, weights, ids, w13, w2, F.silu, use_grouped_mm=use_grouped_mm)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_reference_is_the_definition():
    """moe_reference against a per-token, per-slot sum written out longhand."""
    x, weights, ids, w13, w2 = make_case(5, 4, 2, False, 8, 6, 0.0, 1, torch.float64)
    out = moe_reference(x, weights, ids, w13, w2, F.silu)
    for t in range(5):
        want = torch.zeros(8, dtype=torch.float64)
        for j in range(2):
            e = int(ids[t, j])
            gate, up = w13[e, :6] @ x[t], w13[e, 6:] @ x[t]
            want += float(weights[t, j]) * (w2[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(out[t], want, rtol=1e-12, atol=1e-12)


def test_experts_without_tokens_are_skipped():
    x, weights, ids, w13, w2 = make_case(3, 8, 1, True, 8, 6, 20.0, 2, torch.float64)
    assert ids.unique().tolist() == [0]  # the skew sends every token to expert 0
    w13[1:] = float("nan")  # experts that get no token must not be touched
    w2[1:] = float("nan")
    for out in (
        moe_reference(x, weights, ids, w13, w2, F.silu),
        moe_grouped(x, weights, ids, w13, w2, F.silu),
    ):
        assert torch.isfinite(out).all()


def test_route_matches_transformers_routers():
    logits = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, 2, dim=-1)
    weights, ids = route(logits, 2, renormalize=False)
    assert weights.dtype == torch.float32
    assert torch.equal(ids, idx) and torch.equal(weights, top)
    weights, _ = route(logits, 2, renormalize=True)
    assert torch.equal(weights, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("implementation", ["reference", "loop", "grouped_mm"])
def test_block_with_shared_expert(implementation):
    """Qwen2-MoE: out = routed experts + sigmoid(shared_gate . x) * shared_expert(x)."""
    gen = torch.Generator().manual_seed(3)
    block = SparseMoeBlock(
        8, 6, 4, 2, False, torch.float32, torch.device("cpu"), 10, implementation=implementation
    )
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    weights, ids = route(x @ block.gate.weight.T, 2, False)
    w13, w2 = block.w13.view(4, 12, 8), block.w2.view(4, 8, 6)
    routed = moe_reference(x, weights, ids, w13, w2, F.silu)
    shared_mlp = block.shared_expert
    gate, up = (x @ shared_mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
    shared = (F.silu(gate) * up) @ shared_mlp.down_proj.weight.T
    expected = routed + torch.sigmoid(x @ block.shared_expert_gate.weight.T) * shared
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_expert_targets_fill_the_stacks():
    """Per-expert checkpoint tensors (Mixtral's w1/w3/w2 names) land in their experts' rows."""
    from engine.models.weight_mapper import WeightMapper

    block = SparseMoeBlock(8, 6, 3, 2, True, torch.float64, torch.device("cpu"))
    mapper = WeightMapper(block, checkpoint_name=lambda n: n)
    block.add_expert_targets(mapper, "moe", "", ("w1", "w3", "w2"))
    gen = torch.Generator().manual_seed(0)
    tensors = {"gate.weight": torch.randn(3, 8, generator=gen, dtype=torch.float64)}
    for e in range(3):
        for name, shape in (("w1", (6, 8)), ("w3", (6, 8)), ("w2", (8, 6))):
            tensors[f"moe.experts.{e}.{name}.weight"] = torch.randn(
                *shape, generator=gen, dtype=torch.float64
            )
    mapper.load(tensors.items())
    w13, w2 = block.w13.view(3, 12, 8), block.w2.view(3, 8, 6)
    for e in range(3):
        assert torch.equal(w13[e, :6], tensors[f"moe.experts.{e}.w1.weight"])
        assert torch.equal(w13[e, 6:], tensors[f"moe.experts.{e}.w3.weight"])
        assert torch.equal(w2[e], tensors[f"moe.experts.{e}.w2.weight"])
    del tensors["moe.experts.1.w3.weight"]
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): moe.experts.1.w3.weight"):
        mapper.load(tensors.items())


def test_block_rejects_bad_settings():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        SparseMoeBlock(8, 6, 4, 5, False, torch.float32, cpu)
    with pytest.raises(ValueError, match="moe implementation must be one of"):
        SparseMoeBlock(8, 6, 4, 2, False, torch.float32, cpu, implementation="fast")


def test_grouped_mm_runs_where_it_can(monkeypatch):
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    x, weights, ids, w13, w2 = make_case(6, 4, 2, True, 16, 16, 20.0, 5, torch.float32)
    expected = moe_reference(x, weights, ids, w13, w2, F.silu)
    out = moe_grouped(x, weights, ids, w13, w2, F.silu, use_grouped_mm=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # gate/up and down, one call each
    x, weights, ids, w13, w2 = make_case(6, 4, 2, True, 16, 6, 0.0, 5, torch.float32)
    moe_grouped(x, weights, ids, w13, w2, F.silu, use_grouped_mm=True)  # I * 4 bytes % 16 != 0
    assert len(calls) == 2  # fell back to the loop
