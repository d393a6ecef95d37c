"""The one small interface every guided-decoding backend implements.

A backend turns a guide (kind + spec text) into a CompiledGuide for one tokenizer; a CompiledGuide makes
one GuideState per sequence. A GuideState writes the allowed next tokens of its row into a packed
bitmask (int32 words, bit j of word i = token 32 * i + j allowed) and advances on each sampled token.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


class GuideError(ValueError):
    """A guide the client sent cannot be compiled (bad schema, regex or grammar); the API answers 400.
    `param` names the request field at fault."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class GuideState:
    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32[W]); EOS only where the guide accepts."""
        raise NotImplementedError

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False if the guide rejects it (the state is then unchanged)."""
        raise NotImplementedError

    def is_terminated(self) -> bool:
        raise NotImplementedError


class CompiledGuide:
    def new_state(self) -> GuideState:
        raise NotImplementedError


class GuideBackend:
    """One backend bound to one tokenizer. `kinds` are the guide kinds it can compile."""

    name: str = ""
    kinds: frozenset = frozenset()

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits width, which may exceed the tokenizer's size
        self.eos_token_ids = tuple(eos_token_ids)

    def compile(self, kind: str, spec: Any, whitespace_pattern: Optional[str] = None) -> CompiledGuide:
        raise NotImplementedError


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def set_bits(bitmask_row: np.ndarray, token_ids: Sequence[int]) -> None:
    """Set the bits of token_ids in one int32[W] bitmask row."""
    view = bitmask_row.view(np.uint32)
    for t in token_ids:
        view[t >> 5] |= np.uint32(1 << (t & 31))


def bit_is_set(bitmask_row: np.ndarray, token_id: int) -> bool:
    return bool((int(bitmask_row.view(np.uint32)[token_id >> 5]) >> (token_id & 31)) & 1)


def gbnf_choice(choices: Sequence[str]) -> str:
    """`root ::= "a" | "b"` with each choice as a GBNF string literal (JSON escapes are GBNF escapes)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def regex_escape(text: str) -> str:
    """Escape regex metacharacters only (Python's re.escape also escapes spaces, which Rust's regex
    crate, under outlines-core, refuses)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)
