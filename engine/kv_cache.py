"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

A request's context lives in the blocks its block table lists, in order; token t of the request
is at block_table[t // block_size], offset t % block_size. Slots past a request's length may hold
stale data from an earlier owner of the block: readers must mask by seq_len, never by content.

The block count comes from a memory budget: `kv_cache_memory_bytes` when given, else on CUDA a
fraction (`gpu_memory_utilization`) of the memory free after loading the weights, and on CPU a
fixed budget capped by what `max_num_seqs` requests of `max_model_len` tokens could use.
`num_gpu_blocks_override` replaces the computed count outright.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import CacheConfig, EngineArgs, ModelConfig

logger = logging.getLogger(__name__)

# CPU default budget, like vLLM's VLLM_CPU_KVCACHE_SPACE (there 4 GiB).
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class LayerKVCache:
    k: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]


def bytes_per_block(model_config: ModelConfig, block_size: int) -> int:
    """Bytes one block takes over all layers, K and V together."""
    element_size = torch.empty((), dtype=model_config.dtype).element_size()
    per_token = 2 * model_config.num_kv_heads * model_config.head_dim * element_size
    return per_token * block_size * model_config.num_layers


def create_cache_config(args: EngineArgs, model_config: ModelConfig) -> CacheConfig:
    """Decides the block count from the budget and logs the capacity it gives."""
    block_bytes = bytes_per_block(model_config, args.block_size)
    blocks_per_seq = -(-model_config.max_model_len // args.block_size)
    if args.num_gpu_blocks_override is not None:
        num_blocks = args.num_gpu_blocks_override
        budget = num_blocks * block_bytes
    else:
        if args.kv_cache_memory_bytes is not None:
            budget = args.kv_cache_memory_bytes
        elif model_config.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(model_config.device)
            budget = int(free * args.gpu_memory_utilization)
        else:
            wanted = blocks_per_seq * args.max_num_seqs * block_bytes
            budget = min(DEFAULT_CPU_KV_CACHE_BYTES, wanted)
        num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache budget ({budget} bytes) is smaller than one block "
            f"({block_bytes} bytes); raise kv_cache_memory_bytes or num_gpu_blocks_override"
        )
    if num_blocks < blocks_per_seq:
        # Requests that could outgrow the pool are rejected when added (LLMEngine.add_request).
        logger.warning(
            "the KV cache (%d blocks of %d tokens) cannot hold one sequence of max_model_len=%d "
            "tokens; requests that could grow past %d tokens will be rejected",
            num_blocks,
            args.block_size,
            model_config.max_model_len,
            num_blocks * args.block_size,
        )
    config = CacheConfig(
        block_size=args.block_size,
        num_blocks=num_blocks,
        kv_cache_memory_bytes=budget,
        enable_prefix_caching=args.resolved_prefix_caching,
    )
    logger.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB), %d token slots; max concurrency at "
        "max_model_len=%d: %.2fx",
        num_blocks,
        args.block_size,
        num_blocks * block_bytes / 2**20,
        config.num_token_slots,
        model_config.max_model_len,
        num_blocks / blocks_per_seq,
    )
    return config


def allocate_kv_cache(model_config: ModelConfig, cache_config: CacheConfig) -> list[LayerKVCache]:
    """Zero-filled caches, one per layer. Zeros (not empty) so that masked-out stale slots can
    never be NaN, which `-inf` masking would not hide."""
    shape = (
        cache_config.num_blocks,
        cache_config.block_size,
        model_config.num_kv_heads,
        model_config.head_dim,
    )
    kwargs = {"dtype": model_config.dtype, "device": model_config.device}
    return [
        LayerKVCache(k=torch.zeros(shape, **kwargs), v=torch.zeros(shape, **kwargs))
        for _ in range(model_config.num_layers)
    ]
