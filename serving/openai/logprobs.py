"""Engine logprobs ({token_id: Logprob} per token) rendered in the two OpenAI wire formats.

JSON never carries -inf or NaN: every value is clamped to -9999.0 (docs/decisions.md D13). Chat
`top_logprobs` are the k most likely tokens sorted by probability (D12).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from aphrodite_jax.outputs import Logprob

FLOOR = -9999.0


def clamp(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if math.isnan(value) or value < FLOOR:
        return FLOOR
    return float(value)


class TokenRenderer:
    """Token id -> display string ("token_id:N" under --return-tokens-as-token-ids)."""

    def __init__(self, tokenizer: Any, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token_id: int, decoded: Optional[str] = None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        if decoded is not None:
            return decoded
        return self.tokenizer.decode([token_id])


def completion_logprobs(token_ids: list[int], entries: list[Optional[dict[int, Logprob]]],
                        render: TokenRenderer, initial_offset: int = 0) -> dict[str, Any]:
    """The legacy format: tokens, token_logprobs, top_logprobs (sampled + top-k) and text_offset."""
    out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    offset = initial_offset
    for tid, entry in zip(token_ids, entries):
        own = entry.get(tid) if entry else None
        token = render(tid, own.decoded_token if own else None)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        out["token_logprobs"].append(clamp(own.logprob) if own else None)
        if entry:
            out["top_logprobs"].append({render(i, lp.decoded_token): clamp(lp.logprob)
                                        for i, lp in entry.items()})
        else:
            out["top_logprobs"].append(None)
    return out


def _chat_item(token: str, logprob: Optional[float]) -> dict[str, Any]:
    return {"token": token, "logprob": clamp(logprob) if logprob is not None else FLOOR,
            "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: list[int], entries: list[Optional[dict[int, Logprob]]],
                  top_k: int, render: TokenRenderer) -> dict[str, Any]:
    content = []
    for tid, entry in zip(token_ids, entries):
        own = entry.get(tid) if entry else None
        item = _chat_item(render(tid, own.decoded_token if own else None), own.logprob if own else None)
        top = sorted((entry or {}).items(), key=lambda kv: -kv[1].logprob if not math.isnan(kv[1].logprob)
                     else math.inf)[:top_k] if top_k else []
        item["top_logprobs"] = [_chat_item(render(i, lp.decoded_token), lp.logprob) for i, lp in top]
        content.append(item)
    return {"content": content}


def prompt_logprobs_json(entries: Optional[list]) -> Optional[list]:
    """[null | {"<id>": {logprob, rank, decoded_token}}], clamped."""
    if entries is None:
        return None
    return [None if e is None else {str(i): {"logprob": clamp(lp.logprob), "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for i, lp in e.items()}
            for e in entries]
