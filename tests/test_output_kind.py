"""RequestOutputKind: DELTA outputs joined per sample equal the CUMULATIVE outputs at every step,
and FINAL_ONLY yields one output equal to the last CUMULATIVE one (n > 1, logprobs, prompt
logprobs, stop strings, speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.request import RequestOutput
from engine.sampling_params import RequestOutputKind

PROMPTS = [[5, 6, 7, 8, 9] * 3 + [5, 6], [20, 21, 22, 20, 21, 22, 20, 21], [30, 31, 32, 33, 34]]


def _params(kind: RequestOutputKind) -> list[SamplingParams]:
    common = dict(output_kind=kind, max_tokens=24)
    return [
        SamplingParams(n=3, temperature=0.9, seed=7, logprobs=2, stop=["e", "a"], **common),
        SamplingParams(temperature=0, logprobs=0, prompt_logprobs=1, ignore_eos=True, **common),
        SamplingParams(
            n=2,
            temperature=1.0,
            top_k=30,
            seed=3,
            stop=["o", "t"],
            include_stop_str_in_output=True,
            repetition_penalty=1.2,
            **common,
        ),
    ]


def _engine(llama_path, speculative: str | None) -> LLMEngine:
    spec = None
    if speculative == "ngram":
        spec = {
            "method": "ngram",
            "num_speculative_tokens": 3,
            "prompt_lookup_min": 1,
            "prompt_lookup_max": 2,
        }
    elif speculative == "draft_model":  # the target as its own draft: drafts get accepted
        spec = {"method": "draft_model", "model": str(llama_path), "num_speculative_tokens": 3}
    return LLMEngine(
        EngineArgs(
            model=str(llama_path),
            dtype="float64",
            block_size=4,
            seed=5,
            speculative_config=spec,
        )
    )


@dataclass
class _Joined:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _logprob_values(entries):
    if entries is None:
        return None
    return [{t: (lp.logprob, lp.rank, lp.decoded_token) for t, lp in e.items()} for e in entries]


@pytest.mark.parametrize("speculative", [None, "ngram", "draft_model"])
def test_delta_outputs_join_to_cumulative_outputs_at_every_step(llama_path, speculative):
    cumulative = _engine(llama_path, speculative)
    delta = _engine(llama_path, speculative)
    for i, prompt in enumerate(PROMPTS):
        cumulative.add_request(str(i), prompt, _params(RequestOutputKind.CUMULATIVE)[i])
        delta.add_request(str(i), prompt, _params(RequestOutputKind.DELTA)[i])
    joined: dict[tuple[str, int], _Joined] = {}
    prompt_logprobs: dict[str, list] = {}
    num_delta_outputs = 0
    saw_partial = False
    most_tokens_in_a_delta = 0
    while cumulative.has_unfinished_requests():
        want = {o.request_id: o for o in cumulative.step()}
        got = {o.request_id: o for o in delta.step()}
        assert want.keys() == got.keys()
        for request_id, out in got.items():
            num_delta_outputs += 1
            assert out.prompt_token_ids == want[request_id].prompt_token_ids
            assert out.finished == want[request_id].finished
            if out.prompt_logprobs is not None:
                assert request_id not in prompt_logprobs  # sent once
                prompt_logprobs[request_id] = out.prompt_logprobs
            # A delta lists only samples that advanced, in index order.
            indices = [c.index for c in out.outputs]
            assert indices == sorted(set(indices))
            saw_partial |= len(out.outputs) < len(want[request_id].outputs)
            for c in out.outputs:
                j = joined.setdefault((request_id, c.index), _Joined())
                j.text += c.text
                j.token_ids += c.token_ids
                most_tokens_in_a_delta = max(most_tokens_in_a_delta, len(c.token_ids))
                if c.logprobs is not None:
                    j.logprobs = (j.logprobs or []) + c.logprobs
                j.cumulative_logprob = c.cumulative_logprob
                j.finish_reason, j.stop_reason = c.finish_reason, c.stop_reason
        for request_id, out in want.items():
            for c in out.outputs:
                j = joined[(request_id, c.index)]
                assert j.text == c.text
                assert j.token_ids == c.token_ids
                assert _logprob_values(j.logprobs) == _logprob_values(c.logprobs)
                assert j.cumulative_logprob == c.cumulative_logprob
                assert (j.finish_reason, j.stop_reason) == (c.finish_reason, c.stop_reason)
            if out.prompt_logprobs is not None:
                assert _logprob_values(prompt_logprobs[request_id][1:]) == _logprob_values(
                    out.prompt_logprobs[1:]
                )
    assert not delta.has_unfinished_requests()
    assert delta.scheduler.kv_cache_usage == 0.0
    assert num_delta_outputs > 3 * len(PROMPTS)  # streamed over many steps
    assert saw_partial  # some step advanced only some of a request's samples
    if speculative == "draft_model":
        assert most_tokens_in_a_delta > 1  # accepted drafts: several tokens in one delta
    stops = [joined[("0", i)].finish_reason for i in range(3)]
    assert "stop" in stops + [joined[("2", i)].finish_reason for i in range(2)]


def test_final_only_gives_one_output_equal_to_the_last_cumulative_one(llama_path):
    cumulative = _engine(llama_path, None)
    final = _engine(llama_path, None)
    for i, prompt in enumerate(PROMPTS):
        cumulative.add_request(str(i), prompt, _params(RequestOutputKind.CUMULATIVE)[i])
        final.add_request(str(i), prompt, _params(RequestOutputKind.FINAL_ONLY)[i])
    last: dict[str, RequestOutput] = {}
    got: dict[str, list[RequestOutput]] = {}
    while cumulative.has_unfinished_requests():
        for out in cumulative.step():
            last[out.request_id] = out
        for out in final.step():
            got.setdefault(out.request_id, []).append(out)
    assert not final.has_unfinished_requests()
    assert got.keys() == last.keys()
    for request_id, outs in got.items():
        assert len(outs) == 1 and outs[0].finished
        want = last[request_id]
        for a, b in zip(outs[0].outputs, want.outputs, strict=True):
            assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == (
                b.index,
                b.text,
                b.token_ids,
                b.finish_reason,
                b.stop_reason,
            )
            assert _logprob_values(a.logprobs) == _logprob_values(b.logprobs)


def test_output_kind_is_validated_and_accepts_names():
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE
    assert SamplingParams(output_kind="delta").output_kind is RequestOutputKind.DELTA
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY
    for bad in ("streaming", 3, True, None):
        with pytest.raises(ValueError, match="output_kind"):
            SamplingParams(output_kind=bad)
