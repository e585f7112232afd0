"""Sparse mixture-of-experts: top-k routing and the expert computation (Mixtral, Qwen2/3-MoE).

Routing (`route`), as transformers does it: router logits [T, E] -> softmax in float32 -> the
top-k probabilities and expert ids per token -> optionally renormalised to sum to one
(`norm_topk_prob`; Mixtral always). The weights stay float32 until they scale the experts'
outputs, whose sum is cast back to the model dtype.

Experts are stacked: `w13` [E, 2I, H] (gate rows 0..I-1, up rows I..2I-1) and `w2` [E, H, I]
(stored 2-D, [E * 2I, H] and [E * H, I], so the weight mapper fills them by rows); expert e
computes down(act(gate(x)) * up(x)). Two implementations compute the same weighted sum,
out[t] = sum_j weight[t, j] * expert_{id[t, j]}(x[t]):

* `moe_reference`: the plain loop over all E experts, each finding its tokens with a mask;
* `moe_grouped`: one sort of the T * k (token, expert) pairs by expert, one gather of the rows,
  then per *active* expert one GEMM for gate/up and one for down over its contiguous slice (or a
  single `torch._grouped_mm` call per projection where that kernel runs: float32 / 16-bit), and
  one weighted scatter-add back. Experts that receive no token cost nothing.

Tensor parallelism shards every expert by its intermediate dimension (not experts over
ranks): each rank computes every routed expert on its slice of gate/up rows and down columns,
and the shared expert likewise; the partial outputs are summed by one all-reduce per block. The
router is replicated, so every rank routes identically.

`SparseMoeBlock` wraps router, experts and Qwen2-MoE's shared expert (a dense gated MLP whose
output is scaled by sigmoid(shared_expert_gate(x)) and added). Invariant: both implementations
agree to rounding for any routing, including experts with no token (tests/property/test_moe.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.communication import all_reduce
from engine.distributed.parallel_state import current_tp
from engine.models.layers import GatedMLP, activation, empty_param, even_slice
from engine.models.weight_mapper import Target, WeightMapper

Activation = Callable[[torch.Tensor], torch.Tensor]
MOE_IMPLEMENTATIONS = ("reference", "loop", "grouped_mm")
# Measured on the 2-core CPUs here (E=8, k=2, H=512, I=1024 and E=64, k=8, H=512, I=256; 1-128
# tokens): torch._grouped_mm and the per-expert loop are within noise of each other, so CPU
# defaults to the loop; CUDA (a real grouped kernel) to grouped_mm.


def default_implementation(device: torch.device) -> str:
    return "grouped_mm" if device.type == "cuda" else "loop"


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def route(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] float32, expert ids [T, k] int64
    """Softmax (float32) over all experts, then the top-k, renormalised if asked."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _expert(
    x: torch.Tensor,  # [n, H]
    w13: torch.Tensor,  # [2I, H]
    w2: torch.Tensor,  # [H, I]
    act: Activation,
) -> torch.Tensor:  # [n, H]
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(act(gate) * up, w2)


def moe_reference(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    act: Activation,
) -> torch.Tensor:  # [T, H]
    """The obviously correct loop: every expert in turn, over the tokens routed to it."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
    for e in range(w13.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)  # [n] each
        if token.numel() == 0:
            continue
        y = _expert(x[token], w13[e], w2[e], act)  # [n, H]
        out.index_add_(0, token, y * weights[token, slot, None])
    return out.to(x.dtype)


def moe_grouped(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    act: Activation,
    use_grouped_mm: bool = False,
) -> torch.Tensor:  # [T, H]
    """Tokens grouped by expert: one sort, one gather, GEMMs over contiguous slices, one
    scatter-add. With use_grouped_mm each projection is one `torch._grouped_mm` call (where
    `grouped_mm_runs`; otherwise the per-expert loop)."""
    num_tokens, top_k = ids.shape
    num_experts = w13.shape[0]
    flat_ids = ids.reshape(-1)  # [T * k]
    order = torch.argsort(flat_ids, stable=True)  # pairs sorted by expert
    token = order // top_k  # [T * k]: the token of each sorted pair
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    rows = x.index_select(0, token)  # [T * k, H]
    if use_grouped_mm and grouped_mm_runs(x, w13, w2):
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # [E] end of each expert's rows
        gate_up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets)  # [T * k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm((act(gate) * up).contiguous(), w2.transpose(1, 2), offs=offsets)
    else:
        y = torch.empty_like(rows)  # [T * k, H]
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync for the whole layer
            if n:
                y[start : start + n] = _expert(rows[start : start + n], w13[e], w2[e], act)
            start += n
    pair_weights = weights.reshape(-1)[order]  # [T * k] float32
    out = torch.zeros(
        (num_tokens, x.shape[1]),
        dtype=torch.promote_types(x.dtype, weights.dtype),
        device=x.device,
    )
    out.index_add_(0, token, y * pair_weights[:, None])
    return out.to(x.dtype)


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: Activation,
    implementation: str = "loop",
) -> torch.Tensor:
    """Dispatches to an implementation by name (see MOE_IMPLEMENTATIONS); "grouped_mm" falls
    back to the loop where its kernel does not run (float64, odd widths)."""
    if implementation == "reference":
        return moe_reference(x, weights, ids, w13, w2, act)
    return moe_grouped(x, weights, ids, w13, w2, act, use_grouped_mm=implementation == "grouped_mm")


def grouped_mm_runs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: float32 / 16-bit, and every row stride
    of the (transposed) weights a multiple of 16 bytes."""
    if x.dtype not in _GROUPED_MM_DTYPES or not hasattr(torch, "_grouped_mm"):
        return False
    size = x.element_size()
    return all(dim * size % 16 == 0 for dim in (w13.shape[1], w13.shape[2], w2.shape[2]))


class GateLinear(nn.Module):
    """x W^T for a router or a shared-expert gate: a plain weight [out, in] in the model dtype,
    deliberately not a `layers.Linear`, so no quantization method ever applies to it (its
    outputs pick the experts; vLLM keeps routers unquantized too)."""

    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """Router + stacked experts (+ an optional sigmoid-gated shared expert), one MoE layer.

    Modules and parameters (uninitialised until a loader fills them):
        gate                GateLinear [E, H]: the router (never quantized)
        w13 [E * 2I, H]     experts' gate/up, expert e's rows e * 2I ... (e + 1) * 2I - 1
        w2  [E * H, I]      experts' down, expert e's rows e * H ... (e + 1) * H - 1
        shared_expert       GatedMLP (Qwen2-MoE), scaled by sigmoid(shared_expert_gate(x))
    The stacks are stored 2-D so that each checkpoint tensor fills a row range
    (`add_expert_targets`); the forward views them as [E, 2I, H] and [E, H, I].
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        dtype: torch.dtype,
        device: torch.device,
        shared_expert_intermediate_size: int | None = None,
        hidden_act: str = "silu",
        implementation: str | None = None,
    ) -> None:
        super().__init__()
        implementation = implementation or default_implementation(device)
        if implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe implementation must be one of {', '.join(MOE_IMPLEMENTATIONS)}, "
                f"got {implementation!r}"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in 1..{num_experts}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.renormalize = renormalize
        self.act = activation(hidden_act)
        self.implementation = implementation
        # Tensor parallelism: every rank holds every expert's slice `inter` of the
        # intermediate dimension (gate/up rows, down columns); the router is replicated.
        self.tp = current_tp()
        self.inter = even_slice(intermediate_size, self.tp, "moe intermediate_size")
        intermediate_size = self.inter.size
        self.intermediate_size = intermediate_size
        self.gate = GateLinear(hidden_size, num_experts, dtype, device)
        self.w13 = empty_param(
            num_experts * 2 * intermediate_size, hidden_size, dtype=dtype, device=device
        )
        self.w2 = empty_param(
            num_experts * hidden_size, intermediate_size, dtype=dtype, device=device
        )
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: GateLinear | None = None
        if shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(
                hidden_size,
                shared_expert_intermediate_size,
                False,
                hidden_act,
                dtype,
                device,
                reduce_results=False,  # summed with the experts' partial outputs below
            )
            self.shared_expert_gate = GateLinear(hidden_size, 1, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        w13 = self.w13.view(self.num_experts, 2 * self.intermediate_size, self.hidden_size)
        w2 = self.w2.view(self.num_experts, self.hidden_size, self.intermediate_size)
        out = moe(x, weights, ids, w13, w2, self.act, self.implementation)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out, self.tp)  # the ranks' intermediate slices: one sum per block

    def add_expert_targets(
        self,
        mapper: WeightMapper,
        checkpoint_prefix: str,
        module_prefix: str,
        expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        """Registers the checkpoint names of every expert's tensors with a weight mapper.

        `expert_names`: the checkpoint's (gate, up, down) names per expert, ("gate_proj",
        "up_proj", "down_proj") in Qwen, ("w1", "w3", "w2") in Mixtral; `checkpoint_prefix` is
        e.g. "model.layers.3.mlp", `module_prefix` our "layers.3.mlp" ("" for the block itself).
        """
        gate, up, down = expert_names
        inter, hidden = self.intermediate_size, self.hidden_size
        rows = cols = None
        if self.tp.is_parallel:  # this rank's slice of the intermediate dimension
            rows = self.inter.take
            cols = functools.partial(self.inter.take, dim=1)
        for e in range(self.num_experts):
            experts = f"{checkpoint_prefix}.experts.{e}"
            w13, w2 = (f"{module_prefix}.{n}" if module_prefix else n for n in ("w13", "w2"))
            mapper.add(f"{experts}.{gate}.weight", Target(w13, 2 * inter * e, inter, rows))
            mapper.add(f"{experts}.{up}.weight", Target(w13, 2 * inter * e + inter, inter, rows))
            mapper.add(f"{experts}.{down}.weight", Target(w2, hidden * e, hidden, cols))
