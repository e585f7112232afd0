"""Attention metadata and the backend protocol: the seam between the model and the kernels.

The model never looks up global state: every forward receives an `AttentionMetadata` that says,
for the packed batch of this step, where each request's query tokens are, how long each
request's context is, where new K/V go and where old K/V are.

Shapes (B requests, T new tokens in all, packed without padding):

    query_start_loc  [B + 1] int32   request i's query tokens are q[query_start_loc[i]:[i + 1]]
    seq_lens         [B]     int32   tokens in request i's context after this step
                                      (cached + new); its query is the last q_len of them
    slot_mapping     [T]     int64   cache slot of each new token: block_id * block_size + offset
    block_table      [B, M]  int32   request i's block ids in order; entries past its
                                      ceil(seq_len / block_size) blocks are padding (0)

Invariant: for request i, q_len_i = query_start_loc[i + 1] - query_start_loc[i] <= seq_lens[i],
and the query tokens sit at positions seq_lens[i] - q_len_i ... seq_lens[i] - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    slot_mapping: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies, so that loops and kernel launch parameters need no device sync.
    query_start_loc_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]


class AttentionBackend(Protocol):
    """A paged attention implementation. All backends share the cache layout

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    """

    name: str
    supports_softcap: bool

    def write_kv(
        self,
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Stores the new tokens' K/V at meta.slot_mapping."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Causal attention of each request's query over its whole context in the cache.

        A query token at position p sees keys at positions j with j <= p, and, with a sliding
        window w, also p - j < w (Hugging Face's convention). `scale` multiplies q.k (a model
        picks it: head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5). With `softcap`
        c, the scaled scores s become c * tanh(s / c) before masking and softmax (Gemma 2's
        attention-logit soft-capping); a backend that cannot do this has
        `supports_softcap = False` and raises ValueError when asked.

        Every argument may change from one layer to the next within a step (per-layer sliding
        windows, soft-capping); backends cache per-step work keyed by them.
        """
        ...


def write_kv_to_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    """Scatters new K/V into their slots; shared by every pure-torch backend."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def pack_sequences(
    sequences: Sequence[tuple[list[int], int, Sequence[int]]],
    block_size: int,
    device: torch.device,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Packs (new token ids, position of the first one, block table) per request into one
    step's inputs: input_ids [T], positions [T] and the AttentionMetadata.

    Each request's new tokens sit at positions start ... start + len - 1, after `start` tokens
    whose K/V are already in its blocks; its block table must cover every new position.
    `block_table` ([B, M] int32 on the host, row i = request i's block ids then 0) is the
    runner's persistent table gathered for this step; without it the table is built here from
    the sequences' block ids. The work per request is O(new tokens / block_size) Python steps
    either way, plus O(blocks) C-level copying when the table is built here.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    for token_ids, start, blocks in sequences:
        end = start + len(token_ids)
        input_ids += token_ids
        positions += range(start, end)
        # Slot of position p: blocks[p // bs] * bs + p % bs, one run per block touched.
        for j in range(start // block_size, -(-end // block_size)):
            lo, hi = max(start, j * block_size), min(end, (j + 1) * block_size)
            base = (blocks[j] - j) * block_size
            slot_mapping += range(base + lo, base + hi)
        query_start_loc.append(query_start_loc[-1] + len(token_ids))
        seq_lens.append(end)
    if block_table is None:
        block_table = build_block_table([blocks for _, _, blocks in sequences])

    def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    meta = AttentionMetadata(
        query_start_loc=tensor(query_start_loc, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        slot_mapping=tensor(slot_mapping, torch.int64),
        block_table=block_table.to(device),
        max_query_len=max((len(t) for t, _, _ in sequences), default=0),
        max_seq_len=max(seq_lens, default=0),
        block_size=block_size,
        query_start_loc_cpu=tuple(query_start_loc),
        seq_lens_cpu=tuple(seq_lens),
    )
    return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta


def build_block_table(tables: Sequence[Sequence[int]]) -> torch.Tensor:  # [B, max(M, 1)] int32
    """The block table from scratch: row i = tables[i], padded with 0 to the longest."""
    width = max(1, max((len(t) for t in tables), default=0))
    flat: list[int] = []
    for ids in tables:
        flat += ids
        flat += [0] * (width - len(ids))
    return torch.tensor(flat, dtype=torch.int32).view(len(tables), width)
