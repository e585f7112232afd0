"""The engine's host work per step does not grow with the output length: counted, not timed.

A profiler hook counts every Python-level call (functions entered, builtins and C methods called)
during the steps of two windows of a long generation, one early and one late in the outputs,
attributed to the engine module that makes or receives the call. The windows are a multiple of
the block size long and every request advances in lockstep, so both see the same number of new
blocks. Scheduling, input packing (block tables included), sampling and stop-string checks must
make no more calls late than early; before the persistent block tables, the KV cache manager
walked every block of every request each step (tuple of all block ids) and the count grew with
the length.

The model forward, detokenization and stop-string checks are counted too, with slack: their
counts vary a little with the tokens drawn (tokenizer and logprob text caches, characters per
token), not with the length. (That the stop checker never copies the text so far is checked by
its allocations, in tests/test_stop_strings.py.)
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.sampling_params import RequestOutputKind

_ENGINE_DIR = str(Path(__file__).resolve().parents[1] / "engine") + "/"
BLOCK_SIZE = 4
WINDOW = 4 * BLOCK_SIZE  # steps per window: every request starts exactly 4 blocks in each
EARLY, LATE = 16, 176  # first step of each window (output length there)
# Whose calls must not grow at all (late <= early): the host path of a step.
FLAT_EXACTLY = (
    "scheduler/",
    "runner.py",
    "attention.py",
    "block_table.py",
    "sampler.py",
    "penalties.py",
    "request.py",
)


def _module(filename: str) -> str | None:
    return filename[len(_ENGINE_DIR) :] if filename.startswith(_ENGINE_DIR) else None


class CallCounter:
    """Counts calls per engine module while active: a Python function entered counts for its
    own module; a builtin or C method (a tensor op, len, list.extend...) for its caller's."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def _hook(self, frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            module = _module(frame.f_code.co_filename)
            if module is not None:
                self.counts[module] += 1

    def run(self, fn) -> None:
        sys.setprofile(self._hook)
        try:
            fn()
        finally:
            sys.setprofile(None)


def _count_windows(llama_path) -> tuple[Counter[str], Counter[str], LLMEngine, list[int]]:
    engine = LLMEngine(
        EngineArgs(
            model=str(llama_path),
            dtype="float32",
            block_size=BLOCK_SIZE,
            max_model_len=256,
            seed=0,
        )
    )
    for i in range(4):
        params = SamplingParams(
            temperature=0.8,
            seed=i,
            max_tokens=LATE + WINDOW + 8,
            ignore_eos=True,
            logprobs=2,
            repetition_penalty=1.1,
            presence_penalty=0.1,
            stop=["\x00never\x00"],  # the stop checker runs, never matches
            output_kind=RequestOutputKind.DELTA,
        )
        engine.add_request(str(i), [5 + i, 6, 7, 8, 9, 10], params)
    early, late = CallCounter(), CallCounter()
    ids_written = []  # block ids the runner wrote into its persistent table, per window
    for step in range(LATE + WINDOW):
        counter = early if EARLY <= step < EARLY + WINDOW else late if step >= LATE else None
        if step in (EARLY, LATE):
            ids_written.append(engine.runner.block_table.num_ids_written)
        if counter is None:
            engine.step()
        else:
            counter.run(engine.step)
        if step in (EARLY + WINDOW - 1, LATE + WINDOW - 1):
            ids_written[-1] = engine.runner.block_table.num_ids_written - ids_written[-1]
    return early.counts, late.counts, engine, ids_written


def test_host_calls_per_step_do_not_grow_with_the_output_length(llama_path):
    early, late, engine, ids_written = _count_windows(llama_path)
    requests = [group.requests[0] for group in engine._groups.values()]
    assert len(requests) == 4 and all(r.num_output_tokens == LATE + WINDOW for r in requests)
    # Late, every request holds ~8x the blocks it held early: a per-block walk would show.
    kv = engine.scheduler.kv
    assert len(kv.block_ids("0")) > 7 * (6 + EARLY) // BLOCK_SIZE

    grown = {
        m: (early[m], late[m])
        for m in set(early) | set(late)
        if m.startswith(FLAT_EXACTLY) and late[m] > early[m]
    }
    assert not grown, f"calls per window grew with the length (early, late): {grown}"
    assert sum(late.values()) <= 1.05 * sum(early.values()), (sum(early.values()), late)
    # The runner wrote each window's new block ids only: one per request per block_size steps.
    assert ids_written == [4 * WINDOW // BLOCK_SIZE] * 2
