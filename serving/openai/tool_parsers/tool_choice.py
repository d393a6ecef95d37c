"""Request-side tool handling: validate `tools` / `tool_choice` (Aphrodite's validators, docs/decisions.md D9),
and turn named and "required" choices into a guide over the tools' argument schemas.

Named: the output is the function's arguments object (guided by `parameters`).
Required: the output is a JSON list of {"name": N, "parameters": {...}} with each item one of the tools
(an anyOf over them), at least one call.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from serving.openai.errors import APIError
from serving.openai.tool_parsers.base import ParsedCall

_NAMED_FORMAT = ('Incorrectly formatted `tool_choice`. Should be like `{"type": "function", '
                 '"function": {"name": "my_function"}}`')


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict]  # the request's tools, checked
    name: Optional[str] = None  # the named function
    schema: Optional[dict] = None  # the guide for named / required


def _check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise APIError("`tools` must be a list", 400, "tools")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", 400, "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"tools[{i}].function.name must be a non-empty string", 400, "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(f"tools[{i}].function.parameters must be a JSON schema object", 400, "tools")
        if fn["name"] in names:
            raise APIError(f"tools[{i}]: duplicate function name {fn['name']!r}", 400, "tools")
        names.add(fn["name"])
    return tools


def parameters_of(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object"}


def plan_tools(tools: Any, tool_choice: Any, *, auto_enabled: bool, parallel: Optional[bool] = None) -> ToolPlan:
    """Aphrodite's validators in order, with "none" and "required" accepted (docs/decisions.md D9).
    `parallel` is the request's parallel_tool_calls: False limits "required" to one call."""
    if tools is not None and tools != [] and tool_choice is None:
        tool_choice = "auto"
    if tool_choice is None or (tool_choice == "none" and not tools):
        return ToolPlan("none", list(tools or []))
    if not tools:
        raise APIError("When using `tool_choice`, `tools` must be set.", 400, "tool_choice")
    tools = _check_tools(tools)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError('`tool_choice` must be "none", "auto", "required" or a named tool, got '
                           f'{tool_choice!r}', 400, "tool_choice")
        if tool_choice == "auto" and not auto_enabled:
            raise APIError('tool_choice "auto" requires --enable-auto-tool-choice and --tool-call-parser '
                           'to be set', 400, "tool_choice")
        if tool_choice == "required":
            return ToolPlan("required", tools, schema=required_schema(tools, one=parallel is False))
        return ToolPlan(tool_choice, tools)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
            tool_choice.get("type", "function") != "function":
        raise APIError(_NAMED_FORMAT, 400, "tool_choice")
    match = [t for t in tools if t["function"]["name"] == fn["name"]]
    if not match:
        raise APIError("The tool specified in `tool_choice` does not match any of the specified `tools`",
                       400, "tool_choice")
    return ToolPlan("named", tools, name=fn["name"], schema=parameters_of(match[0]))


def required_schema(tools: list[dict], one: bool = False) -> dict:
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": parameters_of(t)},
              "required": ["name", "parameters"]} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if one:
        schema["maxItems"] = 1
    return schema


def calls_from_required(text: str) -> Optional[list[ParsedCall]]:
    """The calls of a finished "required" output (None if it is not a complete list)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    return [ParsedCall(v["name"], json.dumps(v["parameters"], ensure_ascii=False)) for v in value
            if isinstance(v, dict) and isinstance(v.get("name"), str) and "parameters" in v]


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')


def stream_required(text: str) -> list[tuple[str, str, bool]]:
    """(name, arguments text so far, complete) per call of a partial "required" output, which the guide
    writes as `[{"name": "f", "parameters": {...}}, ...]`. Arguments only grow, so the route can send
    the new part of them each update."""
    out: list[tuple[str, str, bool]] = []
    i = text.find("[")
    if i < 0:
        return out
    depth, in_str, esc, start = 0, False, False, None
    for j in range(i + 1, len(text)):
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            continue
        if c == '"':
            in_str = True
        elif c in "{[":
            if depth == 0:
                start = j
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0 and start is not None:
                out.append(_element(text[start:j + 1], True))
                start = None
            if depth < 0:
                break
    if start is not None:
        out.append(_element(text[start:], False))
    return [e for e in out if e is not None]


def _element(chunk: str, complete: bool) -> Optional[tuple[str, str, bool]]:
    m = _HEAD.match(chunk)
    if m is None:
        return None
    name = json.loads(f'"{m.group(1)}"')
    args = chunk[m.end():]
    if complete:
        args = args.rstrip()[:-1].rstrip()  # drop the element's closing brace
    return name, args, complete
