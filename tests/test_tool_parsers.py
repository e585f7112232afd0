"""Tool-call parsers: non-streaming extraction, and streamed deltas that reassemble to it however
the text is cut (hypothesis draws the calls, the content around them and the cut points)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tool_parsers import (
    ExtractedToolCalls,
    ToolCall,
    get_tool_parser,
    reassemble,
)


def ids(i: int) -> str:
    return f"call-{i}"


def stream(parser, text: str, cuts: list[int]) -> list[dict]:
    s = parser.streaming()
    deltas = []
    last = 0
    for cut in [*sorted({c % (len(text) + 1) for c in cuts}), len(text)]:
        deltas += s.feed(text[last:cut])
        last = cut
    return deltas + s.finish()


# ---- hermes ------------------------------------------------------------------------------------


def test_hermes_extracts_calls_and_content():
    parser = get_tool_parser("hermes")(ids)
    text = (
        "Let me check.<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
        '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    )
    assert parser.extract(text) == ExtractedToolCalls(
        "Let me check.",
        [
            ToolCall("get_weather", '{"city": "Paris", "days": [1, 2]}', "call-0"),
            ToolCall("now", "{}", "call-1"),
        ],
    )
    calls = parser.extract(text).tool_calls
    assert json.loads(calls[0].arguments) == {"city": "Paris", "days": [1, 2]}
    assert calls[0].to_openai() == {
        "id": "call-0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2]}'},
    }


@pytest.mark.parametrize(
    "text",
    [
        "no tools here",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>["name", "x"]</tool_call>',
    ],
)
def test_hermes_without_well_formed_calls_is_content(text):
    assert get_tool_parser("hermes")(ids).extract(text) == ExtractedToolCalls(text, [])


def test_hermes_unclosed_last_call_and_missing_arguments():
    parser = get_tool_parser("hermes")(ids)
    got = parser.extract('<tool_call>{"name": "ping"}')
    assert got == ExtractedToolCalls(None, [ToolCall("ping", "{}", "call-0")])
    assert reassemble(stream(parser, '<tool_call>{"name": "ping"}', [5, 17])) == got


def test_hermes_streams_header_first_then_argument_fragments():
    parser = get_tool_parser("hermes")(ids)
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": "xyz"}}</tool_call>'
    deltas = stream(parser, text, list(range(len(text))))
    assert deltas[0] == {"content": "H"}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "call-0",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert len(calls) > 5  # the arguments came in many fragments
    assert "".join(c["function"]["arguments"] for c in calls) == '{"a": "xyz"}'
    assert all("<" not in d.get("content", "") for d in deltas)  # the tag never leaks


# ---- llama3_json -------------------------------------------------------------------------------


def test_llama3_json_extracts_calls():
    parser = get_tool_parser("llama3_json")(ids)
    text = (
        '<|python_tag|>{"name": "a", "parameters": {"q": "x;y"}}; {"name": "b", "parameters": {}}'
    )
    assert parser.extract(text) == ExtractedToolCalls(
        None, [ToolCall("a", '{"q": "x;y"}', "call-0"), ToolCall("b", "{}", "call-1")]
    )
    plain = ' {"name": "c", "arguments": {"n": 1}}'
    assert parser.extract(plain).tool_calls == [ToolCall("c", '{"n": 1}', "call-0")]


@pytest.mark.parametrize(
    "text", ["The answer is 4.", '{"name": 3}', '{"name": "a", "parameters": {}} trailing']
)
def test_llama3_json_content(text):
    assert get_tool_parser("llama3_json")(ids).extract(text) == ExtractedToolCalls(text, [])


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match=r"tool_call_parser: unknown parser 'x'.*hermes.*llama3"):
        get_tool_parser("x")


# ---- property: streamed deltas reassemble to the non-streaming result --------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
NAMES = st.text(alphabet="abcdefgh_", min_size=1, max_size=10)
SPACES = st.sampled_from(["", " ", "\n", "  "])


@st.composite
def calls(draw, args_key: str) -> tuple[str, list[tuple[str, str]]]:
    """(text of one call object, [(name, arguments text)])."""
    name = draw(NAMES)
    args = draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3))
    indent = draw(st.sampled_from([None, 2]))
    args_text = json.dumps(args, indent=indent, ensure_ascii=draw(st.booleans()))
    s = draw(SPACES)
    if draw(st.booleans()):
        body = f'{{{s}"name":{s}{json.dumps(name)},{s}"{args_key}":{s}{args_text}{s}}}'
    else:
        body = f'{{"{args_key}": {args_text},{s}"name": {json.dumps(name)}}}'
    return body, [(name, args_text)]


@st.composite
def hermes_outputs(draw):
    content = draw(
        st.text(alphabet="ab <>_/tool", max_size=12).filter(lambda t: "<tool_call>" not in t)
    )
    parts = draw(st.lists(calls("arguments"), min_size=0, max_size=3))
    text = content
    for body, _ in parts:
        text += f"<tool_call>{draw(SPACES)}{body}{draw(SPACES)}</tool_call>{draw(SPACES)}"
    expected = [c for _, cs in parts for c in cs]
    return text, expected, content


@settings(max_examples=150, deadline=None)
@given(output=hermes_outputs(), cuts=st.lists(st.integers(0, 10**4), max_size=12))
def test_hermes_streaming_reassembles_to_extract(output, cuts):
    text, expected, content = output
    parser = get_tool_parser("hermes")(ids)
    extracted = parser.extract(text)
    assert [(c.name, c.arguments) for c in extracted.tool_calls] == expected
    if expected:
        assert extracted.content == (content or None)
    assert reassemble(stream(parser, text, cuts)) == extracted


@st.composite
def llama3_outputs(draw):
    parts = draw(
        st.lists(calls(draw(st.sampled_from(["parameters", "arguments"]))), min_size=1, max_size=3)
    )
    sep = draw(st.sampled_from([";", "; ", " ;\n"]))
    tag = draw(st.sampled_from(["", "<|python_tag|>", " "]))
    return tag + sep.join(body for body, _ in parts), [c for _, cs in parts for c in cs]


@settings(max_examples=150, deadline=None)
@given(output=llama3_outputs(), cuts=st.lists(st.integers(0, 10**4), max_size=12))
def test_llama3_json_streaming_reassembles_to_extract(output, cuts):
    text, expected = output
    parser = get_tool_parser("llama3_json")(ids)
    extracted = parser.extract(text)
    assert [(c.name, c.arguments) for c in extracted.tool_calls] == expected
    assert extracted.content is None
    assert reassemble(stream(parser, text, cuts)) == extracted


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet='ab {}"<|>_pythonag', max_size=30), cuts=st.lists(st.integers(0, 99)))
def test_plain_text_streams_as_the_same_content(text, cuts):
    for name in ("hermes", "llama3_json"):
        parser = get_tool_parser(name)(ids)
        extracted = parser.extract(text)
        if not extracted.tool_calls:  # content only: streamed content adds up to it
            got = reassemble(stream(parser, text, cuts))
            if not got.tool_calls:
                assert got.content == extracted.content


# ---- tool_choice required / named: the forced parser --------------------------------------------


def test_forced_parser_extracts_required_and_named():
    from engine.tool_parsers.forced import ForcedToolCallParser

    required = ForcedToolCallParser(None, ids)
    text = '[{"name": "a", "parameters": {"x": [1, 2]}}, {"name": "b", "parameters": {}}]'
    assert required.extract(text) == ExtractedToolCalls(
        None, [ToolCall("a", '{"x": [1, 2]}', "call-0"), ToolCall("b", "{}", "call-1")]
    )
    named = ForcedToolCallParser("f", ids)
    assert named.extract(' \n{"q": 1}\n').tool_calls == [ToolCall("f", '{"q": 1}', "call-0")]
    deltas = stream(named, ' {"q": 1} ', [1, 3, 9])
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert reassemble(deltas) == named.extract(' {"q": 1} ')


@st.composite
def required_outputs(draw):
    parts = draw(st.lists(calls("parameters"), min_size=1, max_size=3))
    sep = draw(st.sampled_from([",", ", ", "\n,\n"]))
    s = draw(SPACES)
    return f"{s}[{s}" + sep.join(body for body, _ in parts) + f"{s}]{s}", [
        c for _, cs in parts for c in cs
    ]


@settings(max_examples=150, deadline=None)
@given(output=required_outputs(), cuts=st.lists(st.integers(0, 10**4), max_size=12))
def test_forced_required_streaming_reassembles_to_extract(output, cuts):
    from engine.tool_parsers.forced import ForcedToolCallParser

    text, expected = output
    parser = ForcedToolCallParser(None, ids)
    extracted = parser.extract(text)
    assert [(c.name, c.arguments) for c in extracted.tool_calls] == expected
    assert reassemble(stream(parser, text, cuts)) == extracted


@settings(max_examples=100, deadline=None)
@given(args=JSON_VALUES, spaces=st.tuples(SPACES, SPACES), cuts=st.lists(st.integers(0, 999)))
def test_forced_named_streaming_reassembles_to_extract(args, spaces, cuts):
    from engine.tool_parsers.forced import ForcedToolCallParser

    text = spaces[0] + json.dumps({"v": args}, indent=2) + spaces[1]
    parser = ForcedToolCallParser("fn", ids)
    extracted = parser.extract(text)
    assert extracted.tool_calls[0].arguments == text.strip()
    assert reassemble(stream(parser, text, cuts)) == extracted
