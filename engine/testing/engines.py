"""Engine-level checks: a speculative proposer must leave greedy output unchanged (lockstep).

`workloads()` draws random request mixes (shared prefixes, which the prefix cache reuses across
examples; greedy and seeded sampling; n > 1; ignore_eos; aborts at given steps);
`run_workload(engine, requests, aborts, tag)` runs one through an `LLMEngine` and returns the
finished requests' tokens. `check_proposer_lockstep(model, spec)` runs workloads through an
engine without speculation and one with `speculative_config=spec` (chunked prefill with a small
token budget, a pool that forces preemption) and requires every greedy request's tokens to be
identical; a failure is shrunk and raised with a reproducer script.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import strategies as st

from engine.sampling_params import SamplingParams
from engine.testing.reproducer import fail, find_failure

PREFIXES = [
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [11, 12, 13, 14, 30, 31],
    [40 + i for i in range(23)],
]
# Production-scheduler settings that exercise chunking and preemption on tiny models.
STRESS_ARGS = {
    "scheduler": "default",
    "max_num_batched_tokens": 12,  # long prompts are chunked
    "max_num_seqs": 5,
    "num_gpu_blocks_override": 30,  # 120 slots at block size 4: preemption under load
}


@st.composite
def workloads(draw, greedy_only: bool = False, max_token_id: int = 900):
    """(requests, aborts): requests are (prompt ids, SamplingParams); aborts[i] = (request
    index, step) aborts that request at that step."""
    requests = []
    for _ in range(draw(st.integers(1, 7))):
        prefix = draw(st.sampled_from([[], *PREFIXES]))
        suffix = draw(
            st.lists(st.integers(3, max_token_id), min_size=0 if prefix else 1, max_size=12)
        )
        greedy = greedy_only or draw(st.booleans())
        params = SamplingParams(
            n=draw(st.sampled_from([1, 1, 2])),
            temperature=0.0 if greedy else draw(st.sampled_from([0.7, 1.0])),
            top_p=draw(st.sampled_from([1.0, 0.9])),
            seed=None if greedy else draw(st.integers(0, 1000)),
            max_tokens=draw(st.integers(1, 20)),
            ignore_eos=draw(st.booleans()),
        )
        requests.append((prefix + suffix, params))
    aborts = draw(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8)), max_size=2))
    return requests, aborts


def run_workload(engine, requests, aborts, tag: str, max_steps: int = 2000) -> dict:
    """Runs the workload; returns request id -> token ids per sample, aborted ones left out."""
    ids = [f"{tag}-{i}" for i in range(len(requests))]
    engine.abort_request(ids)  # leftovers of an earlier failed example must not mask this one
    for request_id, (prompt, params) in zip(ids, requests, strict=True):
        engine.add_request(request_id, prompt, params)
    aborted = set()
    final = {}
    step = 0
    while engine.has_unfinished_requests():
        for index, at in aborts:
            if at == step and index < len(ids) and ids[index] not in final:
                engine.abort_request(ids[index])
                aborted.add(ids[index])
        for out in engine.step():
            if out.finished:
                final[out.request_id] = [c.token_ids for c in out.outputs]
        step += 1
        assert step < max_steps, "the engine did not finish the workload"
    return {i: final[i] for i in ids if i not in aborted}


def greedy_mismatches(requests, expected: dict, got: dict, tag_expected: str, tag_got: str):
    """Greedy request indices whose tokens differ (requests aborted in `got` are skipped)."""
    bad = []
    for index, (_, params) in enumerate(requests):
        key = f"{tag_got}-{index}"
        if params.greedy and key in got and got[key] != expected[f"{tag_expected}-{index}"]:
            bad.append(index)
    return bad


def check_proposer_lockstep(
    model: str,
    speculative_config: dict[str, Any],
    *,
    engine_args: dict[str, Any] | None = None,
    max_examples: int = 10,
    derandomize: bool = False,
    repro_dir: str | os.PathLike | None = None,
) -> None:
    """Raises KitFailure with a reproducer if speculation changes a greedy request's tokens or
    leaves a KV block in use. `engine_args` override the defaults (float64, block size 4,
    max_model_len 64, STRESS_ARGS)."""
    from engine import EngineArgs, LLMEngine

    args = {"model": str(model), "dtype": "float64", "block_size": 4, "max_model_len": 64}
    args.update(STRESS_ARGS)
    args.update(engine_args or {})
    plain = LLMEngine(EngineArgs(**args))
    spec = LLMEngine(EngineArgs(**args, speculative_config=speculative_config))
    vocab = int(plain.model_config.hf_config.vocab_size)
    counter = iter(range(10**9))

    def body(workload) -> None:
        requests, aborts = workload
        n = next(counter)
        expected = run_workload(plain, requests, [], f"a{n}")
        got = run_workload(spec, requests, aborts, f"b{n}")
        bad = greedy_mismatches(requests, expected, got, f"a{n}", f"b{n}")
        assert not bad, f"greedy requests {bad} changed under speculation"
        assert spec.scheduler.kv_cache_usage == 0.0, "KV blocks left in use"

    strategy = workloads(greedy_only=True, max_token_id=min(900, vocab - 1))
    found = find_failure(body, strategy, max_examples, derandomize)
    if found is None:
        return
    (requests, aborts), cause = found
    raise fail(
        f"proposer {speculative_config!r} changed greedy output",
        found[0],
        cause,
        _script(args, speculative_config, requests, aborts),
        "proposer",
        repro_dir,
    )


def _script(args, spec, requests, aborts) -> str:
    workload = [(prompt, _params_kwargs(params)) for prompt, params in requests]
    return (
        '"""Reproducer written by engine.testing.check_proposer_lockstep: with speculation the\n'
        'greedy tokens of this workload differ from those without."""\n\n'
        "from engine import EngineArgs, LLMEngine, SamplingParams\n"
        "from engine.testing.engines import greedy_mismatches, run_workload\n\n"
        f"args = {args!r}\n"
        f"speculative_config = {spec!r}\n"
        f"requests = [(p, SamplingParams(**kw)) for p, kw in {workload!r}]\n"
        f"aborts = {aborts!r}\n"
        'expected = run_workload(LLMEngine(EngineArgs(**args)), requests, [], "a")\n'
        "engine = LLMEngine(EngineArgs(**args, speculative_config=speculative_config))\n"
        'got = run_workload(engine, requests, aborts, "b")\n'
        'bad = greedy_mismatches(requests, expected, got, "a", "b")\n'
        "for i in bad:\n"
        "    print(f\"request {i}: expected {expected[f'a-{i}']}, got {got[f'b-{i}']}\")\n"
        'assert not bad, f"greedy requests {bad} differ"\n'
        'print("agrees")\n'
    )


def _params_kwargs(params: SamplingParams) -> dict[str, Any]:
    names = ("n", "temperature", "top_p", "seed", "max_tokens", "ignore_eos")
    return {name: getattr(params, name) for name in names}
