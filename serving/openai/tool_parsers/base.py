"""The tool-call parser interface for tool_choice "auto": find the calls a model wrote in its text.

Non-streaming: `extract(text)` -> (content, calls). Streaming: the chat route asks, on each update, how
much of the text is surely plain content (`content_end`) and which calls are complete (`calls`), and
sends only what is new.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


class ToolParser:
    name = ""

    def extract(self, text: str) -> tuple[Optional[str], list[ParsedCall]]:
        """(content without the calls or None when empty, calls); no calls -> (text, [])."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """Length of the prefix of `text` that is plain content whatever comes next."""
        raise NotImplementedError

    def calls(self, text: str, final: bool) -> list[ParsedCall]:
        """The calls complete in `text` (all of them when `final`)."""
        raise NotImplementedError


def call_from_obj(obj) -> Optional[ParsedCall]:
    """{"name": ..., "arguments"|"parameters": {...}} -> ParsedCall, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def first_json(text: str):
    """The first JSON value at the start of `text` (after blanks), ignoring what follows; None if none."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.lstrip())
        return value
    except ValueError:
        return None


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (it may become marker)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
