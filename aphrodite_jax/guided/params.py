"""GuidedDecodingParams: what a request asks its output to match. Host-only, no JAX, no backend imports.

It rides on SamplingParams as the one `guided_decoding` field, so `LLM.generate` users and every API
route (OpenAI's guided_* fields, response_format, tools, Kobold's `grammar`) share one path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

BACKENDS = ("xgrammar", "outlines", "lm-format-enforcer")
KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class GuidedDecodingParams:
    """Exactly one of json / regex / choice / grammar / json_object is set.

    json: a JSON schema (dict or JSON text); regex: the whole output must match it; choice: the output is
    exactly one of the strings; grammar: GBNF (`root ::= ...`) or Lark (`start: ...`) text;
    json_object: any JSON object. backend: None means the engine's default; whitespace_pattern: the
    regex JSON whitespace must match (only the outlines backend can honour it).
    """

    json: Optional[Union[dict, str]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: bool = False
    backend: Optional[str] = None
    whitespace_pattern: Optional[str] = None

    def __post_init__(self) -> None:
        self.verify()

    @property
    def kind(self) -> str:
        for name in KINDS[:-1]:
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def verify(self) -> None:
        """Shape checks that need no backend; compiling the guide finds the rest (bad schema/regex)."""
        set_ = [n for n in KINDS[:-1] if getattr(self, n) is not None] + (["json_object"] if self.json_object else [])
        if len(set_) != 1:
            raise ValueError("You can only use one kind of guided decoding ('guided_json', 'guided_regex', "
                             "'guided_choice', 'guided_grammar', json_object) at a time, got "
                             f"{len(set_)}: {', '.join(set_) or 'none'}.")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"Unknown guided decoding backend '{self.backend}'. Must be one of "
                             f"{', '.join(repr(b) for b in BACKENDS)}")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"guided_json is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise ValueError("guided_json must be a JSON object (a JSON schema)")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError("guided_json must be a JSON schema: a dict or its JSON text")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"guided_{name} must be a non-empty string")

    def schema(self) -> Optional[dict]:
        if self.json is None:
            return None
        return json.loads(self.json) if isinstance(self.json, str) else self.json

    def spec_key(self) -> str:
        """A canonical text of the guide (cache key together with backend and tokenizer)."""
        kind = self.kind
        if kind == "json":
            value = json.dumps(self.schema(), sort_keys=True)
        elif kind == "choice":
            value = json.dumps(self.choice)
        elif kind == "json_object":
            value = ""
        else:
            value = getattr(self, kind)
        return f"{kind}\x00{self.whitespace_pattern or ''}\x00{value}"
