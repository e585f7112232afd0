"""Vectorised paged attention in plain torch ops: the fast backend on CPU, and anywhere the CUDA
kernels are missing.

Owns `TorchNativeAttention` (`--attention-backend torch`). One forward handles a mixed batch of
decodes and prompt chunks without a per-request Python loop:

1. Plan (once per step, shared by every layer): requests are sorted by query length, then
   context length, and cut into a few groups of similar shape (decodes with contexts of
   similar length together; prompt chunks of similar length together), so padding wastes little
   work. For each group the plan holds the block ids each request reads, the packed-token index
   of every (padded) query slot, and an additive visibility mask built from positions (causal,
   offset by the cached tokens, optionally a sliding window).
2. Per layer and group: one gather of whole blocks through the block table (index_select of
   contiguous bs * Hkv * D runs), then one `scaled_dot_product_attention` over strided
   [n, Hkv, S, D] views of it with the visibility mask. A group of fresh prompts (no cached
   tokens, no window) of at least CAUSAL_MIN_QUERY tokens runs SDPA's causal kernel instead
   (query heads unfolded, `enable_gqa`): it skips the key blocks above the diagonal that the
   mask would only hide (`_Group.causal`).
3. Decode groups (one query token per request, at most MAX_DECODE_KV_HEADS KV heads) are memory
   bound, so they skip the V gather: K is gathered and scored by one batched GEMM, and an
   `embedding_bag` (mode "sum" with per-sample weights) adds up the probability-weighted value
   rows straight from the cache (`_attend_decode`). A group of one decode request (batch-1
   decode; no sliding window, no soft-cap) instead gathers its K and V and keeps exactly its L
   cached keys, which its query all sees: step 2's SDPA call with no mask (`_Group.single_len`;
   fewer op calls: the batch-1 step 1.3-3 ms faster), in float32/float64 on one thread so that
   its bits do not depend on the thread count (`_ONE_THREAD_DTYPES`).

4. Soft-capping (Gemma 2): SDPA has no score hook, so a prompt group with `softcap` c runs the
   same gathered views through explicit GEMMs: scores = q k^T * scale, c * tanh(scores / c),
   + mask, softmax, @ v (`_attend_group_softcap`); the decode path caps its scores before its
   softmax.

GQA is folded, not repeated: the G query heads that share a KV head become G extra query rows of
that head ([n, Hkv, Q * G, D] against [n, Hkv, S, D]), so K/V are never materialised G times (the
causal path passes [n, Hq, Q, D] queries with `enable_gqa` and leaves the head mapping to the
kernel).

Invariants: reads only the cache slots of blocks listed in a request's block table and masks every
slot at or past its seq_len, so stale data in reused blocks never leaks in; every padded query row
sees at least one key (no NaN). Numerics: the same attention as `engine.reference.attention`
computed by torch's fused kernel (online softmax in float32, float64 for float64 models): float64
results agree with the reference to ~1e-15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, write_kv_to_cache
from engine.serial import on_one_thread

# A group's padded visibility mask holds at most this many elements (n * Q * G * S); bigger
# prompt batches are split so masks and padded work stay small (one long request may exceed it).
MAX_SCORE_ELEMENTS = 1 << 22
# Context-length buckets are cut only between groups of at least this many requests: each group
# costs a handful of kernel launches per layer, worth paying only to skip real padding.
MIN_GROUP_SIZE = 8
# Decode groups take the gather-free path (below) when the KV heads are at most this many: its
# score GEMM computes all Hkv x Hkv head pairs and keeps the diagonal, Hkv times the useful work.
MAX_DECODE_KV_HEADS = 4
# A group of fresh prompts (no cached tokens, no window) at least this long runs SDPA's causal
# kernel, which skips the blocks above the diagonal, instead of the full square under a mask.
# Measured per layer (SmolLM2 shapes, fp32, 2 threads): 1 x 768 tokens 7.3 vs 10.7 ms, 1 x 1024
# 12.6 vs 19.0, 1 x 2048 41.6 vs 73.8; 4 x 512 16.4 vs 16.7 and 16 x 128 6.2 vs 5.5 (a loss).
CAUSAL_MIN_QUERY = 768


@dataclass(frozen=True, slots=True)
class _Group:
    """Requests attended together: n requests, queries padded to Q, keys padded to S tokens."""

    block_ids: torch.Tensor  # [n, M] int64: blocks to gather, first one first; S = M * bs
    # [n, 1, Q * G, S] additive mask (0 where query row (q, g) may see key slot s, else -inf),
    # in the query dtype: the kernel adds it as is (a boolean mask it would convert per layer).
    attn_bias: torch.Tensor
    # Packed-token index of each padded query slot [n * Q]; None when the group is the whole
    # batch of one-token queries in packed order (the decode fast path: no gather/scatter).
    query_index: torch.Tensor | None
    valid_slots: torch.Tensor | None  # [T_group] int64: which of the n * Q slots are real
    valid_tokens: torch.Tensor | None  # [T_group] int64: their packed-token indices
    max_query_len: int  # Q
    # Decode groups (Q == 1) only, when the plan knows the KV head count: row of the
    # [N * bs * Hkv, D] value-cache view that each (request, KV head, query head, key slot)
    # weights, flattened [n * Hkv * G * S] (int32), and the [n * Hkv * G] bag offsets into it.
    value_rows: torch.Tensor | None = None
    bag_offsets: torch.Tensor | None = None
    # A group of one decode request without a sliding window: its sequence length L. Its one
    # query sees all L keys, so `_attend_group` keeps exactly those and needs no mask: fewer op
    # calls than the embedding_bag path, which pays off for batches (SmolLM2-135M's batch-1
    # decode step: 27.3-27.5 ms against 28.7-30.5 at 32-290 cached tokens, 39.3 against 41.1
    # at 1000-1256; same process, alternating rounds, 2 threads). None otherwise.
    single_len: int | None = None
    # Every request is a fresh prompt (no cached tokens; no window) and Q >= CAUSAL_MIN_QUERY:
    # query slot j of each request sits at position j, so SDPA's top-left causal mask is its
    # visibility (`_attend_group`).
    causal: bool = False


@dataclass(frozen=True, slots=True)
class _LoneGather:
    """A lone decode request's gather for one step (`TorchNativeAttention._attend_lone`): the
    scratch every layer gathers its blocks into, and the attention views of them."""

    group: _Group  # the step's one group, whose block ids and length L these are for
    kind: tuple  # (cache dtype, cache shape[1:]) the buffers were made for
    flat_ids: torch.Tensor  # [M] block ids, in order
    k_buf: torch.Tensor  # [M, bs, Hkv, D]
    v_buf: torch.Tensor
    k: torch.Tensor  # [1, Hkv, L, D] view of k_buf: exactly the L cached keys
    v: torch.Tensor


@dataclass(frozen=True, slots=True)
class _Plan:
    groups: tuple[_Group, ...]


def group_requests(q_lens: list[int], k_lens: list[int], group: int) -> list[list[int]]:
    """Requests in attention groups: sorted by query then context length, longest first, and cut
    where padding would waste work (a query under half the group's longest, or a context under
    3/4 of its longest once the group has MIN_GROUP_SIZE requests) or where the padded score
    tensor would pass MAX_SCORE_ELEMENTS."""
    order = sorted(range(len(q_lens)), key=lambda i: (-q_lens[i], -k_lens[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    q_max = k_max = 0
    for i in order:
        new_q, new_k = max(q_max, q_lens[i]), max(k_max, k_lens[i])
        too_big = (len(current) + 1) * new_q * group * new_k > MAX_SCORE_ELEMENTS
        ragged_q = q_lens[i] * 2 < q_max
        ragged_k = len(current) >= MIN_GROUP_SIZE and k_lens[i] * 4 < k_max * 3
        if current and (too_big or ragged_q or ragged_k):
            groups.append(current)
            current, new_q, new_k = [], q_lens[i], k_lens[i]
        current.append(i)
        q_max, k_max = new_q, new_k
    if current:
        groups.append(current)
    return groups


def build_plan(
    meta: AttentionMetadata,
    block_size: int,
    group: int,
    sliding_window: int | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    num_kv_heads: int | None = None,
) -> _Plan:
    """Everything the layers of one step share: groups, gather indices and masks. With
    num_kv_heads, decode groups also get the value rows of the gather-free weighted sum."""
    qsl = meta.query_start_loc_cpu
    seq_lens = meta.seq_lens_cpu
    num_requests = len(seq_lens)
    q_lens = [qsl[i + 1] - qsl[i] for i in range(num_requests)]
    # First block each request must read: with a window, the oldest key any of its queries sees.
    first_block = [0] * num_requests
    if sliding_window is not None:
        first_block = [
            max(0, seq_lens[i] - q_lens[i] - sliding_window + 1) // block_size
            for i in range(num_requests)
        ]
    num_blocks = [-(-seq_lens[i] // block_size) - first_block[i] for i in range(num_requests)]
    k_lens = [n * block_size for n in num_blocks]

    block_table = meta.block_table.to("cpu", torch.int64)  # [B, max_blocks]
    members = group_requests(q_lens, k_lens, group)
    if len(members) == 1:
        members = [list(range(num_requests))]  # packed order: no query gather or scatter

    groups = []
    for rows in members:
        n = len(rows)
        q_max = max(q_lens[i] for i in rows)
        m_max = max(num_blocks[i] for i in rows)
        rows_t = torch.tensor(rows, dtype=torch.int64)
        first_t = torch.tensor([first_block[i] for i in rows], dtype=torch.int64)
        seq_t = torch.tensor([seq_lens[i] for i in rows], dtype=torch.int64)
        qlen_t = torch.tensor([q_lens[i] for i in rows], dtype=torch.int64)
        qstart_t = torch.tensor([qsl[i] for i in rows], dtype=torch.int64)

        # Logical block column of each gathered block, clamped to the request's last block so
        # padding columns read a valid block (they are masked).
        cols = first_t[:, None] + torch.arange(m_max)[None, :]  # [n, M]
        last_col = (seq_t + block_size - 1) // block_size - 1
        cols = torch.minimum(cols, last_col[:, None])
        block_ids = block_table[rows_t[:, None], cols]  # [n, M]

        # Positions: query slot j of request i sits at seq_len - q_len + j (pad slots repeat
        # the last query, so every row has a visible key and no NaN appears even in padding).
        slot = torch.arange(q_max)[None, :]  # [1, Q]
        q_pos = seq_t[:, None] - qlen_t[:, None] + torch.minimum(slot, qlen_t[:, None] - 1)
        k_pos = first_t[:, None] * block_size + torch.arange(m_max * block_size)[None, :]
        visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [n, Q, S]; also masks k_pos >= seq
        if sliding_window is not None:
            visible &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
        visible = visible[:, :, None, :].expand(n, q_max, group, visible.shape[-1])
        visible = visible.reshape(n, 1, q_max * group, -1)
        attn_bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))

        if q_max == 1 and rows == list(range(num_requests)):
            query_index = valid_slots = valid_tokens = None
        else:
            token = qstart_t[:, None] + torch.minimum(slot, qlen_t[:, None] - 1)  # [n, Q]
            real = (slot < qlen_t[:, None]).reshape(-1)  # [n * Q]
            query_index = token.reshape(-1).to(device)
            valid_slots = real.nonzero()[:, 0].to(device)
            valid_tokens = token.reshape(-1)[real].to(device)
        single = n == 1 and q_max == 1 and sliding_window is None
        single_len = seq_lens[rows[0]] if single else None
        causal = (  # long enough and no window, then every request a fresh prompt
            q_max >= CAUSAL_MIN_QUERY
            and sliding_window is None
            and all(seq_lens[i] == q_lens[i] for i in rows)
        )
        value_rows = bag_offsets = None
        if q_max == 1 and num_kv_heads is not None and num_kv_heads <= MAX_DECODE_KV_HEADS:
            seq = m_max * block_size
            slots = block_ids[:, :, None] * block_size + torch.arange(block_size)  # [n, M, bs]
            heads = torch.arange(num_kv_heads)[None, :, None, None]
            rows = slots.reshape(n, 1, 1, seq) * num_kv_heads + heads  # [n, Hkv, 1, S]
            rows = rows.expand(n, num_kv_heads, group, seq).reshape(-1)
            value_rows = rows.to(device, torch.int32)
            bag_offsets = torch.arange(0, rows.numel(), seq, dtype=torch.int32, device=device)
        groups.append(
            _Group(
                block_ids=block_ids.to(device),
                attn_bias=attn_bias.to(device),
                query_index=query_index,
                valid_slots=valid_slots,
                valid_tokens=valid_tokens,
                max_query_len=q_max,
                value_rows=value_rows,
                bag_offsets=bag_offsets,
                single_len=single_len,
                causal=causal,
            )
        )
    return _Plan(groups=tuple(groups))


def _attend_group(
    q: torch.Tensor,  # [T, Hkv, G, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    grp: _Group,
    scale: float,
    k_buf: torch.Tensor,  # [n * M, bs, Hkv, D] scratch for the gathered K
    v_buf: torch.Tensor,
) -> torch.Tensor:  # [n, Q, Hkv, G, D] (a view; [n, Hkv, G, D] stays contiguous when Q == 1)
    num_kv_heads, group, head_dim = q.shape[1:]
    n, m_max = grp.block_ids.shape
    q_max = grp.max_query_len
    seq = m_max * k_cache.shape[1]
    q_grp = q if grp.query_index is None else q.index_select(0, grp.query_index)
    # One copy of whole blocks (contiguous runs of bs * Hkv * D elements); the [n, Hkv, S, D]
    # operands are strided views of it, which the attention kernel reads in place.
    flat_ids = grp.block_ids.reshape(-1)
    k = torch.index_select(k_cache, 0, flat_ids, out=k_buf).view(n, seq, num_kv_heads, head_dim)
    v = torch.index_select(v_cache, 0, flat_ids, out=v_buf).view(n, seq, num_kv_heads, head_dim)
    if grp.causal:  # fresh prompts: query j sees keys 0..j (pad rows see junk; dropped later)
        q_heads = q_grp.view(n, q_max, num_kv_heads * group, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q_heads,
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )  # [n, Hq, Q, D]; query head h reads KV head h // G
        return out.transpose(1, 2).view(n, q_max, num_kv_heads, group, head_dim)
    # [n * Q, Hkv, G, D] -> [n, Hkv, Q * G, D]: the G heads sharing a KV head are extra rows.
    q_grp = q_grp.view(n, q_max, num_kv_heads, group, head_dim).transpose(1, 2)
    q_grp = q_grp.reshape(n, num_kv_heads, q_max * group, head_dim)
    mask: torch.Tensor | None = grp.attn_bias
    if grp.single_len is not None:  # one decode query at L - 1 sees exactly its L keys: no mask
        k, v, mask = k[:, : grp.single_len], v[:, : grp.single_len], None
    out = F.scaled_dot_product_attention(
        q_grp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [n, Hkv, Q * G, D]
    return out.view(n, num_kv_heads, q_max, group, head_dim).transpose(1, 2)


def _soft_cap_(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """c * tanh(scores / c), in place on a fresh temporary (`reference.attention.soft_cap`),
    as 2c * sigmoid(2 scores / c) - c: the same function to rounding (absolute error ~ c * eps),
    and on the CPUs here torch's sigmoid is 8x faster than its tanh (2.4M float32 elements,
    one thread: 1.0 ms against 7.8 ms), which made the cap most of a capped prompt step."""
    return scores.mul_(2.0 / softcap).sigmoid_().mul_(2.0 * softcap).sub_(softcap)


def _attend_group_softcap(
    q: torch.Tensor,  # [T, Hkv, G, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    grp: _Group,
    scale: float,
    softcap: float,
    k_buf: torch.Tensor,  # [n * M, bs, Hkv, D] scratch for the gathered K
    v_buf: torch.Tensor,
) -> torch.Tensor:  # [n, Q, Hkv, G, D] (a view)
    """`_attend_group` with soft-capped scores, in explicit GEMMs (SDPA cannot cap)."""
    num_kv_heads, group, head_dim = q.shape[1:]
    n, m_max = grp.block_ids.shape
    q_max = grp.max_query_len
    seq = m_max * k_cache.shape[1]
    q_grp = q if grp.query_index is None else q.index_select(0, grp.query_index)
    q_grp = q_grp.view(n, q_max, num_kv_heads, group, head_dim).transpose(1, 2)
    q_grp = q_grp.reshape(n, num_kv_heads, q_max * group, head_dim)
    flat_ids = grp.block_ids.reshape(-1)
    k = torch.index_select(k_cache, 0, flat_ids, out=k_buf)
    v = torch.index_select(v_cache, 0, flat_ids, out=v_buf)
    # [n, Hkv, S, D] contiguous (one copy each): bmm would otherwise copy the strided views
    # itself, several times over (measured: 2x the whole capped step).
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.view(n, seq, num_kv_heads, head_dim).transpose(1, 2).contiguous().to(compute)
    v = v.view(n, seq, num_kv_heads, head_dim).transpose(1, 2).contiguous().to(compute)
    # Scores in float32 at least, as SDPA's fused kernel accumulates them.
    scores = torch.matmul(q_grp.to(compute), k.transpose(2, 3))  # [n, Hkv, Q * G, S]
    scores = _soft_cap_(scores.mul_(scale), softcap).add_(grp.attn_bias)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).to(q.dtype)  # [n, Hkv, Q * G, D]
    return out.view(n, num_kv_heads, q_max, group, head_dim).transpose(1, 2)


def _attend_decode(
    q: torch.Tensor,  # [T, Hkv, G, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    grp: _Group,
    scale: float,
    k_buf: torch.Tensor,  # [n * M, bs, Hkv, D] scratch for the gathered K
    softcap: float | None = None,
) -> torch.Tensor:  # [n, 1, Hkv, G, D]
    """One query token per request. Decode attention is memory bound (each key and value is
    used by G query rows only), so this path reads the cache as few times as it can: K is
    gathered once and scored by one batched GEMM; V is never gathered: an `embedding_bag`
    sums the probability-weighted value rows straight out of the cache."""
    num_kv_heads, group, head_dim = q.shape[1:]
    n, m_max = grp.block_ids.shape
    seq = m_max * k_cache.shape[1]
    q_grp = q if grp.query_index is None else q.index_select(0, grp.query_index)
    q_grp = q_grp.reshape(n, num_kv_heads * group, head_dim)
    k = torch.index_select(k_cache, 0, grp.block_ids.reshape(-1), out=k_buf)
    k = k.view(n, seq * num_kv_heads, head_dim)  # row s * Hkv + h: key slot s of KV head h
    # Every query head against every KV head's keys: [n, Hkv * G, S * Hkv]; keep the pairs
    # whose heads match (the diagonal), as [n, Hkv, G, S].
    scores = torch.bmm(q_grp, k.transpose(1, 2)).view(n, num_kv_heads, group, seq, num_kv_heads)
    scores = torch.diagonal(scores, dim1=1, dim2=4).permute(0, 3, 1, 2)
    bias = grp.attn_bias[:, :, :1, :]  # [n, 1, 1, S]: the one query row's visibility
    scores = scores * scale
    if softcap is not None:
        scores = _soft_cap_(scores.contiguous(), softcap)
    probs = torch.softmax(scores + bias, dim=-1)  # [n, Hkv, G, S]
    out = F.embedding_bag(
        grp.value_rows,
        v_cache.view(-1, head_dim),
        grp.bag_offsets,
        mode="sum",
        per_sample_weights=probs.reshape(-1),
    )  # [n * Hkv * G, D]
    return out.view(n, 1, num_kv_heads, group, head_dim)


# The lone decode's gather + SDPA run on one thread in these dtypes (`engine.serial`): torch's
# SDPA splits a lone query's keys over the threads at some lengths, so the last bits changed
# when the adaptive CPU reservation changed the thread count mid-request. Measured on SmolLM2's
# batch-1 step (1,000 steps, the two ways alternating): float32 28.47 vs 28.34 ms; bfloat16
# 20.86 vs 20.34, so bfloat16 keeps every thread (and its last bits may follow the count).
_ONE_THREAD_DTYPES = (torch.float32, torch.float64)


def _gather_attend_lone(
    q: torch.Tensor,  # [1, Hkv, G, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    lone: _LoneGather,
    scale: float,
) -> torch.Tensor:  # [1, Hkv, G, D]: query head h = kv head h // G, row h % G
    torch.index_select(k_cache, 0, lone.flat_ids, out=lone.k_buf)
    torch.index_select(v_cache, 0, lone.flat_ids, out=lone.v_buf)
    return F.scaled_dot_product_attention(q, lone.k, lone.v, scale=scale)


class TorchNativeAttention:
    """Implements `engine.attention.AttentionBackend`, vectorised over the batch."""

    name = "torch"
    supports_softcap = True

    def __init__(self) -> None:
        # The plan of the step in flight, keyed by (metadata object, block size, window): every
        # layer of a step receives the same frozen AttentionMetadata object.
        self._plan_meta: AttentionMetadata | None = None
        self._plans: dict[tuple, _Plan] = {}
        # Gather scratch reused by every group, layer and step (grown to the largest need): a
        # fresh tensor of this size per call costs page faults, 4x the gather itself at 200 MB.
        self._scratch: dict[str, torch.Tensor] = {}
        # A lone decode request's gather buffers and their attention views, made by the first
        # layer of a step and reused by the others (`_attend_lone`).
        self._lone: _LoneGather | None = None

    def _scratch_like(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._scratch.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._scratch[name] = buf
        return buf[:numel].view(shape)

    def _attend(
        self,
        q4: torch.Tensor,  # [T, Hkv, G, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        grp: _Group,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [n, Q, Hkv, G, D]
        shape = (grp.block_ids.numel(), *k_cache.shape[1:])
        k_buf = self._scratch_like("k", shape, k_cache)
        # A lone decode request takes `_attend_group`'s unmasked SDPA unless it is soft-capped.
        if grp.value_rows is not None and (grp.single_len is None or softcap is not None):
            return _attend_decode(q4, k_cache, v_cache, grp, scale, k_buf, softcap)
        v_buf = self._scratch_like("v", shape, v_cache)
        if softcap is not None:
            return _attend_group_softcap(q4, k_cache, v_cache, grp, scale, softcap, k_buf, v_buf)
        return _attend_group(q4, k_cache, v_cache, grp, scale, k_buf, v_buf)

    def _attend_lone(
        self,
        q: torch.Tensor,  # [1, Hq, D]
        k_cache: torch.Tensor,  # [N, bs, Hkv, D]
        v_cache: torch.Tensor,
        grp: _Group,
        scale: float,
    ) -> torch.Tensor:  # [1, Hq, D]
        """The whole batch is one decode request (`grp.single_len` L): `_attend_group`'s gather
        and unmasked SDPA over exactly its L keys, in 4 op calls per layer. Every layer of a step
        gathers into the same scratch buffers, so their [1, Hkv, L, D] views are made once per
        step (by the first layer) instead of per layer: ~30 us per layer less (SmolLM2-135M,
        160 cached tokens, caches beyond the CPU cache: 64 against 96 us per layer)."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        kind = (k_cache.dtype, k_cache.shape[1:])
        lone = self._lone
        if lone is None or lone.group is not grp or lone.kind != kind:
            shape = (grp.block_ids.shape[1], *k_cache.shape[1:])
            k_buf = self._scratch_like("k", shape, k_cache)
            v_buf = self._scratch_like("v", shape, v_cache)
            length = grp.single_len

            def keys(buf: torch.Tensor) -> torch.Tensor:  # [1, Hkv, L, D] view of the gather
                return buf.view(1, -1, num_kv_heads, head_dim)[:, :length].transpose(1, 2)

            flat_ids = grp.block_ids.reshape(-1)
            lone = self._lone = _LoneGather(
                grp, kind, flat_ids, k_buf, v_buf, keys(k_buf), keys(v_buf)
            )
        q4 = q.view(1, num_kv_heads, q.shape[1] // num_kv_heads, head_dim)
        if q.dtype in _ONE_THREAD_DTYPES:
            out = on_one_thread(_gather_attend_lone, q4, k_cache, v_cache, lone, scale)
        else:
            out = _gather_attend_lone(q4, k_cache, v_cache, lone, scale)
        return out.view(q.shape)

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv_to_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def plan(
        self,
        meta: AttentionMetadata,
        block_size: int,
        group: int,
        sliding_window: int | None,
        dtype: torch.dtype = torch.float32,
        num_kv_heads: int | None = None,
    ) -> _Plan:
        if meta is not self._plan_meta:
            self._plan_meta, self._plans = meta, {}
        key = (block_size, group, sliding_window, dtype, num_kv_heads)
        if key not in self._plans:
            self._plans[key] = build_plan(
                meta,
                block_size,
                group,
                sliding_window,
                meta.block_table.device,
                dtype,
                num_kv_heads,
            )
        return self._plans[key]

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [N, bs, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        num_tokens, num_q_heads, head_dim = q.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_q_heads // num_kv_heads
        plan = self.plan(meta, block_size, group, sliding_window, q.dtype, num_kv_heads)
        if len(plan.groups) == 1 and plan.groups[0].query_index is None:
            if plan.groups[0].single_len is not None and softcap is None:
                return self._attend_lone(q, k_cache, v_cache, plan.groups[0], scale)
            q4 = q.view(num_tokens, num_kv_heads, group, head_dim)
            out = self._attend(q4, k_cache, v_cache, plan.groups[0], scale, softcap)
            return out.reshape(num_tokens, num_q_heads, head_dim)
        q4 = q.view(num_tokens, num_kv_heads, group, head_dim)
        out = q.new_empty(num_tokens, num_kv_heads, group, head_dim)
        for grp in plan.groups:
            res = self._attend(q4, k_cache, v_cache, grp, scale, softcap)
            res = res.reshape(-1, num_kv_heads, group, head_dim)  # [n * Q, Hkv, G, D]
            out.index_copy_(0, grp.valid_tokens, res.index_select(0, grp.valid_slots))
        return out.view(num_tokens, num_q_heads, head_dim)
