"""What the engine returns: one RequestOutput per request per step, cumulative (not deltas).

Logprobs are lists with one dict per token: {token_id: Logprob}. The servers turn these into the
OpenAI/Kobold wire formats and compute streaming deltas themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float = 0.0
    logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    metrics: dict = field(default_factory=dict)
