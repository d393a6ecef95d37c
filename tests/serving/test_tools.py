"""End to end: tool calling through the official openai client on the default model.
Named and "required" choices are guided by the tools' schemas (streaming and not); "auto" with the
hermes parser extracts a call the model wrote; tools reach the chat template; bad tool requests are 400s."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}$"},
                                                    "hours24": {"type": "boolean"}},
                   "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
SCHEMA = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]


@pytest.fixture(scope="module")
def tool_server(default_llm):
    from server_utils import start_server

    from serving.config import ServingConfig

    handle = start_server(default_llm.engine, ServingConfig(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server.v1, api_key="x", max_retries=0)


def check_calls(calls, names):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id
        assert c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA[c.function.name])


def collect_stream(chunks):
    """Rebuild tool calls from OpenAI stream deltas the way clients do; checks id/name come once."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for ch in chunks:
        if not ch.choices:
            continue
        choice = ch.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name, "the first delta of a call carries its id and name"
                calls[d.index] = {"id": d.id, "name": d.function.name, "args": d.function.arguments or ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["args"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return calls, finish, content


def test_named_and_required_tool_calls_validate(client, model):
    named = {"type": "function", "function": {"name": "get_weather"}}

    def plain(choice, temperature):
        # Sampled "required" outputs are kept to one call (parallel_tool_calls=False) so they finish quickly.
        return lambda: client.chat.completions.create(model=model, messages=MSGS, tools=TOOLS, tool_choice=choice,
                                                      max_tokens=80, temperature=temperature, seed=1,
                                                      parallel_tool_calls=temperature == 0).choices[0]

    def stream(choice, temperature):
        return lambda: list(client.chat.completions.create(model=model, messages=MSGS, tools=TOOLS,
                                                           tool_choice=choice, max_tokens=80, stream=True,
                                                           temperature=temperature, seed=2,
                                                           parallel_tool_calls=temperature == 0))
    jobs = [plain(named, 0.0), plain(named, 1.0), plain("required", 0.0), plain("required", 1.0),
            stream(named, 1.0), stream("required", 0.0), stream("required", 1.0)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda f: f(), jobs))
    for k, choice in enumerate(results[:4]):
        assert choice.finish_reason == "tool_calls"
        names = {"get_weather"} if k < 2 else set(SCHEMA)
        check_calls(choice.message.tool_calls, names)
        if k < 2:
            assert len(choice.message.tool_calls) == 1
    for k, chunks in enumerate(results[4:]):
        calls, finish, content = collect_stream(chunks)
        assert finish == "tool_calls" and content == ""
        names = {"get_weather"} if k == 0 else set(SCHEMA)
        for c in calls.values():
            assert c["name"] in names
            jsonschema.validate(json.loads(c["args"]), SCHEMA[c["name"]])
        assert calls


def test_auto_hermes_extracts_the_models_call(client, model):
    """The model continues an assistant turn that opened a hermes call; the parser must return it."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant",
             "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "'}]
    kw = dict(model=model, messages=msgs, tools=TOOLS, tool_choice="auto", max_tokens=32, temperature=0,
              stop=["</tool_call>", "\n\n"],
              extra_body={"continue_final_message": True, "add_generation_prompt": False})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    assert args["city"] == "Paris" and isinstance(args["unit"], str)
    # Streaming gives the same call in delta form.
    calls_s, finish, _ = collect_stream(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["args"])) for c in calls_s.values()] == [("get_weather", args)]


def test_auto_without_a_call_is_content_and_none_ignores_tools(client, model):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                           tools=TOOLS, tool_choice=choice, max_tokens=6, temperature=0)
        assert r.choices[0].message.tool_calls in (None, [])
        assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_tools_reach_the_chat_template(client, model, tool_server):
    template = ("{% for t in tools or [] %}TOOL {{ t.function.name }};{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    tok = tool_server.engine.tokenizer
    r = client.chat.completions.create(model=model, messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=1,
                                       extra_body={"chat_template": template})
    expected = f"TOOL get_weather;TOOL get_time;user: {MSGS[0]['content']}\nassistant:"
    assert r.usage.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))


@pytest.mark.parametrize("kw,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}], "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required", "extra_body": {"guided_regex": "a"}}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400(client, model, kw, param):
    kw = {"tools": TOOLS, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, **kw)
    assert info.value.body["param"] == param
