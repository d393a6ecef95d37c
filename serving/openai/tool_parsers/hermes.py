"""Hermes format (Hermes 2 Pro, Qwen 2.5, ...): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
one block per call, possibly after some plain content. A last block the model left unclosed still
counts when it holds a whole JSON object."""
from __future__ import annotations

import re
from typing import Optional

from serving.openai.tool_parsers.base import ParsedCall, ToolParser, call_from_obj, first_json, held_back

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)


class HermesToolParser(ToolParser):
    name = "hermes"

    def _blocks(self, text: str, final: bool) -> list[ParsedCall]:
        out = []
        for m in _BLOCK.finditer(text):
            closed = m.group(0).endswith(CLOSE)
            if not closed and not final:
                break
            call = call_from_obj(first_json(m.group(1)))
            if call is not None:
                out.append(call)
        return out

    def extract(self, text: str) -> tuple[Optional[str], list[ParsedCall]]:
        calls = self._blocks(text, final=True)
        if not calls:
            return text, []
        content = text[:text.find(OPEN)].strip()
        return content or None, calls

    def content_end(self, text: str) -> int:
        i = text.find(OPEN)
        return i if i >= 0 else len(text) - held_back(text, OPEN)

    def calls(self, text: str, final: bool) -> list[ParsedCall]:
        return self._blocks(text, final)
