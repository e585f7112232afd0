"""Issue 11: the request shapes real clients send, through the official `openai` SDK.

Chat `content` as an array of text parts (vLLM's serving benchmark and guidellm send it), agent
tool history (`content: null` with `tool_calls`, `role: tool` with `tool_call_id`), the SDK's
`models.retrieve` with a model name holding `/`, and `system_fingerprint` as a string.
"""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from engine import EngineArgs, LLMEngine
from engine.server import OpenAIServer, ServerConfig, ServerThread
from engine.server.chat_render import detect_content_format, prepare_messages
from engine.tokenizer import apply_chat_template

ENGINE_KW = {
    "dtype": "float64",
    "block_size": 4,
    "kv_cache_memory_bytes": 8 * 2**20,
    "max_model_len": 256,
    "seed": 0,
}
NAMES = ("tiny", "org/tiny-chat")
PARTS = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
# A template that prints content as a string (not iterating parts), tool calls and tool results.
STRING_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<call {{ c.id }} {{ c.function.name }}({{ c.function.arguments.city }})>"
    "{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}<result of {{ m.tool_call_id }}>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


@pytest.fixture(scope="module")
def server(llama_path):
    engine = LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW))
    config = ServerConfig(
        served_model_names=NAMES,
        log_stats_interval=None,
        access_log=False,
        trust_request_chat_template=True,
    )
    with ServerThread(OpenAIServer(engine, config)) as thread:
        yield thread


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def tokenize(server, body: dict) -> list[int]:
    request = urllib.request.Request(
        server.url + "/tokenize",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["tokens"]


def test_models_retrieve_with_slash_in_the_name(client):
    for name in NAMES:
        model = client.models.retrieve(name)
        assert model.id == name and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/other")


def test_content_parts_reach_a_parts_template_as_a_list(server, client, tokenizer):
    """The demo model's ChatML template iterates parts: it gets the list, as HF renders it."""
    assert detect_content_format(tokenizer.chat_template) == "openai"
    messages = [{"role": "user", "content": PARTS}]
    assert tokenize(server, {"messages": messages}) == apply_chat_template(tokenizer, messages)
    resp = client.chat.completions.create(
        model=NAMES[0], messages=messages, max_tokens=4, temperature=0
    )
    same = client.chat.completions.create(
        model=NAMES[0],
        messages=[{"role": "user", "content": "Hellothere"}],
        max_tokens=4,
        temperature=0,
    )
    assert resp.choices[0].message.content == same.choices[0].message.content


def test_content_parts_are_joined_for_a_string_template(server, client, tokenizer):
    assert detect_content_format(STRING_TEMPLATE) == "string"
    body = {"messages": [{"role": "user", "content": PARTS}], "chat_template": STRING_TEMPLATE}
    got = tokenizer.decode(tokenize(server, body))
    assert got == "[user]Hello\nthere[assistant]"
    resp = client.chat.completions.create(
        model=NAMES[1],
        messages=[{"role": "user", "content": PARTS}],
        max_tokens=3,
        extra_body={"chat_template": STRING_TEMPLATE},
    )
    assert resp.model == NAMES[1] and resp.choices[0].finish_reason == "length"


def test_tool_history_reaches_the_template(server, client, tokenizer):
    body = {"messages": TOOL_HISTORY, "chat_template": STRING_TEMPLATE}
    got = tokenizer.decode(tokenize(server, body))
    assert got == (
        "[user]Weather in Paris?[assistant]<call call_1 get_weather(Paris)>"
        "[tool]sunny<result of call_1>[assistant]"
    )
    # The same history through the SDK (its types: content None, a tool message) with the
    # model's own template: a 200, not a 400.
    resp = client.chat.completions.create(
        model=NAMES[0], messages=TOOL_HISTORY, max_tokens=3, temperature=0
    )
    assert resp.choices[0].finish_reason == "length"
    assert isinstance(resp.system_fingerprint, str) and resp.system_fingerprint
    prepared = prepare_messages(TOOL_HISTORY, "openai")
    assert prepared[1]["content"] == [] and prepared[1]["tool_calls"][0]["function"][
        "arguments"
    ] == {"city": "Paris"}
    assert TOOL_HISTORY[1]["content"] is None  # the caller's messages are not modified


def test_system_fingerprint_is_a_string(client):
    completion = client.completions.create(model=NAMES[0], prompt="Hi", max_tokens=2)
    assert isinstance(completion.system_fingerprint, str)
    chunks = list(
        client.chat.completions.create(
            model=NAMES[0],
            messages=[{"role": "user", "content": PARTS}],
            max_tokens=2,
            stream=True,
        )
    )
    assert all(isinstance(c.system_fingerprint, str) for c in chunks)
