"""AsyncEngine: background stepping, per-request streams, aborts, back-pressure, failures."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import (
    EngineDeadError,
    EngineShutdownError,
    EngineStepError,
    QueueFullError,
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
def make_engine(async_engine_factory):
    return lambda **kwargs: async_engine_factory(ENGINE_KW, **kwargs)


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


def test_add_cancelled_between_check_and_result_keeps_engine_alive(make_engine, expected):
    """The race of issue 11: the handler is cancelled while the engine thread is inside
    `add_request` (after its cancellation check, before it resolves the add). The engine must
    not die (no InvalidStateError on its thread); the request is aborted and frees its blocks."""
    engine = make_engine()
    inside, release = threading.Event(), threading.Event()
    real_add = engine.engine.add_request

    def slow_add(request_id, prompt, params):
        result = real_add(request_id, prompt, params)
        if request_id == "victim":
            inside.set()
            release.wait(30)
        return result

    engine.engine.add_request = slow_add
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)

    async def main():
        pending = asyncio.ensure_future(engine.add_request("victim", [5, 6, 7], long))
        await asyncio.get_running_loop().run_in_executor(None, inside.wait, 30)
        pending.cancel()  # the engine thread has passed its check and not yet set the result
        with pytest.raises(asyncio.CancelledError):
            await pending
        release.set()
        after = await engine.add_request("after", PROMPTS[3], params)
        out = await after.final()
        for _ in range(500):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert engine.is_running and engine.dead_error is None
        await engine.shutdown()
        return out

    assert run(main()).outputs[0].token_ids == expected[3]
    assert not engine.engine.has_unfinished_requests()
    assert engine.stats.scheduler.kv_cache_usage == 0.0
    assert engine.num_in_flight == 0 and engine.num_waiting_requests == 0


def test_adds_queued_when_engine_thread_dies_fail_instead_of_hanging(make_engine):
    """A step fails and so does its clean-up: the engine thread dies. Adds queued behind that
    step, and adds made after the death, fail with EngineDeadError instead of waiting forever."""
    engine = make_engine()
    entered, release = threading.Event(), threading.Event()

    def doomed_step():
        entered.set()
        release.wait(30)
        raise RuntimeError("injected step failure")

    def broken_abort(request_ids):
        raise RuntimeError("injected clean-up failure")

    engine.engine.step = doomed_step
    engine.engine.abort_request = broken_abort
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main():
        first = await engine.add_request("first", [5, 6], params)
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        queued = asyncio.ensure_future(engine.add_request("queued", [7, 8], params))
        await asyncio.sleep(0.05)  # the add command sits in the queue behind the blocked step
        release.set()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(queued, timeout=10)
        with pytest.raises(EngineDeadError):
            await first.final()
        with pytest.raises(EngineDeadError):
            await engine.add_request("later", [9], params)
        assert not engine.is_running
        assert engine.num_in_flight == 0 and engine.num_waiting_requests == 0

    run(main())


def test_waiting_limit_counts_every_sample(make_engine):
    """`n` samples count n times toward max_waiting_requests; more than it can ever admit is a
    ValueError (HTTP 400), not a request that waits forever."""
    engine = make_engine(max_waiting_requests=4)
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def blocking_step():
        entered.set()
        release.wait(30)
        return real_step()

    engine.engine.step = blocking_step
    three = SamplingParams(n=3, temperature=0.7, seed=1, max_tokens=2, ignore_eos=True)
    two = SamplingParams(n=2, temperature=0.7, seed=1, max_tokens=2, ignore_eos=True)

    async def main():
        with pytest.raises(ValueError, match="max_waiting_requests"):
            await engine.add_request("huge", [5], SamplingParams(n=5, seed=1))
        first = await engine.add_request("a", [5, 6], three)
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        assert engine.num_waiting_requests == 3
        with pytest.raises(QueueFullError):
            await engine.add_request("b", [7, 8], two)  # 3 + 2 > 4
        release.set()
        out = await first.final()
        assert engine.num_waiting_requests == 0
        second = await engine.add_request("b", [7, 8], two)  # room again
        await second.final()
        await engine.shutdown()
        return out

    assert len(run(main()).outputs) == 3


def test_delta_streams_merge_what_a_slow_consumer_has_not_taken(make_engine, llama_path):
    """DELTA requests (what the server uses): each item holds only what is new; a consumer that
    falls behind gets the deltas it missed merged into one item, so nothing is lost; `final()`
    is the complete output."""
    engine = make_engine()
    params = SamplingParams(
        n=2, temperature=0.7, seed=3, max_tokens=12, ignore_eos=True, output_kind="DELTA"
    )
    offline = SamplingParams(n=2, temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)

    async def main():
        eager = await engine.add_request("eager", PROMPTS[1], params)
        slow = await engine.add_request("slow", PROMPTS[1], params)
        whole = await engine.add_request("whole", PROMPTS[1], params)
        items = [out async for out in eager]
        while not slow._finished:  # the slow consumer takes nothing until the end
            await asyncio.sleep(0.01)
        late = [out async for out in slow]
        final = await whole.final()
        await engine.shutdown()
        return items, late, final

    items, late, final = run(main())
    llm = LLM(str(llama_path), **ENGINE_KW)
    want_ids = [c.token_ids for c in llm.generate([PROMPTS[1]], offline, use_tqdm=False)[0].outputs]
    assert len(items) > 1 and all(len(c.token_ids) <= 12 for o in items for c in o.outputs)
    joined = {0: [], 1: []}
    for out in items:
        for c in out.outputs:
            joined[c.index] += c.token_ids
    assert [joined[0], joined[1]] == want_ids
    assert len(late) == 1 and [c.token_ids for c in late[0].outputs] == want_ids
    assert late[0].finished and [c.finish_reason for c in late[0].outputs] == ["length"] * 2
    assert [c.token_ids for c in final.outputs] == want_ids
    assert [c.text for c in final.outputs] == [c.text for c in late[0].outputs]


def test_start_and_add_free_the_loop_threads_openmp_team(make_engine, monkeypatch):
    """The loop's thread (which loaded the model in the CLI) must not keep a libgomp team: it
    would make the step thread's OpenMP workers sleep and wake at every op (engine/openmp.py)."""
    import engine.async_engine as async_engine_module

    calls: list[str] = []
    monkeypatch.setattr(
        async_engine_module,
        "release_openmp_pool",
        lambda rescan=True: calls.append(threading.current_thread().name) or True,
    )
    engine = make_engine()
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def main():
        loop_thread = threading.current_thread().name
        stream = await engine.add_request("r0", PROMPTS[0], params)
        await stream.final()
        await engine.shutdown()
        return loop_thread

    loop_thread = run(main())
    assert len(calls) >= 2  # start() and the add
    assert set(calls) == {loop_thread}  # never from the step thread (it keeps its team)


def test_num_threads_sets_the_step_threads_torch_threads_only(make_engine):
    """`num_threads` (the server's reserved cores) applies to the engine thread's steps; the
    loop thread keeps its own setting."""
    import torch

    before = torch.get_num_threads()
    wanted = before + 1  # differs from the default, whatever OMP_NUM_THREADS says
    seen: list[int] = []
    engine = make_engine(num_threads=wanted)
    engine.fault_hook = lambda: seen.append(torch.get_num_threads())  # on the engine thread
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def main():
        stream = await engine.add_request("r0", PROMPTS[0], params)
        await stream.final()
        await engine.shutdown()

    try:
        run(main())
        assert seen and set(seen) == {wanted}
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)  # threads started later take the process-wide value
    with pytest.raises(ValueError, match="num_threads"):
        make_engine(num_threads=0)
