"""lm-format-enforcer: character-level parsers (JSON schema, regex, a union of strings for choices, any
JSON for json_object) walked over a prefix tree of the vocabulary. No grammars (the manager falls back
to xgrammar). Its transformers integration does not import under transformers 5, so the tokenizer
data is built here the way that integration builds it."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from aphrodite_jax.guided.base import CompiledGuide, GuideBackend, GuideError, GuideState, set_bits
from aphrodite_jax.guided.outlines_backend import _UNENFORCED, _keywords


def _tokenizer_data(tokenizer: Any, vocab_size: int, eos: tuple[int, ...]):
    from lmformatenforcer import TokenEnforcerTokenizerData

    special = set(tokenizer.all_special_ids)
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    regular = []
    for tid in range(min(len(tokenizer), vocab_size)):
        if tid in special:
            continue
        after_zero = tokenizer.decode([zero, tid])[1:]  # keeps a word-start token's leading space
        alone = tokenizer.decode([tid])
        regular.append((tid, after_zero, len(after_zero) > len(alone)))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids).rstrip("\ufffd")

    return TokenEnforcerTokenizerData(regular, decode, list(eos), False, vocab_size)


class _State(GuideState):
    def __init__(self, data, parser, eos: tuple[int, ...]):
        from lmformatenforcer import TokenEnforcer

        self.enforcer = TokenEnforcer(data, parser)
        self.eos = eos
        self.tokens: list[int] = []
        self.done = False
        self._allowed: Optional[np.ndarray] = None

    def allowed(self) -> np.ndarray:
        if self._allowed is None:
            self._allowed = np.asarray(self.enforcer.get_allowed_tokens(self.tokens).allowed_tokens, dtype=np.int64)
        return self._allowed

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        out = bitmask[row]
        out[:] = 0
        if self.done:
            set_bits(out, self.eos)
            return
        ids = self.allowed()
        np.bitwise_or.at(out.view(np.uint32), ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
        if np.isin(ids, self.eos).any():
            set_bits(out, self.eos)

    def accept(self, token_id: int) -> bool:
        if self.done:
            return False
        if token_id in self.eos:
            ok = bool(np.isin(self.allowed(), self.eos).any())
            self.done = ok
            return ok
        if not (self.allowed() == token_id).any():
            return False
        self.tokens.append(token_id)
        self._allowed = None
        return True

    def is_terminated(self) -> bool:
        return self.done


class _Compiled(CompiledGuide):
    def __init__(self, backend: "LMFormatEnforcerBackend", make_parser):
        self.backend, self.make_parser = backend, make_parser

    def new_state(self) -> GuideState:
        return _State(self.backend.data, self.make_parser(), self.backend.eos_token_ids)


class LMFormatEnforcerBackend(GuideBackend):
    name = "lm-format-enforcer"
    kinds = frozenset({"json", "regex", "choice", "json_object"})

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids):
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        if not self.eos_token_ids:
            raise GuideError("the lm-format-enforcer backend needs a model with an EOS token")
        self.data = _tokenizer_data(tokenizer, vocab_size, self.eos_token_ids)

    def compile(self, kind: str, spec: Any, whitespace_pattern: Optional[str] = None) -> CompiledGuide:
        from lmformatenforcer import JsonSchemaParser, RegexParser, StringParser, UnionParser

        param = "response_format" if kind == "json_object" else f"guided_{kind}"
        if kind == "json":
            found = sorted(_UNENFORCED & _keywords(spec))
            if found:
                raise GuideError(f"the lm-format-enforcer backend cannot enforce {', '.join(found)} in "
                                 "guided_json; use the xgrammar backend", "guided_decoding_backend")
        makers = {"json": lambda: JsonSchemaParser(spec), "json_object": lambda: JsonSchemaParser(None),
                  "regex": lambda: RegexParser(spec),
                  "choice": lambda: UnionParser([StringParser(c) for c in spec])}
        if kind not in makers:
            raise GuideError(f"the lm-format-enforcer backend cannot compile a {kind} guide")
        try:
            makers[kind]()  # parsers are built per sequence; building one now finds a bad guide
        except Exception as exc:
            raise GuideError(f"Invalid {param} for the lm-format-enforcer backend: {exc}", param) from None
        return _Compiled(self, makers[kind])
