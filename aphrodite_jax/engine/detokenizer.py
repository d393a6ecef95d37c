"""Incremental detokenization of one sequence's output with an HF tokenizer (no JAX).

Each new token yields the text it adds. Method: decode a small window of the latest tokens twice,
with and without the not-yet-emitted ones, and emit the difference; hold everything back while the
decoded window ends in U+FFFD, because that is a multi-byte character split across tokens (an emoji,
CJK) that the next token may complete. So no replacement character is emitted and later taken back,
and the concatenated deltas equal `tokenizer.decode(output_ids, ...)` (`flush()` hands over what is
still held at the end, e.g. a truly incomplete character).

The window covers output tokens only (never the prompt), so the first token decodes as
`decode(output_ids)` would; the window starts one emitted chunk back so SentencePiece-style leading
spaces come out right.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text deltas."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Optional[Iterable[int]] = None, *,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids or [])  # kept for callers; not used as context
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.token_ids: list[int] = []
        self.output_text = ""  # everything emitted so far
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens before this index are emitted

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        kw = {"skip_special_tokens": self.skip_special_tokens}
        if not self.spaces_between_special_tokens:
            kw["spaces_between_special_tokens"] = False
        return self.tokenizer.decode(ids, **kw)

    def _delta(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        new_text = self._decode(self.token_ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""  # nothing new yet, or the tail is a character still missing bytes
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.token_ids)
        self.output_text += delta
        return delta

    def add_token(self, token_id: int) -> str:
        """Appends one output token and returns the text it releases (possibly "")."""
        self.token_ids.append(int(token_id))
        return self._delta(final=False)

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Appends several tokens (e.g. after a multi-token step); returns their joint delta."""
        return "".join(self.add_token(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of the sequence: the text still held back (an unfinished character)."""
        if self._read == len(self.token_ids):
            return ""
        return self._delta(final=True)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose text is still held back."""
        return len(self.token_ids) - self._read


def finished_text(text: str, detok: Optional[IncrementalDetokenizer], text_len: int) -> str:
    """A finished sequence's text: cut to the stop checker's `text_len`, or, when nothing is cut, with
    what the detokenizer still holds back (an unfinished character at the very end) added."""
    if detok is not None and text_len == len(text):
        return text + detok.flush()
    return text[:text_len]


def token_text(tokenizer: Any, token_id: int, skip_special_tokens: bool = False) -> str:
    """The text of one token on its own (for logprob entries); partial bytes show as U+FFFD."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=skip_special_tokens)
