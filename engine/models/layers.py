"""Building blocks shared by every model family: linear layers with a weight format chosen at
load time, RMSNorm variants, the attention module that calls the backend, gated MLPs.

A family file (llama.py, ...) composes these and holds only what differs between families.

Linear layers and their methods (vLLM's LinearMethodBase idea). A `Linear` owns a plain weight
parameter [out, in] that the loader fills; after loading, a `LinearMethod` chosen for the whole
model (`process_weights_after_loading`) may convert it to another format (oneDNN's packed layout,
int8 or int4 codes with scales) and free the plain copy. From then on `Linear.forward` runs
`method.apply`. Whatever the format, its meaning is defined by one reference:

    y = x @ method.dequantized_weight(layer).T (+ bias)

and every fast method is tested against that reference. A fused linear (q/k/v in one
`qkv_proj`, gate/up in one `gate_up_proj`) names its row shards (`shard_names`,
`output_sizes`), so the weight mapper (weight_mapper.py) can fill it from split or fused
checkpoint tensors.

Tensor parallelism (Megatron's scheme, engine/distributed): layers built inside
`parallel_state.model_parallel(tp)` hold only their rank's share, and the weight mapper fills
them from full checkpoint tensors through `Linear.checkpoint_transform`:

    column-parallel  each row shard (q, k, v / gate, up / the vocabulary) keeps the rows
                     `RowSlice(full, start, size)` of its full tensor; no communication
    row-parallel     the input columns `col_slice`; the partial products are summed over the
                     ranks (one all-reduce) unless `reduce_results` is False (the caller
                     reduces, e.g. an MoE block once for its experts and shared expert); the
                     bias is added on rank 0 only (other ranks hold zeros)
    vocab-parallel   `VocabParallelEmbedding`: rank r holds vocabulary rows [r V/n, (r+1) V/n)
                     of the vocabulary padded to a multiple of n; ids outside give zeros, one
                     all-reduce sums the ranks' lookups
Attention splits its query heads evenly and its KV heads evenly, or, with fewer KV heads than
ranks, gives each rank the one KV head its query heads use (replicated, as vLLM does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.cpu_contention import affinity_cpus
from engine.distributed.communication import all_reduce
from engine.distributed.parallel_state import TPGroup, current_tp
from engine.kv_cache import LayerKVCache
from engine.models.cpu_gemm import (
    SPLIT_GEMV_MAX_ROWS,
    bag_gemv,
    bag_gemv_parts,
    bag_gemv_table,
    can_pack_for_cpu,
    one_row_copies_enabled,
    onednn_linear,
    pack_weight,
    split_gemv,
    split_gemv_parts,
    split_gemv_slices,
)
from engine.models.rotary import apply_rope


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


# ---- tensor-parallel slices -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowSlice:
    """The part [start, start + size) of a dimension of `full` elements this rank holds."""

    full: int
    start: int
    size: int

    def take(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if t.shape[dim] < self.full:  # a padded dimension (the vocabulary): zeros past the end
            pad_shape = list(t.shape)
            pad_shape[dim] = self.full - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
        return t.narrow(dim, self.start, self.size).contiguous()


def even_slice(full: int, tp: TPGroup, what: str, unit: int = 1) -> RowSlice:
    """Rank tp.rank's equal share of `full` units of `unit` elements (ValueError naming `what`
    when the units do not divide evenly)."""
    if full % tp.size:
        raise ValueError(
            f"tensor_parallel_size {tp.size} does not divide {what} ({full}); choose a "
            "tensor_parallel_size that does"
        )
    size = full // tp.size
    return RowSlice(full * unit, tp.rank * size * unit, size * unit)


def kv_head_slice(num_kv_heads: int, num_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first KV head, KV heads) of this rank: an even split, or with fewer KV heads than ranks
    the one KV head the rank's query heads read (replicated over tp.size / num_kv_heads ranks)."""
    if num_kv_heads >= tp.size:
        if num_kv_heads % tp.size:
            raise ValueError(
                f"tensor_parallel_size {tp.size} does not divide num_key_value_heads "
                f"({num_kv_heads})"
            )
        local = num_kv_heads // tp.size
        return tp.rank * local, local
    if tp.size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads ({num_kv_heads}) must divide tensor_parallel_size ({tp.size}) "
            "when it is smaller (the KV heads are then replicated)"
        )
    first_q_head = tp.rank * (num_heads // tp.size)
    return first_q_head // (num_heads // num_kv_heads), 1


# ---- linear methods ------------------------------------------------------------------------


class LinearMethod:
    """How a `Linear` stores its weight and multiplies by it (one instance serves many layers).

    Invariant: after `process_weights_after_loading(layer)`, `apply(layer, x)` equals
    `x @ dequantized_weight(layer).T + bias` up to the method's documented rounding.
    """

    name = "base"

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Converts layer.weight (plain, [out, in], loaded) into this method's format."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        raise NotImplementedError

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:  # [out, in]
        raise NotImplementedError

    def weight_tensors(self, layer: Linear) -> list[torch.Tensor]:
        """The tensors holding the weight in this format (for the start-up memory log)."""
        return [layer.weight.data]


class UnquantizedLinearMethod(LinearMethod):
    """F.linear on the plain weight.

    With `cpu_gemm_layout`, the weight is stored column-major ([in, out] in memory, logical
    shape kept), so every F.linear is a plain x @ W_t GEMM for MKL. Measured on the 2-core CPUs
    here (SmolLM-135M shapes, best of 15 interleaved runs): the 30 layers' linears take 24 ms
    instead of 29 at 1 row and are 1-5% faster from 8 to 512 rows; the 49152 x 576 LM head
    takes 5.5 ms instead of 10.7 at 1 row.
    """

    name = "unquantized"

    def __init__(self, cpu_gemm_layout: bool = False) -> None:
        self.cpu_gemm_layout = cpu_gemm_layout

    def process_weights_after_loading(self, layer: Linear) -> None:
        w = layer.weight.data
        if self.cpu_gemm_layout and not w.t().is_contiguous():
            layer.weight.data = w.t().contiguous().t()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        return layer.weight.data


class OneDNNLinearMethod(LinearMethod):
    """oneDNN's linear on CPU (engine/models/cpu_gemm.py has the measurements): the weight in
    oneDNN's blocked layout (`layer.packed`), plus at most one copy for one-row inputs:

    - `split_gemv` (float32 by default): the plain weight stays (`layer.weight`, contiguous
      [out, in]; a tied LM head shares the embedding's), and up to `SPLIT_GEMV_MAX_ROWS` rows
      run the split GEMV on it (its row slices in one batched GEMM, the slicing fixed per layer
      and machine, so one-row results do not depend on the thread count).
    - `bag_gemv` (bfloat16 by default): the weight as the bag GEMV's table
      (`layer.gemv_table`, [P * in, out / P]), which one-row inputs run on (one embedding_bag,
      the bags spread over the threads).

    Either way batch-1 decode reads the weights at the memory bandwidth, at the cost of the
    second copy. Without the plain copy `layer.weight` keeps only its shape (0 rows, no
    storage). Same values with every kernel; the rounding of the float32 sums differs between
    the split GEMV and oneDNN (and so between row counts), while the bag GEMV and oneDNN both
    round bfloat16 outputs from float32 sums (equal but for rare 1-ulp differences).
    """

    name = "onednn"

    def __init__(self, split_gemv: bool = False, bag_gemv: bool = False) -> None:
        if split_gemv and bag_gemv:
            raise ValueError("split_gemv and bag_gemv are alternatives: pick one")
        self.split_gemv = split_gemv
        self.bag_gemv = bag_gemv

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.packed = pack_weight(layer.weight.data)
        if self.bag_gemv:
            parts = bag_gemv_parts(layer.out_features, torch.get_num_threads())
            layer.gemv_table = bag_gemv_table(layer.weight.data, parts)
        if not self.split_gemv:
            layer.weight.data = layer.weight.data.new_empty(0, layer.in_features)
        elif not layer.weight.data.is_contiguous():
            layer.weight.data = layer.weight.data.contiguous()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        assert layer.packed is not None
        rows = x.shape[0]
        if self.bag_gemv and rows == 1 and layer.gemv_table is not None:
            return bag_gemv(x, layer.gemv_table, layer.bias)
        if self.split_gemv and rows <= SPLIT_GEMV_MAX_ROWS:
            slices = layer.gemv_slices
            if slices is None:  # first call; the slicing then stays, whatever the thread count
                parts = split_gemv_parts(layer.out_features, affinity_cpus())
                slices = layer.gemv_slices = split_gemv_slices(layer.weight.data, parts)
            if slices.shape[0] > 1:
                return split_gemv(x, slices, layer.bias)
        return onednn_linear(x, layer.packed, layer.bias)

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        assert layer.packed is not None
        if self.split_gemv:
            return layer.weight.data
        eye = torch.eye(layer.in_features, dtype=layer.packed.dtype)
        return onednn_linear(eye, layer.packed, None).t().contiguous()  # exact: x = I

    def weight_tensors(self, layer: Linear) -> list[torch.Tensor]:
        assert layer.packed is not None
        if self.split_gemv:
            return [layer.packed, layer.weight.data]
        if self.bag_gemv and layer.gemv_table is not None:
            return [layer.packed, layer.gemv_table]
        return [layer.packed]


def split_gemv_enabled(dtype: torch.dtype) -> bool:
    """The split GEMV for float32 CPU linears, unless ENGINE_SPLIT_GEMV=0 (which saves the
    plain copy of every weight: packed only, as before). bfloat16 takes the bag GEMV instead:
    torch's bfloat16 batched GEMM is slower than oneDNN's packed one (35 vs 15.8 ms for
    SmolLM-135M's weights)."""
    return dtype == torch.float32 and one_row_copies_enabled()


def bag_gemv_enabled(dtype: torch.dtype) -> bool:
    """The bag GEMV for bfloat16 CPU linears, unless ENGINE_SPLIT_GEMV=0 (packed only: the one
    switch for both one-row copies)."""
    return dtype == torch.bfloat16 and one_row_copies_enabled()


def default_linear_method(dtype: torch.dtype, device: torch.device) -> LinearMethod:
    """Unquantized weights: oneDNN-packed on CPU float32 (plus the split GEMV's plain copy) and
    bfloat16 (plus the bag GEMV's table), column-major on other CPU dtypes (float64, float16),
    plain elsewhere."""
    if can_pack_for_cpu(dtype, device):
        return OneDNNLinearMethod(
            split_gemv=split_gemv_enabled(dtype), bag_gemv=bag_gemv_enabled(dtype)
        )
    return UnquantizedLinearMethod(cpu_gemm_layout=device.type == "cpu")


class Linear(nn.Module):
    """y = x W^T (+ b), with weights left uninitialised until the loader fills them.

    `output_sizes` / `shard_names` describe a fused layer's row shards (e.g. q, k, v), in order;
    an unfused layer has one shard and no names. `method` is set once after loading
    (`process_weights_after_loading`); until then the plain weight is used.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        output_sizes: Sequence[int] | None = None,
        shard_names: Sequence[str] | None = None,
        *,
        row_slices: Sequence[RowSlice] | None = None,
        col_slice: RowSlice | None = None,
        reduce_results: bool = True,
        tp: TPGroup | None = None,
    ) -> None:
        """Sizes are this rank's. Tensor parallelism (with a non-trivial `tp`): `row_slices`
        (column-parallel: one per output shard, the rows of the full shard held here) or
        `col_slice` (row-parallel: the input columns held here)."""
        super().__init__()
        self.tp = tp if tp is not None else current_tp()
        if not self.tp.is_parallel:
            row_slices = col_slice = None
        if row_slices is not None and col_slice is not None:
            raise ValueError("a linear layer is column- or row-parallel, not both")
        self.row_slices = tuple(row_slices) if row_slices is not None else None
        self.col_slice = col_slice
        self.reduce_results = reduce_results
        self.in_features = in_features
        self.out_features = out_features
        self.output_sizes = tuple(output_sizes) if output_sizes else (out_features,)
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"output_sizes {self.output_sizes} do not sum to {out_features}")
        self.shard_names = tuple(shard_names) if shard_names else ()
        if self.shard_names and len(self.shard_names) != len(self.output_sizes):
            raise ValueError("shard_names and output_sizes differ in length")
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN-blocked weight (OneDNNLinearMethod)
        # The plain weight as [P, out / P, in] for the split GEMV (OneDNNLinearMethod, float32)
        self.gemv_slices: torch.Tensor | None = None
        # The bag GEMV's table [P * in, out / P] (OneDNNLinearMethod, bfloat16)
        self.gemv_table: torch.Tensor | None = None
        self.method: LinearMethod = UnquantizedLinearMethod()
        # Whether methods may quantize this layer's input (int8 activations): False for inputs
        # with outlier channels, such as a gated MLP's down projection.
        self.quantizable_input = True

    def shard_offsets(self) -> list[tuple[str, int, int]]:
        """(shard name, first row, row count) of each named shard."""
        out, offset = [], 0
        for name, size in zip(self.shard_names, self.output_sizes, strict=True):
            out.append((name, offset, size))
            offset += size
        return out

    @property
    def parallel(self) -> str | None:
        """The mode: "column", "row" or None (the whole layer on every rank)."""
        if self.row_slices is not None:
            return "column"
        return "row" if self.col_slice is not None else None

    def checkpoint_transform(
        self, suffix: str, shard_index: int | None
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Full checkpoint tensor -> this rank's part, for `suffix` ("weight" / "bias") of shard
        `shard_index` (None: a tensor covering every shard, e.g. Phi-3's fused qkv_proj)."""
        if self.row_slices is not None:
            slices = self.row_slices
            if shard_index is not None:
                return slices[shard_index].take
            if len(slices) == 1:
                return slices[0].take

            def split_fused(t: torch.Tensor) -> torch.Tensor:
                parts = t.split([s.full for s in slices], dim=0)
                return torch.cat([s.take(p) for s, p in zip(slices, parts, strict=True)])

            return split_fused
        if self.col_slice is not None:
            if suffix == "bias":  # added once: on rank 0
                return (lambda t: t) if self.tp.rank == 0 else torch.zeros_like
            col = self.col_slice
            return lambda t: col.take(t, dim=1)
        return None

    def shard_quantized(
        self, parts: list[tuple[torch.Tensor, ...]], group_size: int
    ) -> tuple[torch.Tensor, ...] | None:
        """Group-quantized checkpoint tensors (codes [rows, in], scale, zero [rows, in / G]),
        one per source in row order (one per shard, or one fused tensor) -> this rank's part,
        concatenated. None when this rank's input columns do not start and end on group
        boundaries (the caller falls back to the float weight)."""
        if self.row_slices is not None:
            slices = self.row_slices
            if len(parts) == 1 and len(slices) > 1:  # one fused tensor: split it by shard
                fused = parts[0]
                parts = list(
                    zip(*(t.split([s.full for s in slices], dim=0) for t in fused), strict=True)
                )
            return tuple(
                torch.cat([s.take(part[i]) for s, part in zip(slices, parts, strict=True)])
                for i in range(len(parts[0]))
            )
        joined = tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
        if self.col_slice is None:
            return joined
        col = self.col_slice
        if col.start % group_size or col.size % group_size:
            return None
        groups = RowSlice(col.full // group_size, col.start // group_size, col.size // group_size)
        q, *scales = joined
        return (col.take(q, dim=1), *(groups.take(t, dim=1) for t in scales))

    def process_weights_after_loading(self, method: LinearMethod) -> None:
        self.method = method
        method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        out = self.method.apply(self, x)
        if self.col_slice is not None and self.reduce_results:
            out = out.contiguous()
            all_reduce(out, self.tp)  # the ranks' partial products: the full product
        return out

    def dequantized_weight(self) -> torch.Tensor:  # [out, in]: the reference weight
        return self.method.dequantized_weight(self)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method.name}"
        )


def process_linear_weights(
    model: nn.Module, method_for: Callable[[str, Linear], LinearMethod]
) -> None:
    """Gives every Linear of a loaded model its method (`method_for(qualified name, layer)`)."""
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            module.process_weights_after_loading(method_for(name, module))


# ---- normalisation -------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * w, in transformers' Llama arithmetic (normalise in float32, cast back, then
    scale by the weight).

    `add_norm(x, residual)` is the pre-norm block's fused step: the residual add in place on `x`
    (a fresh block output the caller owns), then the norm of the sum, as transformers computes
    `residual + x` followed by the norm (the add is commutative, so bit for bit the same).
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype, device=device)
        self.eps = eps
        # 0-d float32 tensors: a Python scalar operand costs a scalar-to-tensor copy per call
        # (4 extra op calls per norm on CPU); the arithmetic is the same (sum / dim is what
        # mean computes, and eps is rounded to float32 either way).
        f32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("_eps", torch.tensor(eps, **f32), persistent=False)
        self.register_buffer("_dim", torch.tensor(float(dim), **f32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return self._norm_f32(x, self.weight)
        # As transformers does (bf16, fp16, fp64): normalise in float32, cast back, then scale
        # by the weight in the model dtype (in place on the fresh cast: the same products).
        return self._norm_f32(x.to(torch.float32)).to(x.dtype).mul_(self.weight)

    def _norm_f32(
        self, x: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:  # [T, D] float32
        # transformers' arithmetic (x * x is pow(x, 2) exactly; sum / D is mean exactly), with
        # in-place ops on the small temporaries and tensor operands: 7 op calls instead of 19
        # (16 instead of 27 in bfloat16). (On CPU, F.rms_norm runs as a chain of out-of-place
        # ops and costs more than this.)
        scale = torch.sum(x * x, -1, keepdim=True).div_(self._dim).add_(self._eps).rsqrt_()
        out = x * scale
        return out if weight is None else out.mul_(weight)

    def add_norm(
        self,
        x: torch.Tensor,  # [T, D], overwritten with x + residual
        residual: torch.Tensor,  # [T, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (norm(x + residual), x + residual)
        """Fused residual add + norm: one in-place add (no new residual tensor), then the norm.

        Runs the forward hooks like a call would (engine.layer_diff captures module outputs).
        """
        summed = x.add_(residual)
        return self(summed), summed


class OffsetRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w), all in float32 before the cast back (Gemma's arithmetic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.to(torch.float32))).to(x.dtype)


NormFactory = Callable[[int, float, torch.dtype, torch.device], nn.Module]


# ---- attention ------------------------------------------------------------------------------

RotaryFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norms, rotary, the backend, o_proj.

    Family-specific pieces are injected: `rotary` (x [T, H, D], cos, sin -> rotated x; e.g. a
    RotaryEmbedding's `apply` for partial rotary), `q_norm` / `k_norm` modules (applied per
    head before rotary), `scale`, `sliding_window` and extra `backend_kwargs` (e.g. a
    soft-cap, for backends that take one).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        qkv_bias: bool = False,
        o_bias: bool = False,
        scale: float | None = None,
        sliding_window: int | None = None,
        rotary: RotaryFn = apply_rope,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        tp = current_tp()
        # This rank's heads (all of them without tensor parallelism).
        q_slice = even_slice(num_heads, tp, "num_attention_heads", unit=head_dim)
        first_kv, local_kv = kv_head_slice(num_kv_heads, num_heads, tp)
        kv_slice = RowSlice(num_kv_heads * head_dim, first_kv * head_dim, local_kv * head_dim)
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = local_kv
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.backend = backend
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = Linear(
            hidden_size,
            self.q_size + 2 * self.kv_size,
            qkv_bias,
            dtype,
            device,
            output_sizes=(self.q_size, self.kv_size, self.kv_size),
            shard_names=("q_proj", "k_proj", "v_proj"),
            row_slices=(q_slice, kv_slice, kv_slice),
            tp=tp,
        )
        self.o_proj = Linear(
            self.q_size, hidden_size, o_bias, dtype, device, col_slice=q_slice, tp=tp
        )
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.rotary = rotary
        self.sliding_window = sliding_window
        self.backend_kwargs = dict(backend_kwargs or {})

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, R]
        sin: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        num_qk_heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, num_qk_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # per head, before rotary
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # Query and key heads rotate together: one set of ops per layer instead of two.
        q, k = self.rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        self.backend.write_kv(k, v, cache.k, cache.v, meta)
        out = self.backend.forward(
            q, cache.k, cache.v, meta, self.scale, self.sliding_window, **self.backend_kwargs
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


# ---- MLP ------------------------------------------------------------------------------------


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.hidden_act -> activation, as transformers' ACT2FN defines them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused in one `gate_up_proj`."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        hidden_act: str,
        dtype: torch.dtype,
        device: torch.device,
        reduce_results: bool = True,
    ) -> None:
        """With tensor parallelism gate/up are column-parallel and down row-parallel over the
        intermediate dimension; `reduce_results` False leaves the sum over the ranks to the
        caller."""
        super().__init__()
        tp = current_tp()
        inter = even_slice(intermediate_size, tp, "intermediate_size")
        self.act = activation(hidden_act)
        self.intermediate_size = inter.size
        self.gate_up_proj = Linear(
            hidden_size,
            2 * inter.size,
            bias,
            dtype,
            device,
            output_sizes=(inter.size, inter.size),
            shard_names=("gate_proj", "up_proj"),
            row_slices=(inter, inter),
            tp=tp,
        )
        self.down_proj = Linear(
            inter.size,
            hidden_size,
            bias,
            dtype,
            device,
            col_slice=inter,
            reduce_results=reduce_results,
            tp=tp,
        )
        # act(gate) * up has channels 100x the rest: int8 activations there garbled SmolLM2's
        # answers (measured: every other projection with int8 activations kept them).
        self.down_proj.quantizable_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate_up = self.gate_up_proj(x)  # [T, 2 * I]
        size = self.intermediate_size
        # act(gate) is a fresh contiguous tensor: multiply by up in place (one tensor fewer),
        # and the down projection reads it without a copy.
        return self.down_proj(self.act(gate_up[..., :size]).mul_(gate_up[..., size:]))


# ---- vocabulary ---------------------------------------------------------------------------


def vocab_slice(vocab_size: int, tp: TPGroup) -> RowSlice:
    """This rank's rows of the vocabulary padded up to a multiple of tp.size."""
    padded = -(-vocab_size // tp.size) * tp.size
    return even_slice(padded, tp, "the padded vocabulary")


class VocabParallelEmbedding(nn.Module):
    """The token embedding [V, H]; with tensor parallelism rank r holds the rows `vocab`
    (zeros past the real vocabulary) and the ranks' lookups are summed (ids outside a rank's
    rows look up zeros there). Without it, `F.embedding` as nn.Embedding does."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.tp = current_tp()
        self.num_embeddings = vocab_size
        self.embedding_dim = hidden_size
        self.vocab = vocab_slice(vocab_size, self.tp)
        rows = self.vocab.size if self.tp.is_parallel else vocab_size
        self.weight = empty_param(rows, hidden_size, dtype=dtype, device=device)

    def checkpoint_transform(
        self, suffix: str, shard_index: int | None
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.vocab.take if self.tp.is_parallel else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if not self.tp.is_parallel:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab.start
        outside = (local < 0) | (local >= self.vocab.size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return all_reduce(out, self.tp)


def lm_head_linear(
    hidden_size: int, vocab_size: int, dtype: torch.dtype, device: torch.device
) -> Linear:
    """The LM head: column-parallel over the padded vocabulary with tensor parallelism (the
    same rows as `VocabParallelEmbedding`, so a tied head shares the embedding's shard)."""
    tp = current_tp()
    if not tp.is_parallel:
        return Linear(hidden_size, vocab_size, False, dtype, device)
    vocab = vocab_slice(vocab_size, tp)
    return Linear(hidden_size, vocab.size, False, dtype, device, row_slices=(vocab,), tp=tp)


def gather_logits(logits: torch.Tensor, tp: TPGroup, vocab_size: int) -> torch.Tensor | None:
    """The ranks' vocabulary pieces [N, V/n] -> [N, V] on rank 0 (padding dropped); None on
    the other ranks. Identity without tensor parallelism."""
    if not tp.is_parallel:
        return logits
    from engine.distributed.communication import gather_last_dim

    full = gather_last_dim(logits, tp)
    if full is None:
        return None
    return full if full.shape[-1] == vocab_size else full[..., :vocab_size].contiguous()
