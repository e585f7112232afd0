"""The KV capacity log counts what a sliding window really needs (issue 15)."""

from __future__ import annotations

import logging

from engine import EngineArgs
from engine.kv_cache import window_tokens_needed


def test_capacity_log_counts_the_window_when_every_layer_slides(checkpoints, caplog):
    path = checkpoints("mistral-window", "MistralForCausalLM", sliding_window=64)
    args = EngineArgs(
        model=str(path),
        max_model_len=512,
        max_num_batched_tokens=128,
        max_num_seqs=8,
        block_size=16,
        kv_cache_memory_bytes=2**22,
    )
    config = args.create_model_config()
    # window 64 - 1 + one 128-token chunk + a block of 16
    assert window_tokens_needed(args, config) == 64 - 1 + 128 + 16
    with caplog.at_level(logging.INFO, logger="engine"):
        from engine.kv_cache import create_cache_config

        create_cache_config(args, config)
    assert "a request reads at most 207 tokens" in caplog.text


def test_no_window_note_with_a_global_layer(checkpoints):
    path = checkpoints("llama-global", "LlamaForCausalLM")
    args = EngineArgs(model=str(path), max_model_len=512, kv_cache_memory_bytes=2**22)
    assert window_tokens_needed(args, args.create_model_config()) is None
