"""Llama 3.x JSON format: the whole answer is `<|python_tag|>`(optional) then one JSON object
{"name": ..., "parameters": {...}} or several separated by `;`, or a JSON list of them. An answer that
does not start that way is plain content."""
from __future__ import annotations

import json
from typing import Optional

from serving.openai.tool_parsers.base import ParsedCall, ToolParser, call_from_obj, held_back

TAG = "<|python_tag|>"


def _objects(body: str) -> list:
    dec = json.JSONDecoder()
    out, i = [], 0
    while i < len(body):
        while i < len(body) and body[i] in " \t\r\n;,":
            i += 1
        if i >= len(body):
            break
        try:
            value, i = dec.raw_decode(body, i)
        except ValueError:
            break
        out.extend(value if isinstance(value, list) else [value])
    return out


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def _body(self, text: str) -> Optional[str]:
        body = text.lstrip()
        if body.startswith(TAG):
            body = body[len(TAG):].lstrip()
        return body if body[:1] in ("{", "[") else None

    def extract(self, text: str) -> tuple[Optional[str], list[ParsedCall]]:
        body = self._body(text)
        if body is None:
            return text, []
        calls = [c for c in (call_from_obj(o) for o in _objects(body)) if c is not None]
        return (None, calls) if calls else (text, [])

    def content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped[:1] in ("{", "[") or stripped.startswith(TAG) or \
                held_back(stripped, TAG) == len(stripped):
            return 0  # may be a call: hold it until the end
        return len(text)

    def calls(self, text: str, final: bool) -> list[ParsedCall]:
        return self.extract(text)[1] if final else []
