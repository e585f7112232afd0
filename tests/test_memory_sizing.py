"""KV cache sizing: on CUDA after loading the target and the draft and running a dummy step of
max_num_batched_tokens tokens, from the device's figures (torch.cuda mocked, CPU tensors); on
CPU exactly as before."""

from __future__ import annotations

import pytest
import torch

import engine.engine as engine_module
import engine.runner as runner_module
from engine import EngineArgs, LLMEngine
from engine.kv_cache import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    CudaMemoryBaseline,
    CudaMemoryProfile,
    bytes_per_block,
    create_cache_config,
)

MiB = 2**20


class FakeCuda:
    """torch.cuda's memory figures for one engine start: before the dummy step, `used_before`
    MiB of the device are used by other processes; after it, this process holds
    `reserved_after` MiB in torch's allocator (peak `peak` MiB) plus `non_torch` MiB outside it."""

    def __init__(self, total=100, used_before=10, reserved_after=6, peak=7, non_torch=4):
        self.total, self.used_before = total * MiB, used_before * MiB
        self.reserved_after, self.peak, self.non_torch = (
            reserved_after * MiB,
            peak * MiB,
            non_torch * MiB,
        )
        self.profiled = False  # set once the dummy step ran
        self.calls: list[str] = []

    def mem_get_info(self, device=None):
        self.calls.append("mem_get_info")
        used = self.used_before
        if self.profiled:
            used += self.reserved_after + self.non_torch
        return self.total - used, self.total

    def max_memory_allocated(self, device=None):
        self.calls.append("max_memory_allocated")
        return self.peak if self.profiled else 0

    def memory_reserved(self, device=None):
        return self.reserved_after if self.profiled else 0

    def memory_allocated(self, device=None):
        return 0

    def install(self, monkeypatch):
        for name in ("mem_get_info", "max_memory_allocated", "memory_reserved", "memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)


def test_budget_is_the_utilization_share_less_peak_and_non_torch_memory(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    baseline = CudaMemoryBaseline.take(torch.device("cpu"), 0.5)

    def step():
        fake.profiled = True

    profile = baseline.profile(step)
    assert profile == CudaMemoryProfile(
        total_bytes=100 * MiB, torch_peak_bytes=7 * MiB, non_torch_bytes=4 * MiB
    )
    assert profile.kv_cache_budget(0.5) == (50 - 7 - 4) * MiB


def test_too_little_free_memory_for_the_utilization_is_an_error(monkeypatch):
    FakeCuda(used_before=60).install(monkeypatch)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CudaMemoryBaseline.take(torch.device("cpu"), 0.5)


def test_engine_sizes_after_loading_target_and_draft_and_a_dummy_step(
    llama_path, draft_path, monkeypatch
):
    fake = FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(engine_module, "needs_memory_profile", lambda args, config: True)
    dummy_runs: list[tuple[int, int, int]] = []  # (layers, tokens forwarded, sampled rows)
    real_dummy = runner_module.dummy_forward

    def recording_dummy(model, model_config, num_tokens, num_rows, block_size):
        seen = []
        handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].numel()))
        try:
            real_dummy(model, model_config, num_tokens, num_rows, block_size)
        finally:
            handle.remove()
        dummy_runs.append((model_config.num_layers, sum(seen), num_rows))
        fake.profiled = len(dummy_runs) == 2  # the figures change once both models ran

    monkeypatch.setattr(engine_module, "dummy_forward", recording_dummy)
    spec = {"method": "draft_model", "model": str(draft_path), "num_speculative_tokens": 2}
    engine = LLMEngine(
        EngineArgs(
            model=str(llama_path),
            dtype="float64",
            block_size=4,
            max_num_batched_tokens=96,
            max_model_len=64,
            max_num_seqs=8,
            gpu_memory_utilization=0.5,
            speculative_config=spec,
        )
    )
    # target (2 layers, k + 1 verification rows per request) then draft (1 layer), each over
    # the whole token budget
    assert dummy_runs == [(2, 96, 8 * 3), (1, 96, 8)]
    per_block = bytes_per_block(engine.model_config, 4) + bytes_per_block(
        engine.speculator.draft.model_config, 4
    )
    # K and V, float64, 2 KV heads x 16 dims x 4 slots: 2048 bytes per layer; 2 + 1 layers
    assert per_block == 2048 * 2 + 2048
    assert engine.cache_config.num_blocks == (50 - 7 - 4) * MiB // per_block
    assert engine.cache_config.kv_cache_memory_bytes == (50 - 7 - 4) * MiB
    assert engine.runner.kv_caches[0].k.shape[0] == engine.cache_config.num_blocks
    assert engine.speculator.draft.kv_caches[0].k.shape[0] == engine.cache_config.num_blocks
    # measured after the dummy step, not before the weights were loaded
    assert fake.calls.count("mem_get_info") == 2 and "max_memory_allocated" in fake.calls


def test_dummy_step_covers_long_budgets_in_max_model_len_prompts(llama_path):
    """A budget larger than max_model_len is forwarded as several prompts of at most
    max_model_len - 1 tokens, so the dummy step is a step the scheduler could make."""
    args = EngineArgs(model=str(llama_path), dtype="float64", max_model_len=32)
    config = args.create_model_config()
    from engine.fast.registry import get_attention_backend
    from engine.models.loader import load_model

    model = load_model(config, get_attention_backend("auto", config.device))
    lengths = []
    model.register_forward_pre_hook(lambda m, a: lengths.append(a[3].seq_lens.tolist()))
    runner_module.dummy_forward(model, config, 70, 4, 16)
    assert lengths == [[31, 31, 8]]


def test_cpu_sizing_is_unchanged(llama_path):
    args = EngineArgs(model=str(llama_path), dtype="float32", block_size=16, max_num_seqs=4)
    config = args.create_model_config()
    block = bytes_per_block(config, 16)
    blocks_per_seq = -(-config.max_model_len // 16)
    default = create_cache_config(args, config)
    assert (
        default.num_blocks == min(DEFAULT_CPU_KV_CACHE_BYTES, blocks_per_seq * 4 * block) // block
    )
    explicit = EngineArgs(model=str(llama_path), dtype="float32", kv_cache_memory_bytes=10 * MiB)
    sized = create_cache_config(explicit, explicit.create_model_config())
    assert sized.num_blocks == 10 * MiB // block and sized.kv_cache_memory_bytes == 10 * MiB
    override = EngineArgs(model=str(llama_path), num_gpu_blocks_override=7)
    assert create_cache_config(override, override.create_model_config()).num_blocks == 7
    # a draft model does not change an explicit or CPU budget (its cache is extra)
    assert create_cache_config(args, config, draft_model_config=config).num_blocks == (
        default.num_blocks
    )


def test_a_profile_that_leaves_no_room_names_the_knob(llama_path):
    args = EngineArgs(model=str(llama_path), dtype="float32")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        create_cache_config(args, args.create_model_config(), profiled_kv_cache_bytes=-5)


@pytest.fixture(scope="module")
def draft_path(llama_path, tmp_path_factory):
    from engine.demo import make_layer_truncated_checkpoint

    return make_layer_truncated_checkpoint(llama_path, tmp_path_factory.mktemp("draft"), 1)
