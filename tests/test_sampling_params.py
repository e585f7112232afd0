"""SamplingParams: every bad value is a ValueError naming the field; inputs are normalised to
hashable values; the checks that need the model run in add_request and leave the engine as it was.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import ExtraArgs, LogitBias, tokenize_bad_words


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101}}, "logit_bias"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [3, -4]}, "allowed_token_ids"),
        ({"bad_words": "word"}, "bad_words"),
        ({"bad_words": ["ok", ""]}, "bad_words"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_range_edges_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=0.0)
    SamplingParams(top_p=1e-9, top_k=1, min_p=1.0, n=3)
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3)
    SamplingParams(logit_bias={1: -100, 2: 100}, min_tokens=5, max_tokens=5)
    SamplingParams(min_tokens=1000, max_tokens=None, logprobs=0, prompt_logprobs=0)


def test_normalisation_makes_params_hashable():
    params = SamplingParams(
        stop="###",
        stop_token_ids=[3, 4],
        logit_bias={"7": 1.5, 9: -2},
        allowed_token_ids=[1, 2, 3],
        bad_words=["foo", "bar baz"],
    )
    assert params.stop == ("###",)
    assert params.stop_token_ids == (3, 4)
    assert isinstance(params.logit_bias, LogitBias)
    assert dict(params.logit_bias) == {7: 1.5, 9: -2.0}
    assert params.allowed_token_ids == (1, 2, 3)
    assert params.bad_words == ("foo", "bar baz")
    same = SamplingParams(
        stop=["###"],
        stop_token_ids=(3, 4),
        logit_bias={7: 1.5, "9": -2.0},
        allowed_token_ids=(1, 2, 3),
        bad_words=("foo", "bar baz"),
    )
    assert params == same and hash(params) == hash(same)
    assert SamplingParams(stop=None).stop == ()
    # replace() re-validates and keeps normalised values
    assert params.replace(temperature=0.5).logit_bias == params.logit_bias
    with pytest.raises(ValueError, match="top_p"):
        params.replace(top_p=2.0)


def test_greedy_threshold():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logit_bias": {5000: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [1, 5000]}, "allowed_token_ids"),
        ({"stop_token_ids": [5000]}, "stop_token_ids"),
    ],
)
def test_model_checks(kwargs, field):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=field):
        params.validate_for_model(vocab_size=1024, max_logprobs=20)
    params.validate_for_model(vocab_size=10_000, max_logprobs=100)  # fine for a bigger model


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), max_model_len=64, kv_cache_memory_bytes=4 * 2**20, max_logprobs=5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"prompt_logprobs": 6}, "prompt_logprobs"),
        ({"logit_bias": {"1024": 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [1024]}, "allowed_token_ids"),
    ],
)
def test_engine_rejects_and_keeps_serving(llm, kwargs, field):
    engine = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=3)
    with pytest.raises(ValueError, match=field):
        llm.generate(["hello", "world"], [good, SamplingParams(**kwargs)], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
    out = llm.generate("hello", good, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_words_are_tokenized_with_and_without_a_leading_space(tokenizer):
    sequences = tokenize_bad_words(["hello", " world"], tokenizer)
    assert tuple(tokenizer.encode("hello", add_special_tokens=False)) in sequences
    assert tuple(tokenizer.encode(" hello", add_special_tokens=False)) in sequences
    assert tuple(tokenizer.encode("world", add_special_tokens=False)) in sequences
    assert tuple(tokenizer.encode(" world", add_special_tokens=False)) in sequences
    assert len(set(sequences)) == len(sequences)
    assert tokenize_bad_words(None, tokenizer) == ()


def test_extra_args_are_a_read_only_hashable_json_copy():
    source = {"ban": 3, "nested": {"ids": [1, 2], "on": True, "w": 0.5, "none": None}}
    params = SamplingParams(extra_args=source)
    assert isinstance(params.extra_args, ExtraArgs)
    assert params.extra_args == source and params.extra_args.get("ban") == 3
    source["nested"]["ids"].append(9)  # the caller's dict is copied, not shared
    assert params.extra_args["nested"]["ids"] == [1, 2]
    same = SamplingParams(
        extra_args={"nested": {"none": None, "w": 0.5, "on": True, "ids": [1, 2]}, "ban": 3}
    )
    assert params == same and hash(params) == hash(same)
    assert params != SamplingParams(extra_args={"ban": 4})
    copy = params.extra_args.to_dict()
    copy["ban"] = 5
    assert params.extra_args["ban"] == 3
    assert SamplingParams().extra_args is None
    with pytest.raises(TypeError):
        params.extra_args["ban"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 2], "extra_args must be a dict"),
        ("ban", "extra_args must be a dict"),
        ({1: 2}, "extra_args: keys must be strings"),
        ({"a": float("nan")}, r"extra_args\.a must be a finite number"),
        ({"a": [1, {"b": {1, 2}}]}, r"extra_args\.a\[1\]\.b must be a JSON value"),
        ({"a": {"b": object()}}, r"extra_args\.a\.b must be a JSON value"),
    ],
)
def test_bad_extra_args_name_the_field(value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(extra_args=value)
