"""Structured outputs in the engine: validation, every form's output is valid, and the mask keeps
the sampler's promises (raw logprobs, seeds, batch invariance, speculation, preemption).

The model is the tests' small random-weight Llama (float64, the demo tokenizer): its text is
noise, so any valid output is the grammar's doing.
"""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import RequestStatus
from engine.sampler import Sampler, SamplingRow
from engine.spec_decode.verifier import VerifyItem, grammar_bitmasks, verify
from engine.structured.grammar import GrammarCompiler, bitmask_to_bool
from engine.structured.params import StructuredOutputsParams

SCHEMAS = [
    {  # nested objects, enums, bounded numbers, optional fields
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "color": {"enum": ["red", "green", "blue"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "zip": {"type": "integer"},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "color"],
        "additionalProperties": False,
    },
    {  # arrays
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 1,
        "maxItems": 4,
    },
    {  # anyOf and const
        "anyOf": [{"type": "integer", "minimum": 10, "maximum": 99}, {"const": "none"}],
    },
]
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)!?", r"\(([a-c] ?){1,5}\)"]
GRAMMARS = [
    ('root ::= "(" [a-c]+ ")"', r"\([a-c]+\)"),
    ('root ::= item ("," item)*\nitem ::= "x" | "yy"', r"(x|yy)(,(x|yy))*"),
    ('start: "<" NAME ">"\nNAME: /[a-z]{1,5}/', r"<[a-z]{1,5}>"),
]
PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 3, 99, 12, 13]]


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float64", block_size=4)


def generate(llm, prompts, **kwargs):
    params = SamplingParams(max_tokens=kwargs.pop("max_tokens", 80), **kwargs)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "structured, match",
    [
        ({"json": {"type": "strin"}}, r"structured_outputs\.json: invalid JSON schema"),
        ({"json": '{"type": '}, r"structured_outputs\.json: not valid JSON text"),
        ({"json": {"minimum": "x"}}, r"structured_outputs\.json: invalid JSON schema at minimum"),
        (
            {"json": {"type": "object", "dependentRequired": {"a": ["b"]}}},
            r"structured_outputs\.json: the grammar engine \(llguidance\) cannot compile it: "
            r"Unimplemented keys: \[\"dependentRequired\"\]",
        ),
        ({"regex": "a(b"}, r"structured_outputs\.regex: invalid regex"),
        ({"regex": "(?=a)b"}, r"structured_outputs\.regex: .*cannot compile.*look-around"),
        ({"regex": r"(a)\1"}, r"structured_outputs\.regex: .*cannot compile"),
        ({"grammar": "root ::= foo"}, r"structured_outputs\.grammar: invalid grammar.*foo"),
        ({"choice": []}, r"structured_outputs\.choice must be a non-empty list"),
        ({"choice": "abc"}, r"structured_outputs\.choice must be a non-empty list"),
        ({}, r"give exactly one of json, regex, choice, grammar, json_object \(got none\)"),
        ({"json": {}, "regex": "a"}, r"exactly one of .* \(got json, regex\)"),
        ({"guided_json": {}}, r"structured_outputs: unsupported keys \['guided_json'\]"),
        ({"json_object": "yes"}, r"structured_outputs\.json_object must be a boolean"),
    ],
)
def test_invalid_structured_outputs_name_the_field(structured, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(structured_outputs=structured)


def test_params_are_hashable_and_canonical():
    a = SamplingParams(structured_outputs={"json": {"type": "object", "b": 1}})
    b = SamplingParams(structured_outputs=StructuredOutputsParams(json='{"type": "object", "b":1}'))
    assert a == b and hash(a) == hash(b)
    assert a.structured_outputs.json_schema == {"type": "object", "b": 1}
    assert a.replace(temperature=0).structured_outputs == a.structured_outputs


def test_bad_request_adds_nothing(llm):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="structured_outputs"):
        engine.add_request("bad", [1, 2], SamplingParams(structured_outputs={"regex": "a("}))
    assert not engine.has_unfinished_requests()


# ---- every form's output is valid ------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_outputs_validate(llm, schema, temperature):
    outs = generate(
        llm,
        PROMPTS,
        temperature=temperature,
        seed=7,
        max_tokens=200,
        structured_outputs={"json": schema, "disable_any_whitespace": True},
    )
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_output_is_an_object(llm):
    for out in generate(
        llm,
        PROMPTS,
        temperature=1.0,
        seed=3,
        max_tokens=200,
        structured_outputs={"json_object": True, "disable_any_whitespace": True},
    ):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:  # a random model may never close the object; what it wrote is a valid prefix
            assert out.text.startswith("{")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_match(llm, pattern, temperature):
    for out in generate(
        llm, PROMPTS, temperature=temperature, seed=11, structured_outputs={"regex": pattern}
    ):
        assert re.fullmatch(pattern, out.text), out.text
        assert out.finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_outputs_are_choices(llm, temperature):
    choices = ["red", "green", "blue jeans", "yellow!"]
    seen = set()
    for seed in range(6):
        for out in generate(
            llm, PROMPTS, temperature=temperature, seed=seed, structured_outputs={"choice": choices}
        ):
            assert out.text in choices and out.finish_reason == "stop"
            seen.add(out.text)
    if temperature:
        assert len(seen) > 1  # sampling still samples among the choices


@pytest.mark.parametrize("grammar, equivalent", GRAMMARS)
def test_grammar_outputs_parse(llm, grammar, equivalent):
    for out in generate(
        llm, PROMPTS, temperature=1.0, seed=5, structured_outputs={"grammar": grammar}
    ):
        if out.finish_reason == "stop":
            assert re.fullmatch(equivalent, out.text), out.text


def test_properties_come_in_schema_order_and_digits_are_ascii(llm, tokenizer):
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    for out in generate(
        llm,
        PROMPTS,
        temperature=1.0,
        seed=2,
        structured_outputs={"json": schema, "disable_any_whitespace": True},
    ):
        assert list(json.loads(out.text)) == ["zeta", "alpha"]
    matcher = llm.llm_engine.structured.compiler.matcher(StructuredOutputsParams(regex=r"\d+"))
    arabic_three = tokenizer.encode("\u0663")
    assert matcher.accept(arabic_three) < len(arabic_three)  # a Unicode digit is not \d
    assert matcher.accept(tokenizer.encode("3")) == 1


def test_grammar_end_finishes_the_request_even_with_ignore_eos(llm):
    outs = generate(
        llm,
        PROMPTS,
        temperature=0.0,
        ignore_eos=True,
        structured_outputs={"choice": ["alpha", "beta"]},
    )
    for out in outs:
        assert out.text in ("alpha", "beta") and out.finish_reason == "stop"


# ---- the sampler's promises --------------------------------------------------------------------


def test_logprobs_stay_raw_and_mask_sits_after_processors(llama_path):
    """A constrained token's logprob is the raw model's; logit_bias acts before the mask."""
    vocab = 32
    logits = torch.randn(2, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    allowed = [3, 9, 17]
    mask = torch.zeros(1, 1, dtype=torch.int32)
    for t in allowed:
        mask[0, 0] |= 1 << t
    params = SamplingParams(temperature=0, logprobs=2, logit_bias={9: 100.0})
    rows = [SamplingRow(params, 0, 0, grammar_bitmask=mask[0]), SamplingRow(params, 0, 0)]
    out = Sampler()(logits, rows)
    raw = logits.log_softmax(-1)
    assert out[0].token_id == 9  # the bias (a processor) acted, then the mask kept 9
    assert out[1].token_id == 9
    assert math.isclose(out[0].logprob, raw[0, 9].item(), rel_tol=1e-12)
    top = sorted(out[0].top_logprobs.items(), key=lambda kv: -kv[1].logprob)
    assert top[0][1].logprob == pytest.approx(raw[0].max().item())  # raw top-1, maybe masked
    # Greedy picks the best allowed token; unconstrained, the best overall.
    plain = SamplingParams(temperature=0)
    out = Sampler()(logits, [SamplingRow(plain, 0, 0, grammar_bitmask=mask[0])])
    assert out[0].token_id == max(allowed, key=lambda t: logits[0, t].item())


def test_empty_processed_row_falls_back_to_the_grammar():
    """min_tokens bans eos but the grammar allows only eos: the grammar wins."""
    logits = torch.zeros(1, 32, dtype=torch.float64)
    mask = torch.tensor([1 << 2], dtype=torch.int32)  # only token 2
    params = SamplingParams(temperature=1.0, min_tokens=5, seed=1)
    out = Sampler()(logits, [SamplingRow(params, 1, 0, eos_token_ids=(2,), grammar_bitmask=mask)])
    assert out[0].token_id == 2


def test_seeded_constrained_request_is_batch_invariant(llm):
    target = SamplingParams(
        temperature=1.0,
        seed=99,
        max_tokens=60,
        structured_outputs={"json": SCHEMAS[0], "disable_any_whitespace": True},
    )
    alone = llm.generate([PROMPTS[0]], target, use_tqdm=False)[0].outputs[0].token_ids
    others = [
        SamplingParams(temperature=1.0, max_tokens=9),
        SamplingParams(
            temperature=0.5, seed=3, max_tokens=30, structured_outputs={"regex": "[a-z]+"}
        ),
        SamplingParams(temperature=0, max_tokens=5),
    ]
    outs = llm.generate(
        [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]],
        [others[0], others[1], target, others[2]],
        use_tqdm=False,
    )
    assert outs[2].outputs[0].token_ids == alone


def test_preemption_keeps_constrained_outputs(llama_path):
    prompts = [[i + 3, i + 4, i + 5, i + 6] for i in range(10)]
    params = [
        SamplingParams(
            temperature=0.9 if i % 2 else 0,
            seed=i,
            max_tokens=30,
            ignore_eos=True,
            structured_outputs={"regex": "([a-z]+ ){1,40}"},
        )
        for i in range(len(prompts))
    ]
    roomy = LLM(str(llama_path), dtype="float64", block_size=4)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(
        str(llama_path), dtype="float64", block_size=4, max_model_len=64, num_gpu_blocks_override=24
    )
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.llm_engine.scheduler.num_preemptions > 0


def test_n_samples_each_get_a_matcher_and_matchers_are_released(llm):
    engine = llm.llm_engine
    params = SamplingParams(
        n=3, temperature=1.0, seed=4, max_tokens=20, structured_outputs={"regex": "[0-9]{2,6}"}
    )
    engine.add_request("g", PROMPTS[0], params)
    requests = list(engine._groups["g"].requests)
    assert len({id(r.grammar) for r in requests}) == 3
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert all(re.fullmatch("[0-9]{2,6}", c.text) for c in outputs[-1].outputs)
    assert all(r.grammar is None for r in requests)


def test_abort_releases_the_matcher(llm):
    engine = llm.llm_engine
    engine.add_request(
        "a", PROMPTS[0], SamplingParams(max_tokens=50, structured_outputs={"regex": "[a-z ]+"})
    )
    request = engine._groups["a"].requests[0]
    engine.step()
    assert request.grammar is not None and request.grammar.num_processed == 1
    engine.abort_request("a")
    assert request.grammar is None and request.status is RequestStatus.FINISHED_ABORTED


def test_compiled_grammars_are_cached_and_bounded(tokenizer):
    compiler = GrammarCompiler(tokenizer, 1024, [tokenizer.eos_token_id], cache_size=2)
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+"))
    first, second = compiler.matcher(a), compiler.matcher(a)
    assert compiler.num_compiles == 1 and first is not second
    first.accept(tokenizer.encode("aa"))
    assert second.num_processed == 0  # copies do not share state
    compiler.matcher(b)
    compiler.matcher(c)
    assert compiler.num_compiles == 3 and len(compiler._cache) == 2
    compiler.matcher(a)  # evicted: compiled again
    assert compiler.num_compiles == 4


# ---- speculative decoding ----------------------------------------------------------------------


def test_forbidden_draft_is_rejected_and_matcher_rolled_back(llm, tokenizer):
    engine = llm.llm_engine
    compiler = engine.structured.compiler
    matcher = compiler.matcher(StructuredOutputsParams(regex="[0-9]+"))
    digit = tokenizer.encode("7")[0]
    letter = tokenizer.encode("x")[0]
    engine.add_request("v", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5))
    request = engine._groups["v"].requests[0]
    request.grammar = matcher
    vocab = engine.model_config.vocab_size
    logits = torch.full((3, vocab), -5.0, dtype=torch.float64)
    logits[:, letter] = 10.0  # the model wants the letter everywhere
    logits[:, digit] = 5.0
    masks = grammar_bitmasks(VerifyItem(request, (digit, letter), None))
    assert matcher.num_processed == 0  # rolled back
    allowed = bitmask_to_bool(torch.stack(masks), vocab)
    assert allowed[0, digit] and not allowed[0, letter] and allowed[1, digit]
    emitted = verify(logits, [VerifyItem(request, (digit, letter), None)])[0]
    # d1 (a digit) is accepted, d2 (a letter) is forbidden: rejected, replaced by a digit
    assert [s.token_id for s in emitted] == [digit, digit]
    assert matcher.num_processed == 0
    engine.abort_request("v")


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_with_grammar_keeps_greedy_output(llama_path, method, tmp_path_factory):
    from engine.demo import make_layer_truncated_checkpoint

    spec = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 1,
        "prompt_lookup_max": 2,
    }
    if method == "draft_model":
        draft = make_layer_truncated_checkpoint(llama_path, tmp_path_factory.mktemp("d"), 1)
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [20, 21, 20, 21, 20]]
    structured = [{"regex": "(ab|cd|[0-9])+"}, {"json": SCHEMAS[1]}]
    params = [
        SamplingParams(
            temperature=0, max_tokens=40, ignore_eos=True, logprobs=1, structured_outputs=s
        )
        for s in structured
    ]
    plain = LLM(str(llama_path), dtype="float64", block_size=4)
    expected = plain.generate(prompts, params, use_tqdm=False)
    spec_llm = LLM(str(llama_path), dtype="float64", block_size=4, speculative_config=spec)
    got = spec_llm.generate(prompts, params, use_tqdm=False)
    for e, g in zip(expected, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].finish_reason == e.outputs[0].finish_reason
    stats = spec_llm.llm_engine.speculator.stats.snapshot()
    assert stats.num_draft_tokens > 0
    sampled = SamplingParams(
        temperature=1.0, seed=5, max_tokens=40, structured_outputs={"regex": "(ab|cd|[0-9])+"}
    )
    for out in spec_llm.generate(prompts, sampled, use_tqdm=False):
        assert re.fullmatch("(ab|cd|[0-9])+", out.outputs[0].text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bitmask_applies_on_cuda_as_on_cpu():
    logits = torch.randn(3, 1000, dtype=torch.float32)
    masks = torch.randint(-(2**31), 2**31 - 1, (3, 32), dtype=torch.int32)
    params = SamplingParams(temperature=0)
    rows = [SamplingRow(params, 0, 0, grammar_bitmask=masks[i]) for i in range(3)]
    from engine.sampler import process_logits

    on_cpu = process_logits(logits, rows)
    on_cuda = process_logits(logits.cuda(), rows)
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), on_cpu)
