"""Stop checking for one sequence after each new token (Aphrodite's stop handling), no JAX.

Order: while the output is shorter than min_tokens nothing stops it except the length limits; then
EOS (unless ignore_eos; finish "stop", stop_reason None), a stop token id (stop_reason = the id), a stop
string in the newly added text (stop_reason = the string); then the total length above the model's
max length, or the output reaching max_tokens (finish "length"). The stop token's / EOS's text and a
stop string (and whatever followed it) are cut from the output unless include_stop_str_in_output.

Streaming: `releasable_len` holds back the longest tail of the text that is a proper prefix of a stop
string, so a stop string that may still complete never reaches the client.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from aphrodite_jax.sampling_params import SamplingParams


@dataclass
class StopResult:
    finish_reason: Optional[str]  # None (go on), "stop" or "length"
    stop_reason: Union[int, str, None]  # the stop token id or stop string, else None
    text_len: int  # the output text's length after truncation (== len(text) when nothing is cut)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def eos_token_ids_from(*sources: Any) -> set[int]:
    """EOS ids from HF configs / generation configs / tokenizers (any object with eos_token_id, or a
    dict with that key); int or list values; None entries are skipped."""
    out: set[int] = set()
    for src in sources:
        if src is None:
            continue
        val = src.get("eos_token_id") if isinstance(src, dict) else getattr(src, "eos_token_id", None)
        if val is None:
            continue
        out.update(int(v) for v in (val if isinstance(val, (list, tuple, set)) else [val]) if v is not None)
    return out


def find_stop_string(text: str, new_len: int, stops: Iterable[str]) -> Optional[tuple[int, str]]:
    """The earliest stop string that ends inside the last `new_len` characters: (start index, string)."""
    best: Optional[tuple[int, str]] = None
    for s in stops:
        start = max(0, len(text) - new_len - len(s) + 1)
        idx = text.find(s, start)
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def releasable_len(text: str, stops: Iterable[str], finished: bool = False) -> int:
    """How much of `text` may be streamed: all of it, minus the longest tail that is a proper prefix
    of a stop string (it could still become the stop string)."""
    if finished:
        return len(text)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold


class StopChecker:
    """Decides whether a sequence finishes after its newest token."""

    def __init__(self, max_model_len: int, eos_token_ids: Iterable[int] = ()) -> None:
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)

    def check(self, params: SamplingParams, *, token_id: int, new_text: str, output_text: str,
              num_output_tokens: int, num_prompt_tokens: int) -> StopResult:
        """output_text already includes new_text (this token's delta); num_output_tokens includes the
        new token."""
        n = len(output_text)
        if num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                keep = n if params.include_stop_str_in_output else n - len(new_text)
                return StopResult("stop", None, keep)
            if token_id in params.stop_token_ids:
                keep = n if params.include_stop_str_in_output else n - len(new_text)
                return StopResult("stop", int(token_id), keep)
            if params.stop and new_text:
                hit = find_stop_string(output_text, len(new_text), params.stop)
                if hit is not None:
                    idx, s = hit
                    keep = idx + len(s) if params.include_stop_str_in_output else idx
                    return StopResult("stop", s, keep)
        if num_prompt_tokens + num_output_tokens > self.max_model_len:
            return StopResult("length", None, n)
        if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
            return StopResult("length", None, n)
        return StopResult(None, None, n)

    @staticmethod
    def releasable_len(params: SamplingParams, text: str, finished: bool = False) -> int:
        return releasable_len(text, params.stop, finished)

    @staticmethod
    def releasable_text(params: SamplingParams, text: str, finished: bool = False) -> str:
        """The streamable part of the output text (see module docstring)."""
        return text[:releasable_len(text, params.stop, finished)]
