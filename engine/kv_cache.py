"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

A request's context lives in the blocks its block table lists, in order; token t of the request
is at block_table[t // block_size], offset t % block_size. Slots past a request's length may hold
stale data from an earlier owner of the block: readers must mask by seq_len, never by content.

The block count comes from a memory budget: `kv_cache_memory_bytes` when given; else on CUDA what
is left of `gpu_memory_utilization` x the device's total memory once the weights of the target
and the draft model are loaded and a dummy forward of `max_num_batched_tokens` tokens (with the
sampler on `max_num_seqs` rows) has run, as vLLM sizes it: the peak of torch's allocations and
the memory the process holds outside torch (CUDA context, library workspaces) are subtracted,
and the blocks are counted with the draft's cache (which has as many blocks) included; on CPU a
fixed budget capped by what `max_num_seqs` requests of `max_model_len` tokens could use.
`num_gpu_blocks_override` replaces the computed count outright. An explicit budget or the CPU
one counts the target's cache only.

Tensor parallelism: budgets are per rank (as vLLM's gpu_memory_utilization is per GPU), and a
rank's block holds its own KV heads (`ModelConfig.num_kv_heads_per_rank`), so TP=n has n times
the blocks of TP=1 for the same budget when the KV heads split evenly. Every rank allocates the
block count rank 0 decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    """Bytes one block takes over all layers, K and V together, on one rank (with tensor
    parallelism each rank holds the blocks of its own KV heads)."""
    element_size = torch.empty((), dtype=model_config.dtype).element_size()
    per_token = 2 * model_config.num_kv_heads_per_rank * model_config.head_dim * element_size
    return per_token * block_size * model_config.num_layers


def needs_memory_profile(args: EngineArgs, model_config: ModelConfig) -> bool:
    """True when the block count comes from profiling the device (CUDA, no explicit size)."""
    return (
        model_config.device.type == "cuda"
        and args.num_gpu_blocks_override is None
        and args.kv_cache_memory_bytes is None
    )


@dataclass(frozen=True, slots=True)
class CudaMemoryBaseline:
    """The device's memory when the engine starts, before any weight is loaded."""

    device: torch.device
    total_bytes: int
    free_bytes: int
    allocated_bytes: int  # by this process's torch allocator
    reserved_bytes: int

    @classmethod
    def take(cls, device: torch.device, gpu_memory_utilization: float) -> CudaMemoryBaseline:
        """Resets the allocator's peak statistics and records the device's memory. Raises
        ValueError when less than gpu_memory_utilization x total is free (other processes use
        the rest), as vLLM does."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        baseline = cls(
            device=device,
            total_bytes=total,
            free_bytes=free,
            allocated_bytes=torch.cuda.memory_allocated(device),
            reserved_bytes=torch.cuda.memory_reserved(device),
        )
        requested = int(total * gpu_memory_utilization)
        if requested > free:
            raise ValueError(
                f"gpu_memory_utilization: {gpu_memory_utilization} of the device's "
                f"{total / 2**30:.2f} GiB is {requested / 2**30:.2f} GiB, but only "
                f"{free / 2**30:.2f} GiB are free (other processes use the rest); lower "
                "gpu_memory_utilization or free the device"
            )
        return baseline

    def profile(self, dummy_forward: Callable[[], None]) -> CudaMemoryProfile:
        """Runs the dummy forward (after the weights are loaded) and measures what the engine
        uses besides the KV cache."""
        dummy_forward()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        used_since = (total - free) - (self.total_bytes - self.free_bytes)
        return CudaMemoryProfile(
            total_bytes=total,
            torch_peak_bytes=max(0, peak - self.allocated_bytes),
            non_torch_bytes=max(0, used_since - (reserved - self.reserved_bytes)),
        )


@dataclass(frozen=True, slots=True)
class CudaMemoryProfile:
    """What the engine uses on the device besides the KV cache, measured after loading the
    weights and running the dummy forward."""

    total_bytes: int
    torch_peak_bytes: int  # peak of torch's allocations since start: weights + activations
    non_torch_bytes: int  # held outside torch's allocator since start (context, workspaces)

    def kv_cache_budget(self, gpu_memory_utilization: float) -> int:
        """gpu_memory_utilization x total, less the peak and the non-torch memory."""
        requested = int(self.total_bytes * gpu_memory_utilization)
        return requested - self.torch_peak_bytes - self.non_torch_bytes


def create_cache_config(
    args: EngineArgs,
    model_config: ModelConfig,
    draft_model_config: ModelConfig | None = None,
    profiled_kv_cache_bytes: int | None = None,
) -> CacheConfig:
    """Decides the block count from the budget and logs the capacity it gives.

    `profiled_kv_cache_bytes` (CUDA, from `CudaMemoryProfile.kv_cache_budget`) holds the
    target's and the draft's caches (`draft_model_config`), both with the block count returned.
    """
    block_bytes = bytes_per_block(model_config, args.block_size)
    blocks_per_seq = -(-model_config.max_model_len // args.block_size)
    hint = "raise kv_cache_memory_bytes or num_gpu_blocks_override"
    if args.num_gpu_blocks_override is not None:
        num_blocks = args.num_gpu_blocks_override
        budget = num_blocks * block_bytes
    elif args.kv_cache_memory_bytes is not None:
        budget = args.kv_cache_memory_bytes
        num_blocks = budget // block_bytes
    elif profiled_kv_cache_bytes is not None:
        budget = profiled_kv_cache_bytes
        if draft_model_config is not None:
            block_bytes += bytes_per_block(draft_model_config, args.block_size)
        num_blocks = max(budget, 0) // block_bytes
        hint = (
            "raise gpu_memory_utilization, lower max_num_batched_tokens, or set "
            "kv_cache_memory_bytes / num_gpu_blocks_override"
        )
    elif model_config.device.type == "cuda":
        raise ValueError("the KV cache on CUDA is sized from a memory profile; none was given")
    else:
        wanted = blocks_per_seq * args.max_num_seqs * block_bytes
        budget = min(DEFAULT_CPU_KV_CACHE_BYTES, wanted)
        num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache budget ({budget} bytes) is smaller than one block "
            f"({block_bytes} bytes); {hint}"
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
        "max_model_len=%d: %.2fx%s",
        num_blocks,
        args.block_size,
        num_blocks * block_bytes / 2**20,
        config.num_token_slots,
        model_config.max_model_len,
        num_blocks / blocks_per_seq,
        sliding_window_note(args, model_config),
    )
    return config


def window_tokens_needed(args: EngineArgs, model_config: ModelConfig) -> int | None:
    """Tokens of K/V one request ever reads when *every* layer slides (None if any is global).

    A decode at position p reads positions > p - window; a step adds at most a chunk of
    `max_num_batched_tokens` tokens, so window - 1 + chunk positions (capped by max_model_len)
    are all a request needs resident, plus a block for alignment.
    """
    from engine.models.registry import layer_sliding_windows

    windows = layer_sliding_windows(model_config.hf_config, model_config.architecture)
    if not windows or any(w is None for w in windows):
        return None
    step_tokens = args.create_scheduler_config(model_config).max_num_batched_tokens
    chunk = min(step_tokens, model_config.max_model_len)
    needed = max(windows) - 1 + chunk + args.block_size
    return min(model_config.max_model_len, needed)


def sliding_window_note(args: EngineArgs, model_config: ModelConfig) -> str:
    """The capacity log's addition for models whose every layer slides: what the window needs.

    Blocks that fall out of every layer's window are not freed yet, so the capacity above (full
    max_model_len per request) is what the pool really holds; the note says how much less a
    request reads, for sizing `max_model_len` and the pool."""
    needed = window_tokens_needed(args, model_config)
    if needed is None or needed >= model_config.max_model_len:
        return ""
    return (
        f"; every layer slides, so a request reads at most {needed} tokens of K/V (window - 1 "
        "+ one chunk + a block), but out-of-window blocks stay allocated until it finishes"
    )


def allocate_kv_cache(model_config: ModelConfig, cache_config: CacheConfig) -> list[LayerKVCache]:
    """Zero-filled caches, one per layer. Zeros (not empty) so that masked-out stale slots can
    never be NaN, which `-inf` masking would not hide."""
    shape = (
        cache_config.num_blocks,
        cache_config.block_size,
        model_config.num_kv_heads_per_rank,
        model_config.head_dim,
    )
    kwargs = {"dtype": model_config.dtype, "device": model_config.device}
    return [
        LayerKVCache(k=torch.zeros(shape, **kwargs), v=torch.zeros(shape, **kwargs))
        for _ in range(model_config.num_layers)
    ]
