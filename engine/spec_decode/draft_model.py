"""Draft-model proposer: a smaller checkpoint with the target's vocabulary proposes k tokens.

The draft has its own paged KV cache with the target's block count and block size, and reads and
writes it through the *target's* block tables: block b of the draft cache holds the draft's K/V
for the same tokens that block b of the target cache holds. Every step the draft runs over the
tokens the target computed in that step, for the requests that finished in it too (so
prefix-cache hits, which hand out target blocks, also hand out valid draft K/V), plus the token
just sampled, whose logits start the proposal; then k - 1 single-token steps extend it. A step
that fails anywhere (the draft's run included) is rolled back with its prefix-cache entries, so
no cached block's draft K/V is half written. K/V written for drafts that the target later
rejects sit past the request's length: masked by seq_len, overwritten when real tokens arrive.

The proposal's correctness never depends on the draft: rejection sampling keeps the target's
distribution whatever the draft proposes. A stale draft cache can only lower acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, pack_sequences
from engine.config import CacheConfig, EngineArgs, ModelConfig, SpeculativeConfig
from engine.kv_cache import LayerKVCache, allocate_kv_cache
from engine.models.loader import load_model
from engine.request import Request
from engine.sampler import (
    SamplingRow,
    exponential_noise,
    process_logits,
    sampling_distribution,
    splitmix64,
)

# Mixed into the request seed for the draft's own draws, so they are independent of the
# target's draws at the same output position.
_DRAFT_SEED_SALT = 0x5EED_D4AF7


@dataclass(frozen=True, slots=True)
class DraftInput:
    """One request's share of a draft step.

    The draft computes tokens [start, end) of the request (real tokens: the target computed
    them this step, and the last one may be the token just sampled); with num_drafts > 0 the
    logits at end - 1 start a proposal of that many tokens.
    """

    request: Request
    block_ids: tuple[int, ...]
    start: int
    end: int
    num_drafts: int


@dataclass(frozen=True, slots=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None  # [len(token_ids), V] draft distributions; None for greedy


def draft_model_config(target: ModelConfig, spec: SpeculativeConfig) -> ModelConfig:
    """The draft's ModelConfig: same dtype, device and max_model_len as the target."""
    assert spec.model is not None
    dtype_name = str(target.dtype).removeprefix("torch.")
    args = EngineArgs(
        model=spec.model,
        dtype=dtype_name,
        device=str(target.device),
        max_model_len=target.max_model_len,
        seed=target.seed,
    )
    try:
        config = args.create_model_config()
    except ValueError as e:
        raise ValueError(f"speculative_config.model: {e}") from e
    if config.vocab_size != target.vocab_size:
        raise ValueError(
            f"speculative_config.model: the draft's vocabulary ({config.vocab_size} tokens) "
            f"differs from the target's ({target.vocab_size})"
        )
    return config


class DraftModelProposer:
    def __init__(
        self, target_config: ModelConfig, spec: SpeculativeConfig, backend: AttentionBackend
    ) -> None:
        """Loads the draft model; its cache comes with `init_kv_cache`, once the block count is
        known (on CUDA it is sized after this model is loaded)."""
        self.k = spec.num_speculative_tokens
        self.model_config = draft_model_config(target_config, spec)
        self.device = target_config.device
        self.model = load_model(self.model_config, backend)
        self.block_size = 0
        self.kv_caches: list[LayerKVCache] = []

    def init_kv_cache(self, cache_config: CacheConfig) -> None:
        """The draft's cache: the target's block count and block size."""
        self.block_size = cache_config.block_size
        self.kv_caches = allocate_kv_cache(self.model_config, cache_config)

    @torch.inference_mode()
    def run(self, inputs: list[DraftInput]) -> dict[str, Proposal]:
        """Advances the draft cache over `inputs` and returns the proposals asked for."""
        if not inputs:
            return {}
        sequences = [
            (i.request.token_ids_range(i.start, i.end), i.start, i.block_ids) for i in inputs
        ]
        input_ids, positions, meta = pack_sequences(sequences, self.block_size, self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        active = [j for j, i in enumerate(inputs) if i.num_drafts > 0]
        if not active:
            return {}
        rows = torch.tensor([meta.query_start_loc_cpu[j + 1] - 1 for j in active])
        logits = self.model.compute_logits(hidden[rows.to(self.device)])  # [A, V]
        proposing = [inputs[j] for j in active]
        drafted: dict[str, list[int]] = {i.request.request_id: [] for i in proposing}
        probs: dict[str, list[torch.Tensor]] = {i.request.request_id: [] for i in proposing}

        for step in range(self.k):
            tokens, dists = self._draw(logits, proposing, drafted, step)
            for item, token, dist in zip(proposing, tokens, dists, strict=True):
                drafted[item.request.request_id].append(token)
                if dist is not None:
                    probs[item.request.request_id].append(dist)
            keep = [j for j, item in enumerate(proposing) if item.num_drafts > step + 1]
            if not keep:
                break
            proposing = [proposing[j] for j in keep]
            # The token just drafted goes in at the next position (its K/V is speculative).
            sequences = [
                ([drafted[i.request.request_id][-1]], i.end + step, i.block_ids) for i in proposing
            ]
            input_ids, positions, meta = pack_sequences(sequences, self.block_size, self.device)
            logits = self.model.compute_logits(
                self.model(input_ids, positions, self.kv_caches, meta)
            )
        return {
            rid: Proposal(tokens, torch.stack(probs[rid]) if probs[rid] else None)
            for rid, tokens in drafted.items()
        }

    def _draw(
        self,
        logits: torch.Tensor,  # [A, V]
        items: list[DraftInput],
        drafted: dict[str, list[int]],
        step: int,
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """The next draft token per item: the argmax for greedy requests, else a draw from the
        draft's distribution under the request's own sampling parameters (returned as q)."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        rows = [
            SamplingRow(
                params=i.request.sampling_params,
                sampling_seed=splitmix64(i.request.sampling_seed ^ _DRAFT_SEED_SALT),
                output_position=i.request.num_output_tokens + step,
                prompt_token_ids=i.request.prompt_token_ids,
                output_token_ids=i.request.output_token_ids,
                eos_token_ids=i.request.eos_token_ids,
                bad_words_token_ids=i.request.bad_words_token_ids,
                draft_token_ids=drafted[i.request.request_id],
                penalty_counts=i.request.penalty_counts,
            )
            for i in items
        ]
        processed = process_logits(logits, rows)
        tokens = processed.argmax(dim=-1)
        dists: list[torch.Tensor | None] = [None] * len(items)
        sampled = [j for j, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            sub_rows = [rows[j] for j in sampled]
            q = sampling_distribution(processed[sampled], sub_rows)  # [s, V]
            noise = exponential_noise(sub_rows, q.shape[-1], q.dtype).to(q.device)
            tokens[sampled] = (q / noise).argmax(dim=-1)
            for n, j in enumerate(sampled):
                dists[j] = q[n]
        return tokens.tolist(), dists
