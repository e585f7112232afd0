"""The runner's persistent block table through a real engine: it holds a row only for requests
that may still run, whatever ended them (length, stop string, abort, a failed step then an
abort), with either scheduler; and the block table each step's forward sees equals the one built
from scratch from the scheduler's tables (the production scheduler hands only what changed, the
reference one the whole table)."""

from __future__ import annotations

import pytest

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.attention import build_block_table


class InjectedFault(RuntimeError):
    pass


def _engine(llama_path, scheduler: str) -> LLMEngine:
    return LLMEngine(
        EngineArgs(
            model=str(llama_path),
            dtype="float32",
            block_size=2,
            max_model_len=64,
            seed=0,
            scheduler=scheduler,
            num_gpu_blocks_override=40,  # small: preemptions happen
        )
    )


def _watch_block_tables(engine: LLMEngine) -> list[int]:
    """Checks each forward's block table against a from-scratch build; returns step counts."""
    seen = [0]
    model = engine.runner.model
    forward = model.forward

    def checked(input_ids, positions, kv_caches, meta):
        output = engine._current_output
        expected = build_block_table([item.block_ids for item in output.scheduled])
        assert meta.block_table.equal(expected)
        seen[0] += 1
        return forward(input_ids, positions, kv_caches, meta)

    model.forward = checked
    schedule = engine.scheduler.schedule

    def remembering():
        engine._current_output = schedule()
        return engine._current_output

    engine.scheduler.schedule = remembering
    return seen


@pytest.mark.parametrize("fail_in", ["runner", "forward"])
@pytest.mark.parametrize("scheduler", ["default", "reference"])
def test_rows_only_for_live_requests_and_tables_equal_a_rebuild(llama_path, scheduler, fail_in):
    engine = _engine(llama_path, scheduler)
    steps = _watch_block_tables(engine)
    table = engine.runner.block_table
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"long{i}", [3 + i, 4, 5, 6, 7], long)
    engine.add_request("short", [9, 9, 9], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request("aborted", [8, 8, 8, 8], long)
    for _ in range(4):
        engine.step()
    engine.abort_request("aborted")
    # A failed step (before the runner saw its output, or in the forward): its requests are
    # rolled back, then the caller aborts one of them.
    owner = engine.runner if fail_in == "runner" else engine.runner.model
    name = "execute" if fail_in == "runner" else "forward"
    working = getattr(owner, name)

    def failing(*args):
        raise InjectedFault("injected")

    setattr(owner, name, failing)
    with pytest.raises(InjectedFault):
        engine.step()
    setattr(owner, name, working)
    engine.abort_request(engine.failed_request_ids[0])
    while engine.has_unfinished_requests():
        engine.step()
        scheduler = engine.scheduler
        # Running, or waiting after a preemption or the failed step (they keep their row until
        # they run again, with a whole new table), or ended and not yet reported to the runner.
        may_hold = {r.request_id for r in [*scheduler.running, *scheduler.waiting]}
        assert set(table.request_ids) <= may_hold | set(scheduler.finished_ids)
    assert steps[0] > 10 and engine.scheduler.stats().num_preemptions_total > 0
    assert engine.scheduler.kv_cache_usage == 0.0
    # Every request ended: the next step that schedules anything drops all their rows (and the
    # new request, which ends in that step, keeps its row until the step after).
    engine.add_request("last", [5, 5], SamplingParams(max_tokens=1))
    engine.step()
    assert table.request_ids == ["last"] and engine.scheduler.finished_ids == ["last"]
