"""xgrammar: JSON schema, regex, choice (as GBNF), GBNF or Lark grammars, any-JSON; all compiled ahead
to a CompiledGrammar whose per-sequence GrammarMatcher fills the packed bitmask directly."""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from aphrodite_jax.guided.base import CompiledGuide, GuideBackend, GuideError, GuideState, gbnf_choice

_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def _clean(exc: Exception) -> str:
    return _CPP_PREFIX.sub("", str(exc).strip())


def looks_like_lark(grammar: str) -> bool:
    """Aphrodite's rule: `rule ::= ...` is GBNF, `rule: ...` is Lark."""
    return "::=" not in grammar and re.search(r"^\s*[?!]?\w+(\.\d+)?\s*:", grammar, re.M) is not None


class _State(GuideState):
    def __init__(self, matcher):
        self.matcher = matcher

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class _Compiled(CompiledGuide):
    def __init__(self, grammar):
        self.grammar = grammar

    def new_state(self) -> GuideState:
        import xgrammar as xgr

        return _State(xgr.GrammarMatcher(self.grammar))


class XGrammarBackend(GuideBackend):
    name = "xgrammar"
    kinds = frozenset({"json", "regex", "choice", "grammar", "json_object"})

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids):
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(self.eos_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, kind: str, spec: Any, whitespace_pattern: Optional[str] = None) -> CompiledGuide:
        c = self.compiler
        try:
            if kind == "json":
                # Compact JSON: a small model given free whitespace can spend max_tokens on blanks.
                g = c.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
            elif kind == "json_object":
                g = c.compile_json_schema({"type": "object"}, any_whitespace=False)
            elif kind == "regex":
                g = c.compile_regex(spec)
            elif kind == "choice":
                g = c.compile_grammar(gbnf_choice(spec))
            elif kind == "grammar":
                g = c.compile_lark(spec) if looks_like_lark(spec) else c.compile_grammar(spec)
            else:
                raise GuideError(f"xgrammar cannot compile a {kind} guide")
        except GuideError:
            raise
        except Exception as exc:  # xgrammar reports bad input as RuntimeError/ValueError from C++
            raise GuideError(f"Invalid guided_{kind if kind != 'json_object' else 'json'}: {_clean(exc)}",
                             "response_format" if kind == "json_object" else f"guided_{kind}") from None
        return _Compiled(g)
