"""Custom logits processors (engine/logits_process.py) through the engine, with the plug-ins of
tests/logits_plugins.py loaded by name: the ban they do equals logit_bias's, the batch they are
told about is the sampler's, finished and aborted requests leave it, verification rows see the
drafts, argmax-invariant ones reach only sampled rows, and the pipeline stays batch invariant."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from engine import LLM, EngineArgs, SamplingParams
from engine.engine import LLMEngine
from engine.logits_process import LogitsProcessors, resolve_processor_class
from engine.request import Request
from engine.sampler import (
    SamplingRow,
    argmax_invariant_hook,
    process_logits,
    truncated_logits,
)
from engine.spec_decode.verifier import VerifyItem, verify, verify_rows
from engine.structured.manager import StructuredSampler
from engine.testing import check_batch_invariance
from tests import logits_plugins
from tests.test_plugins import run_generate

BAN = "tests.logits_plugins:BanToken"
PROMPTS = [[5, 6, 7, 8, 9] * 3, [20, 21, 22, 20, 21, 22, 20, 21], [30, 31, 32, 33], [40, 41]]


def make_llm(llama_path, processors=(BAN,), **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", 16 * 2**20)
    return LLM(
        str(llama_path), dtype="float64", block_size=4, logits_processors=list(processors), **kwargs
    )


def token_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def plain(llama_path) -> LLM:
    return LLM(str(llama_path), dtype="float64", block_size=4, kv_cache_memory_bytes=16 * 2**20)


def ban_cases(plain: LLM) -> tuple[list[int], list[SamplingParams], list[SamplingParams]]:
    """Per prompt, the token its greedy output starts with: (bans, params with the ban through
    extra_args, the same through logit_bias), mixing greedy, seeded and unbanned requests."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    bans = [out[0] for out in token_ids(plain, PROMPTS, greedy)]
    by_args, by_bias = [], []
    for i, ban in enumerate(bans):
        base = (
            greedy
            if i % 2 == 0
            else SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=12, ignore_eos=True)
        )
        if i == 3:  # one request in the batch without a ban
            by_args.append(base.replace(extra_args={"tag": i}))
            by_bias.append(base)
        else:
            by_args.append(base.replace(extra_args={"ban": ban, "tag": i}))
            by_bias.append(base.replace(logit_bias={ban: -100.0}))
    return bans, by_args, by_bias


def test_ban_by_processor_equals_ban_by_logit_bias(llama_path, plain):
    bans, by_args, by_bias = ban_cases(plain)
    expected = token_ids(plain, PROMPTS, by_bias)
    llm = make_llm(llama_path)
    got = token_ids(llm, PROMPTS, by_args)
    assert got == expected
    for i, (out, ban) in enumerate(zip(got, bans, strict=True)):
        if i != 3:  # banned at every position
            assert ban not in out, (i, out, ban)
    processor = llm.llm_engine.runner.logits_processors.processors[0]
    assert isinstance(processor, logits_plugins.BanToken)
    assert processor.applied and all(len(rows) <= len(PROMPTS) for rows in processor.applied)


def test_cli_loads_the_processor_by_name(llama_path, plain):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = "hello world"
    first = plain.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    want = (
        plain.generate([prompt], greedy.replace(logit_bias={first[0]: -100.0}), use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    result = run_generate(
        "--model", str(llama_path), "--prompt", prompt, "--max-tokens", "6", "--dtype", "float64",
        "--block-size", "4", "--logits-processors", BAN,
        "--extra-args", json.dumps({"ban": first[0]}), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)["token_ids"]
    assert got == want and got[0] != first[0]
    bad = run_generate("--model", str(llama_path), "--logits-processors", "tests.nope:X")
    assert bad.returncode == 2 and "logits_processors" in bad.stderr


def test_bad_references_and_extra_args_are_value_errors(llama_path):
    with pytest.raises(ValueError, match="logits_processors"):
        EngineArgs(model="x", logits_processors=["tests.logits_plugins:NotAProcessor"])
    with pytest.raises(ValueError, match="logits_processors"):
        EngineArgs(model="x", logits_processors="tests.logits_plugins:BanToken")
    with pytest.raises(ValueError, match="logits_processors"):
        EngineArgs(model="x", logits_processors=["no_colon_here"])
    args = EngineArgs(model="x", logits_processors=[logits_plugins.BanToken])
    assert args.logits_processors == (logits_plugins.BanToken,)
    dotted = "tests.logits_plugins.BanToken"  # vLLM's fully qualified form
    assert resolve_processor_class(dotted) is logits_plugins.BanToken
    engine = LLMEngine(EngineArgs(model=str(llama_path), logits_processors=[BAN]))
    with pytest.raises(ValueError, match=r"extra_args\.ban"):
        engine.add_request("r", [1, 2, 3], SamplingParams(extra_args={"ban": "x"}))
    assert not engine.has_unfinished_requests()


class SpySampler(StructuredSampler):
    """The engine's sampler, recording each call's row request ids."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str | None]] = []

    def __call__(self, logits, rows):
        self.rows.append([row.request_id for row in rows])
        return super().__call__(logits, rows)


def test_rows_follow_the_sampler_and_ended_requests_leave(llama_path):
    """The processor's batch at every apply is the sampler's row list (tags = request ids), in
    order, across finishes, an abort and preemption (a tight pool); a request that has ended
    never appears again."""
    engine = make_llm(
        llama_path, max_model_len=64, num_gpu_blocks_override=14, kv_cache_memory_bytes=None
    ).llm_engine
    processor = engine.runner.logits_processors.processors[0]
    spy = SpySampler()
    engine.runner.sampler = spy
    rng = random.Random(0)
    ended_at: dict[str, int] = {}
    next_id = 0
    for step in range(300):
        if step < 20 and step % 2 == 0:
            rid = f"r{next_id}"
            next_id += 1
            prompt = [rng.randrange(3, 500) for _ in range(rng.randint(4, 20))]
            params = SamplingParams(
                temperature=0,
                max_tokens=rng.randint(3, 25),
                ignore_eos=True,
                extra_args={"tag": rid},
            )
            engine.add_request(rid, prompt, params)
        if step == 9:
            engine.abort_request("r1")
            ended_at["r1"] = len(processor.applied)
        for out in engine.step():
            if out.finished:
                ended_at.setdefault(out.request_id, len(processor.applied))
        if not engine.has_unfinished_requests() and step >= 20:
            break
    assert engine.scheduler.num_preemptions > 0
    assert processor.applied == spy.rows
    for rid, after in ended_at.items():
        assert all(rid not in rows for rows in processor.applied[after:]), rid
    assert len(ended_at) == next_id


def test_verification_rows_see_the_drafts(llama_path):
    """NoRepeat reads each row's output: greedy output with n-gram drafts (which propose
    repeats) equals the output without speculation, and never repeats a token at once."""
    params = SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, extra_args={"no_repeat": True}
    )
    want = token_ids(make_llm(llama_path, ["tests.logits_plugins:NoRepeat"]), PROMPTS, params)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = make_llm(llama_path, ["tests.logits_plugins:NoRepeat"], speculative_config=spec)
    assert token_ids(llm, PROMPTS, params) == want
    assert llm.llm_engine.get_stats().spec_decode.num_draft_tokens > 0
    for out in want:
        assert all(a != b for a, b in itertools.pairwise(out)), out


def test_argmax_invariant_processor_reaches_only_sampled_rows(llama_path, plain):
    """KeepTopK with keep=1 turns temperature-1 sampling into greedy decoding; a batch of
    greedy requests never calls it (vLLM skips argmax-invariant processors for greedy rows)."""
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = token_ids(plain, PROMPTS, greedy)
    llm = make_llm(llama_path, ["tests.logits_plugins:KeepTopK"])
    processor = llm.llm_engine.runner.logits_processors.processors[0]
    assert token_ids(llm, PROMPTS, greedy.replace(extra_args={"keep": 1})) == want
    assert processor.calls == 0
    sampled = [
        SamplingParams(
            temperature=1.0, seed=i, max_tokens=10, ignore_eos=True, extra_args={"keep": 1}
        )
        for i in range(len(PROMPTS))
    ]
    assert token_ids(llm, PROMPTS, sampled) == want
    assert processor.calls > 0
    unconstrained = [p.replace(extra_args=None) for p in sampled]
    assert token_ids(llm, PROMPTS, unconstrained) != want  # it is the processor that decides


def _pipeline(logits: torch.Tensor, rows) -> torch.Tensor:
    """Steps 2-9 with BanToken and KeepTopK built fresh for the batch (each row's arguments
    derived from its prompt), as the sampler runs them."""
    rows = [
        SamplingRow(
            params=r.params.replace(
                extra_args={"ban": r.prompt_token_ids[0], "keep": 1 + len(r.prompt_token_ids) % 4}
            ),
            sampling_seed=r.sampling_seed,
            output_position=r.output_position,
            prompt_token_ids=r.prompt_token_ids,
            output_token_ids=r.output_token_ids,
            eos_token_ids=r.eos_token_ids,
            request_id=f"q{i}",
        )
        for i, r in enumerate(rows)
    ]
    processors = LogitsProcessors(
        [
            cls(_Config(), logits.device, False)
            for cls in (logits_plugins.BanToken, logits_plugins.KeepTopK)
        ]
    )
    step = processors.begin_step(rows)
    processed = process_logits(logits, rows, step)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        hook = argmax_invariant_hook(step, 0, sampled)
        sub = truncated_logits(processed[sampled], [rows[i] for i in sampled], after_min_p=hook)
        processed = processed.index_copy(0, torch.tensor(sampled), sub)
    return processed


class _Config:
    model_config = object()
    scheduler_config = None
    engine_args = None


def test_processor_pipeline_is_batch_invariant():
    check_batch_invariance(_pipeline, max_examples=60, derandomize=True)


def test_verify_hands_processors_the_drafts_as_outputs():
    """Row j of a verification sees d_1..d_j as generated (NoRepeat bans d_j there): each row's
    top logit is a repeat, so with the drafts seen the drafts are accepted and the bonus token
    is the second best; without them (or without the processor) the first draft is rejected."""
    params = SamplingParams(temperature=0, extra_args={"no_repeat": True, "tag": "a"})
    request = Request("a", [1, 2], params, (), 64, sampling_seed=0, output_token_ids=[3])
    item = VerifyItem(request, (4, 5), None)
    logits = torch.full((3, 8), -5.0, dtype=torch.float64)
    for row, (top, second) in enumerate([(3, 4), (4, 5), (5, 6)]):
        logits[row, top], logits[row, second] = 2.0, 1.0  # top: the row's last output token
    processors = LogitsProcessors([logits_plugins.NoRepeat(_Config(), logits.device, False)])
    rows = verify_rows(item)
    step = processors.begin_step(rows)
    emitted = verify(logits, [item], step, 0, rows)
    assert [t.token_id for t in emitted[0]] == [4, 5, 6]
    assert [t.token_id for t in verify(logits, [item])[0]] == [3]
