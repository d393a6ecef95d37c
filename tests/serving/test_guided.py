"""End to end: guided decoding through the official openai client on the
real server and default model. Requests go out concurrently so the engine batches them."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

S = {"type": "string"}
SCHEMAS = [
    {"type": "object", "properties": {"name": {**S, "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "email": {**S, "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["id", "email"]}},
     "required": ["user"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {**S, "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100},
                                      "currency": {"enum": ["USD", "EUR"]}}, "required": ["price", "currency"]},
    {"type": "object", "properties": {"title": {**S, "maxLength": 12},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "subtitle": {**S, "maxLength": 8}}, "required": ["title"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 6}},
     "required": ["ok", "note"]},
    {"type": "object", "properties": {"points": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"]}}}, "required": ["points"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"code": {**S, "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "kind": {"const": "alert"}},
     "required": ["level", "kind"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["c"]}}, "required": ["b"]}},
     "required": ["a"]},
    {"$defs": {"pt": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}},
                      "required": ["lat"]}},
     "type": "object", "properties": {"home": {"$ref": "#/$defs/pt"}}, "required": ["home"]},
    {"type": "object", "properties": {"count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10},
                                      "unit": {**S, "enum": ["kg", "g"]}}, "required": ["count", "unit"]},
    {"type": "object", "properties": {"city": {**S, "minLength": 2, "maxLength": 10},
                                      "zip": {**S, "pattern": "^[0-9]{5}$"}},
     "required": ["city"], "additionalProperties": False},
]

LARK = '''start: expr "=" NUMBER
expr: term (OP term)?
term: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*"
NUMBER: /[1-9][0-9]?/
'''


def run_all(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda f: f(), calls))


def json_request(client, model, i: int, schema: dict, temperature: float):
    """Three routes in turn: completions + guided_json, chat + response_format json_schema (strict on
    every other one), chat + guided_json."""
    max_tokens = 64
    if i % 3 == 0:
        def go():
            r = client.completions.create(model=model, prompt=f"A JSON record, example {i}:\n", max_tokens=max_tokens,
                                          temperature=temperature, seed=i, extra_body={"guided_json": schema})
            return r.choices[0].text, r.choices[0].finish_reason
        return go
    msgs = [{"role": "user", "content": f"Give me JSON for item {i}."}]
    if i % 3 == 1:
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": i % 2 == 0}}
        kw = {"response_format": fmt}
    else:
        kw = {"extra_body": {"guided_json": json.dumps(schema)}}  # a schema as JSON text works too

    def go():
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=temperature,
                                           seed=i, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    return go


def test_30_json_schemas_validate_greedy_and_sampled(client, model):
    calls, schemas = [], []
    for temperature in (0.0, 1.0):
        for k, schema in enumerate(SCHEMAS):
            calls.append(json_request(client, model, len(calls), schema, temperature))
            schemas.append(schema)
    assert len(calls) == 30
    results = run_all(calls)
    for (text, finish), schema in zip(results, schemas):
        assert finish == "stop", (text, schema)
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_grammar_json_object(client, model):
    regex = r"[A-Z][a-z]{2,6} [0-9]{1,3}"
    choices = ["Paris", "London", "New York (USA)"]
    ask = "Name a city:"

    def comp(extra, temperature=1.0, seed=0, max_tokens=24):
        return lambda: client.completions.create(model=model, prompt=ask, max_tokens=max_tokens, seed=seed,
                                                 temperature=temperature, extra_body=extra).choices[0]
    calls = []
    for backend in ("xgrammar", "outlines", "lm-format-enforcer"):
        for t in (0.0, 1.0):
            calls.append(("regex", comp({"guided_regex": regex, "guided_decoding_backend": backend}, t)))
            calls.append(("choice", comp({"guided_choice": choices, "guided_decoding_backend": backend}, t)))
    for seed in range(3):
        calls.append(("grammar", comp({"guided_grammar": LARK}, 1.0, seed, max_tokens=40)))
    calls.append(("json_object", lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give a short JSON object with a name and an age."}],
        max_tokens=60, temperature=0, response_format={"type": "json_object"}).choices[0]))
    calls.append(("whitespace", comp({"guided_json": SCHEMAS[1], "guided_whitespace_pattern": r"[ ]{0,2}"}, 1.0)))
    calls.append(("length", comp({"guided_json": {"type": "array", "items": {"type": "integer"}, "minItems": 30}},
                                 1.0, max_tokens=5)))
    outs = run_all([c for _, c in calls])
    import lark

    parser = lark.Lark(LARK)
    for (kind, _), out in zip(calls, outs):
        text = out.text if hasattr(out, "text") else out.message.content
        if kind == "length":  # a guide that cannot finish within max_tokens
            assert out.finish_reason == "length"
            with pytest.raises(ValueError):
                json.loads(text)
            continue
        assert out.finish_reason == "stop", (kind, text)
        if kind == "regex":
            assert re.fullmatch(regex, text), text
        elif kind == "choice":
            assert text in choices
        elif kind == "grammar":
            parser.parse(text)  # raises on any text outside the grammar
        elif kind == "json_object":
            assert isinstance(json.loads(text), dict)
        elif kind == "whitespace":
            jsonschema.validate(json.loads(text), SCHEMAS[1])


def test_gbnf_grammar_and_streaming(client, model, server):
    gbnf = 'root ::= "Answer: " ("yes" | "no") "." ([0-9] [0-9]?)?'
    r = client.completions.create(model=model, prompt="Is water wet?", max_tokens=12, temperature=1.0, seed=3,
                                  extra_body={"guided_grammar": gbnf})
    text = r.choices[0].text
    assert re.fullmatch(r"Answer: (yes|no)\.([0-9][0-9]?)?", text), text
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Pick one."}], max_tokens=12, temperature=1.0,
        stream=True, extra_body={"guided_choice": ["alpha", "beta"]}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed in ("alpha", "beta")


BAD = [
    ({"guided_json": {"type": "foo"}}, "guided_json"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_regex": "(unclosed", "guided_decoding_backend": "outlines"}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_grammar": "start: expr\nexpr: 'x' undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a+", "guided_decoding_backend": "nope"}, "guided_decoding_backend"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
]


def test_bad_guides_are_400_and_server_still_serves(client, model, server):
    def send(extra):
        def go():
            try:
                client.completions.create(model=model, prompt="x", max_tokens=4, extra_body=extra)
            except openai.BadRequestError as exc:
                return exc
            return None
        return go
    errors = run_all([send(extra) for extra, _ in BAD])
    for (extra, param), err in zip(BAD, errors):
        assert err is not None, extra
        assert err.status_code == 400
        assert err.body["param"] == param, (extra, err.body)
    r = client.completions.create(model=model, prompt="x", max_tokens=8, temperature=0,
                                  extra_body={"guided_regex": "[a-z]{3}"})
    assert re.fullmatch("[a-z]{3}", r.choices[0].text)
    assert server.wait_idle()
