"""Sparse mixture-of-experts: top-k routing and the expert computation (Mixtral, Qwen2/3-MoE).

Routing (`route`), as transformers does it: router logits [T, E] -> softmax in float32 -> the
top-k probabilities and expert ids per token -> optionally renormalised to sum to one
(`norm_topk_prob`; Mixtral always). The weights stay float32 until they scale the experts'
outputs, whose sum is cast back to the model dtype.

Experts are stored stacked: `w13` [E, 2I, H] (gate rows 0..I-1, up rows I..2I-1) and `w2`
[E, H, I]; expert e computes down(act(gate(x)) * up(x)). Two implementations compute the same
weighted sum, out[t] = sum_j weight[t, j] * expert_{id[t, j]}(x[t]):

* `moe_reference`: the plain loop over all E experts, each finding its tokens with a mask;
* `moe_grouped`: one sort of the T * k (token, expert) pairs by expert, one gather of the rows,
  then per *active* expert one GEMM for gate/up and one for down over its contiguous slice (or a
  single `torch._grouped_mm` call per projection where that kernel runs: float32 / 16-bit), and
  one weighted scatter-add back. Experts that receive no token cost nothing.

`SparseMoeBlock` wraps router, experts and Qwen2-MoE's shared expert (a dense gated MLP whose
output is scaled by sigmoid(shared_expert_gate(x)) and added). Invariant: both implementations
agree to rounding for any routing, including experts with no token (tests/property/test_moe.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


class SparseMoeBlock(nn.Module):
    """Router + stacked experts (+ an optional sigmoid-gated shared expert).

    Parameters (weights are left uninitialised until a loader fills them):
        gate_weight [E, H]       router
        w13 [E, 2I, H], w2 [E, H, I]   experts (see the module docstring)
        shared_w13 [2S, H], shared_w2 [H, S], shared_gate [1, H]   Qwen2-MoE only
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
        act: Activation = F.silu,
        implementation: str = "loop",
    ) -> None:
        super().__init__()
        if implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe implementation must be one of {', '.join(MOE_IMPLEMENTATIONS)}, "
                f"got {implementation!r}"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in 1..{num_experts}")

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.top_k = top_k
        self.renormalize = renormalize
        self.act = act
        self.implementation = implementation
        self.intermediate_size = intermediate_size
        self.gate_weight = param(num_experts, hidden_size)
        self.w13 = param(num_experts, 2 * intermediate_size, hidden_size)
        self.w2 = param(num_experts, hidden_size, intermediate_size)
        self.shared_intermediate_size = shared_expert_intermediate_size
        self.shared_w13: nn.Parameter | None = None
        self.shared_w2: nn.Parameter | None = None
        self.shared_gate: nn.Parameter | None = None
        if shared_expert_intermediate_size:
            s = shared_expert_intermediate_size
            self.shared_w13 = param(2 * s, hidden_size)
            self.shared_w2 = param(hidden_size, s)
            self.shared_gate = param(1, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        weights, ids = route(F.linear(x, self.gate_weight), self.top_k, self.renormalize)
        out = moe(x, weights, ids, self.w13, self.w2, self.act, self.implementation)
        if self.shared_w13 is not None and self.shared_w2 is not None:
            shared = _expert(x, self.shared_w13, self.shared_w2, self.act)
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * shared
        return out

    def weight_targets(
        self, checkpoint_prefix: str, module_prefix: str, expert_names: tuple[str, str, str]
    ) -> dict[str, tuple[str, tuple[int | slice, ...]]]:
        """Checkpoint tensor name -> (our parameter name, index into it) for this block.

        `expert_names` are the checkpoint's (gate, up, down) names per expert: ("gate_proj",
        "up_proj", "down_proj") in Qwen, ("w1", "w3", "w2") in Mixtral; `checkpoint_prefix`
        is e.g. "model.layers.3.mlp", `module_prefix` our "layers.3.mlp".
        """
        gate, up, down = expert_names
        inter = self.intermediate_size
        ck, mod = checkpoint_prefix, module_prefix
        targets: dict[str, tuple[str, tuple[int | slice, ...]]] = {
            f"{ck}.gate.weight": (f"{mod}.gate_weight", ()),
        }
        for e in range(self.w13.shape[0]):
            targets[f"{ck}.experts.{e}.{gate}.weight"] = (f"{mod}.w13", (e, slice(0, inter)))
            targets[f"{ck}.experts.{e}.{up}.weight"] = (f"{mod}.w13", (e, slice(inter, 2 * inter)))
            targets[f"{ck}.experts.{e}.{down}.weight"] = (f"{mod}.w2", (e,))
        if self.shared_intermediate_size:
            s = self.shared_intermediate_size
            targets[f"{ck}.shared_expert.gate_proj.weight"] = (f"{mod}.shared_w13", (slice(0, s),))
            targets[f"{ck}.shared_expert.up_proj.weight"] = (
                f"{mod}.shared_w13",
                (slice(s, 2 * s),),
            )
            targets[f"{ck}.shared_expert.down_proj.weight"] = (f"{mod}.shared_w2", ())
            targets[f"{ck}.shared_expert_gate.weight"] = (f"{mod}.shared_gate", ())
        return targets
