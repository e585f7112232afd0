"""AsyncEngine: background stepping, per-request streams, aborts, back-pressure, failures."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.async_engine import (
    AsyncEngine,
    EngineShutdownError,
    EngineStepError,
    QueueFullError,
    _Stop,
    merge_streams,
)

ENGINE_KW = {"dtype": "float64", "block_size": 4, "kv_cache_memory_bytes": 8 * 2**20, "seed": 0}
PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500], [42] * 9, [11, 12]]


@pytest.fixture(scope="module")
def expected(llama_path):
    llm = LLM(str(llama_path), **ENGINE_KW)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture
def make_engine(llama_path):
    engines: list[AsyncEngine] = []

    def make(**kwargs) -> AsyncEngine:
        engine = AsyncEngine(LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW)), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:  # a test that failed half-way must not leave a thread stepping
        engine._commands.put(_Stop())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_concurrent_streams_match_offline_and_free_everything(make_engine, expected):
    engine = make_engine()
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)

    async def main():
        streams = [await engine.add_request(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
        seen: dict[int, list[list[int]]] = {i: [] for i in range(len(PROMPTS))}
        async for index, out in merge_streams(streams):
            seen[index].append(out.outputs[0].token_ids)
        await engine.shutdown()
        return seen

    seen = run(main())
    for i, token_lists in seen.items():
        assert token_lists[-1] == expected[i]
        # outputs are cumulative: each one extends the previous
        for before, after in itertools.pairwise(token_lists):
            assert after[: len(before)] == before
    stats = engine.stats
    assert stats.scheduler.num_running == stats.scheduler.num_waiting == 0
    assert stats.scheduler.kv_cache_usage == 0.0
    assert stats.generation_tokens_total == 12 * len(PROMPTS)
    assert not engine.is_running  # shutdown joined the thread


def test_close_aborts_and_frees_blocks(make_engine, expected):
    engine = make_engine()
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    short = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)

    async def main():
        doomed = await engine.add_request("long", [5, 6, 7], long)
        survivor = await engine.add_request("short", PROMPTS[1], short)
        first = await doomed.__anext__()
        assert not first.finished
        doomed.close()
        final = await survivor.final()
        async for _ in doomed:  # a closed stream just ends
            raise AssertionError("closed stream yielded")
        # The abort is applied between steps; wait for the snapshot that shows it.
        for _ in range(500):
            if engine.stats.scheduler.kv_cache_usage == 0.0:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return final

    final = run(main())
    assert final.outputs[0].token_ids == expected[1]
    assert engine.stats.scheduler.kv_cache_usage == 0.0
    assert engine.stats.scheduler.num_running == 0
    assert not engine.engine.has_unfinished_requests()


def test_rejected_request_adds_nothing(make_engine, expected):
    engine = make_engine()
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)

    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await engine.add_request("bad", [5, 10**7], params)
        assert engine.num_in_flight == 0 and engine.num_waiting_requests == 0
        # the same id can be reused: nothing of the failed add remained
        good = await engine.add_request("bad", PROMPTS[0], params)
        out = await good.final()
        await engine.shutdown()
        return out

    assert run(main()).outputs[0].token_ids == expected[0]


def test_waiting_limit_raises_queue_full(make_engine):
    engine = make_engine(max_waiting_requests=2)
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def blocking_step():
        entered.set()
        release.wait(30)
        return real_step()

    engine.engine.step = blocking_step
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main():
        first = await engine.add_request("a", [5, 6], params)
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        # "a" is inside the blocked step; "b" is queued: both wait for their first token
        add_b = asyncio.ensure_future(engine.add_request("b", [7, 8], params))
        await asyncio.sleep(0.05)
        assert engine.num_waiting_requests == 2
        with pytest.raises(QueueFullError):
            await engine.add_request("c", [9], params)
        release.set()
        second = await add_b
        outs = [await first.final(), await second.final()]
        assert engine.num_waiting_requests == 0
        third = await engine.add_request("c", [9], params)  # room again
        outs.append(await third.final())
        await engine.shutdown()
        return outs

    outs = run(main())
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3, 3]


def test_step_failure_fails_requests_and_engine_keeps_serving(make_engine, expected):
    engine = make_engine()
    real_step = engine.engine.step
    fail_next = threading.Event()

    def flaky_step():
        if fail_next.is_set():
            fail_next.clear()
            raise RuntimeError("injected failure")
        return real_step()

    engine.engine.step = flaky_step
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)

    async def main():
        victim = await engine.add_request("victim", [5, 6, 7], long)
        await victim.__anext__()
        fail_next.set()
        with pytest.raises(EngineStepError, match="injected failure"):
            async for _ in victim:
                pass
        assert engine.is_running
        after = await engine.add_request("after", PROMPTS[2], params)
        out = await after.final()
        await engine.shutdown()
        return out

    assert run(main()).outputs[0].token_ids == expected[2]
    assert engine.stats.scheduler.kv_cache_usage == 0.0


def test_shutdown_fails_in_flight_and_refuses_new(make_engine):
    engine = make_engine()
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        stream = await engine.add_request("x", [5, 6, 7], long)
        await stream.__anext__()
        await engine.shutdown()
        with pytest.raises(EngineShutdownError):
            async for _ in stream:
                pass
        with pytest.raises(EngineShutdownError):
            await engine.add_request("y", [5], long)

    run(main())
    assert not engine.is_running


def test_cancelled_add_leaves_nothing_behind(make_engine):
    engine = make_engine()
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def blocking_step():
        entered.set()
        release.wait(30)
        return real_step()

    engine.engine.step = blocking_step
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        first = await engine.add_request("first", [5, 6], SamplingParams(max_tokens=2))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        pending = asyncio.ensure_future(engine.add_request("cancelled", [7, 8], long))
        await asyncio.sleep(0.05)
        pending.cancel()  # the add command is still queued behind the blocked step
        with pytest.raises(asyncio.CancelledError):
            await pending
        release.set()
        await first.final()
        for _ in range(500):
            if (
                not engine.engine.has_unfinished_requests()
                and engine.stats.scheduler.kv_cache_usage == 0
            ):
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()

    run(main())
    assert not engine.engine.has_unfinished_requests()
    assert engine.stats.scheduler.kv_cache_usage == 0.0
    assert engine.num_in_flight == 0 and engine.num_waiting_requests == 0
