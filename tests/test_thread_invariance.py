"""A float32 batch-1 decode gives the same bits at any torch thread count.

The adaptive CPU reservation (engine/cpu_contention.py) moves the engine between 1 and all
threads between steps, mid-request. A request's tokens and logprobs must not change with it: the
linears' one-row product keeps one slicing (engine/models/cpu_gemm.py:split_gemv_parts), and the
ops torch would split over the threads for one row (the lone decode's SDPA, the logprob
normaliser) run on one thread (engine/serial.py).
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.serial import on_one_thread


def _decode(engine: LLMEngine, name: str, prompt: list[int], threads_at) -> list:
    """Greedy decode of one request; decode step i runs at threads_at(i) torch threads."""
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)
    torch.set_num_threads(2)
    engine.add_request(name, prompt, params)
    outputs = engine.step()  # the prompt (oneDNN at many rows) and the first token
    step = 0
    while engine.has_unfinished_requests():
        torch.set_num_threads(threads_at(step))
        outputs = engine.step()
        step += 1
    (out,) = outputs
    sample = out.outputs[0]
    entries = [sorted((t, lp.logprob) for t, lp in d.items()) for d in sample.logprobs]
    return [list(sample.token_ids), entries]


@pytest.mark.parametrize("block_size", [4, 16])
def test_batch1_decode_bits_do_not_depend_on_the_thread_count(checkpoints, block_size):
    path = checkpoints("thread-invariance", hidden_size=128, intermediate_size=352)
    engine = LLMEngine(
        EngineArgs(
            model=str(path),
            dtype="float32",
            block_size=block_size,
            max_model_len=256,
            enable_prefix_caching=False,  # every run computes its prompt the same way
        )
    )
    prompt = [3 + (i * 37) % 200 for i in range(30)]  # 30-78 cached keys while decoding
    saved = torch.get_num_threads()
    try:
        steady = _decode(engine, "two", prompt, lambda step: 2)
        switching = _decode(engine, "switching", prompt, lambda step: 1 + step % 2)
        single = _decode(engine, "one", prompt, lambda step: 1)
    finally:
        torch.set_num_threads(saved)
    assert switching == steady  # tokens, and the logprobs' floats exactly
    assert single == steady


def test_on_one_thread_restores_the_thread_count():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert on_one_thread(torch.get_num_threads) == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            on_one_thread(lambda: 1 / 0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_logprob_normaliser_of_one_row_does_not_depend_on_the_thread_count():
    """A real vocabulary (49,152, above torch's serial-reduction grain): torch's logsumexp of a
    lone row rounds differently at 1 and 2 threads for some rows (1 in 50 here), the sampler's
    normaliser does not. The small test models' rows are below the grain."""
    from engine.sampler import _log_normaliser

    saved = torch.get_num_threads()
    try:
        for seed in range(60):
            row = torch.randn(1, 49152, generator=torch.Generator().manual_seed(seed)) * 6 + 3
            torch.set_num_threads(1)
            one = _log_normaliser(row)
            torch.set_num_threads(2)
            assert torch.equal(_log_normaliser(row), one), seed
            torch.testing.assert_close(one, row.double().logsumexp(-1).float())
    finally:
        torch.set_num_threads(saved)
