"""outlines-core: regex-based guides. A JSON schema becomes a regex (`build_regex_from_schema`, which
honours `guided_whitespace_pattern`), choices become an alternation; the regex is compiled against the
vocabulary into a token-level automaton (`Index`) and each sequence walks it with a `Guide`.
No grammars (the manager falls back to xgrammar)."""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from aphrodite_jax.guided.base import (CompiledGuide, GuideBackend, GuideError, GuideState, bit_is_set,
                                       regex_escape, set_bits)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the printable stand-in character -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes_map(tokenizer: Any) -> dict[bytes, list[int]]:
    """Every non-special token as the raw bytes it decodes to (byte-level BPE or SentencePiece)."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for text, tid in tokenizer.get_vocab().items():
        if tid in special:
            continue
        if all(ch in dec for ch in text):
            raw = bytes(dec[ch] for ch in text)
        elif text.startswith("<0x") and text.endswith(">") and len(text) == 6:  # SentencePiece byte
            raw = bytes([int(text[3:5], 16)])
        else:
            raw = text.replace("\u2581", " ").encode("utf-8")
        out.setdefault(raw, []).append(tid)
    return out


# Schema keywords build_regex_from_schema ignores: a guide that silently dropped them could emit
# invalid output, so the outlines backend refuses them.
_UNENFORCED = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}


def _keywords(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = set(node)
        for key, value in node.items():
            if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(value, dict):
                for sub in value.values():  # the names here are property names, not keywords
                    out |= _keywords(sub)
            elif key not in ("enum", "const", "default", "examples"):
                out |= _keywords(value)
        return out
    if isinstance(node, list):
        return set().union(*(_keywords(v) for v in node)) if node else set()
    return set()


class _State(GuideState):
    def __init__(self, guide, eos: int, extra_eos: tuple[int, ...], width: int):
        self.guide = guide
        self.eos = eos
        self.extra_eos = extra_eos
        self.width = width
        self.done = False

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        out = bitmask[row]
        out[:] = 0
        if self.done:
            set_bits(out, (self.eos,) + self.extra_eos)
            return
        self.guide.write_mask_into(out.ctypes.data, self.width, 4)
        if self.extra_eos and bit_is_set(out, self.eos):
            set_bits(out, self.extra_eos)

    def accept(self, token_id: int) -> bool:
        if token_id == self.eos or token_id in self.extra_eos:
            ok = self.eos in self.guide.get_tokens()
            self.done = self.done or ok
            return ok
        try:
            self.guide.advance(token_id, return_tokens=False)
        except Exception:  # outlines raises on a token its automaton has no edge for
            return False
        return True

    def is_terminated(self) -> bool:
        return self.done


class _Compiled(CompiledGuide):
    def __init__(self, index, eos: int, extra_eos: tuple[int, ...], width: int):
        self.index, self.eos, self.extra_eos, self.width = index, eos, extra_eos, width

    def new_state(self) -> GuideState:
        import outlines_core

        return _State(outlines_core.Guide(self.index), self.eos, self.extra_eos, self.width)


class OutlinesBackend(GuideBackend):
    name = "outlines"
    kinds = frozenset({"json", "regex", "choice", "json_object"})

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids):
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        import outlines_core

        if not self.eos_token_ids:
            raise GuideError("the outlines backend needs a model with an EOS token")
        self.eos = self.eos_token_ids[0]
        self.vocabulary = outlines_core.Vocabulary(self.eos, token_bytes_map(tokenizer))
        self.width = (vocab_size + 31) // 32

    def to_regex(self, kind: str, spec: Any, whitespace_pattern: Optional[str]) -> str:
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "regex":
            return spec
        if kind == "choice":
            return "(" + "|".join(regex_escape(c) for c in spec) + ")"
        schema = {"type": "object"} if kind == "json_object" else spec
        return build_regex_from_schema(json.dumps(schema), whitespace_pattern)

    def compile(self, kind: str, spec: Any, whitespace_pattern: Optional[str] = None) -> CompiledGuide:
        import outlines_core

        if kind not in self.kinds:
            raise GuideError(f"the outlines backend cannot compile a {kind} guide")
        if kind == "json":
            found = sorted(_UNENFORCED & _keywords(spec))
            if found:
                raise GuideError(f"the outlines backend cannot enforce {', '.join(found)} in guided_json (its "
                                 "JSON-to-regex drops them); use the xgrammar backend", "guided_decoding_backend")
        param = "response_format" if kind == "json_object" else f"guided_{kind}"
        try:
            index = outlines_core.Index(self.to_regex(kind, spec, whitespace_pattern), self.vocabulary)
        except Exception as exc:
            raise GuideError(f"Invalid {param} for the outlines backend: {exc}", param) from None
        return _Compiled(index, self.eos, tuple(t for t in self.eos_token_ids if t != self.eos), self.width)
