"""Request state on the host: `Sequence` (one token stream) and `SequenceGroup` (one request).

Pure Python, no JAX. The scheduler and block manager read and move these; the engine keeps each
request's output state (text, logprobs, finish reason, detokenizer) in its RequestState.

Interface:
- `SequenceStatus`: WAITING, RUNNING, SWAPPED, FINISHED_STOPPED, FINISHED_LENGTH,
  FINISHED_ABORTED, FINISHED_IGNORED; `SequenceStatus.is_finished(status)`.
- `Sequence(seq_id, prompt_token_ids)`: `token_ids` (prompt + output), `prompt_len`,
  `output_token_ids`, `num_computed_tokens` (tokens whose KV is in the cache), `status`,
  `append_token(token_id, logprob)`, `cumulative_logprob`, `is_finished()`, `get_len()`,
  `num_uncomputed_tokens`, `is_prefill()`, `fork(new_seq_id, num_tokens=None)`.
- `SequenceGroup(request_id, seqs, arrival_time, sampling_params, priority=0)`: `get_seqs(status)`,
  `get_unfinished_seqs()`, `num_seqs(status)`, `is_finished()`, `add(seq)`,
  `max_num_running_seqs()` (reads `sampling_params.n` / `.best_of` if present).
"""
from __future__ import annotations

import copy
import enum
from typing import Any, Optional


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()

    @staticmethod
    def is_finished(status: "SequenceStatus") -> bool:
        return status.value > _LAST_UNFINISHED  # finished statuses are declared last

    @staticmethod
    def get_finished_reason(status: "SequenceStatus") -> Optional[str]:
        """The OpenAI `finish_reason` string for a finished status (None while unfinished)."""
        return _FINISH_REASON.get(status)


_LAST_UNFINISHED = SequenceStatus.SWAPPED.value
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                  SequenceStatus.FINISHED_ABORTED: "abort", SequenceStatus.FINISHED_IGNORED: "length"}


class Sequence:
    """One token stream: the prompt plus the tokens sampled so far, and how much of it is cached."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.prompt_len = len(self.token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.cumulative_logprob = 0.0
        self._token_logprobs: list[float] = []  # sampled logprob per output token (for forks)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.prompt_len]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def get_len(self) -> int:
        return len(self.token_ids)

    def get_output_len(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def is_prefill(self) -> bool:
        """True while more than the newest token still lacks KV (prompt or recompute re-prefill)."""
        return self.num_uncomputed_tokens > 1 or self.num_computed_tokens == 0

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(int(token_id))
        self._token_logprobs.append(float(logprob))
        self.cumulative_logprob += float(logprob)

    def is_finished(self) -> bool:
        return self.status.value > _LAST_UNFINISHED

    def fork(self, new_seq_id: int, num_tokens: Optional[int] = None) -> "Sequence":
        """A sibling with the first `num_tokens` tokens (default all) and the same cache progress.

        Block tables are forked separately.
        """
        keep = len(self.token_ids) if num_tokens is None else num_tokens
        if not self.prompt_len <= keep <= len(self.token_ids):
            raise ValueError(f"cannot fork {keep} tokens of a sequence of {len(self.token_ids)} "
                             f"with a {self.prompt_len}-token prompt")
        child = copy.copy(self)
        child.seq_id = new_seq_id
        child.token_ids = self.token_ids[:keep]
        child._token_logprobs = self._token_logprobs[:keep - self.prompt_len]
        child.cumulative_logprob = float(sum(child._token_logprobs))
        child.num_computed_tokens = min(self.num_computed_tokens, keep)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self.token_ids)}, prompt_len={self.prompt_len}, "
                f"computed={self.num_computed_tokens}, status={self.status.name})")


class SequenceGroup:
    """One request: its sequences (n/best_of siblings share prompt pages) and sampling params."""

    def __init__(self, request_id: str, seqs: list[Sequence], arrival_time: float,
                 sampling_params: Any = None, priority: int = 0) -> None:
        if not seqs:
            raise ValueError("a sequence group needs at least one sequence")
        self.request_id = request_id
        self.seqs: list[Sequence] = list(seqs)
        self.arrival_time = arrival_time
        self.sampling_params = sampling_params
        self.priority = priority

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].prompt_token_ids

    def get_seqs(self, status: Optional[SequenceStatus] = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs)
        return [s for s in self.seqs if s.status is status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished()]

    def num_seqs(self, status: Optional[SequenceStatus] = None) -> int:
        if status is None:
            return len(self.seqs)
        return sum(1 for s in self.seqs if s.status is status)

    def add(self, seq: Sequence) -> None:
        if any(s.seq_id == seq.seq_id for s in self.seqs):
            raise ValueError(f"sequence {seq.seq_id} already in group {self.request_id}")
        self.seqs.append(seq)

    def find(self, seq_id: int) -> Sequence:
        for s in self.seqs:
            if s.seq_id == seq_id:
                return s
        raise KeyError(seq_id)

    def is_finished(self) -> bool:
        return all(s.is_finished() for s in self.seqs)

    def max_num_running_seqs(self) -> int:
        """Sequences this group may run at once: n/best_of before the fork, the live ones after."""
        if len(self.seqs) == 1:
            if self.seqs[0].is_finished():
                return 0
            sp = self.sampling_params
            n = getattr(sp, "n", 1) or 1
            best_of = getattr(sp, "best_of", None) or n
            return max(1, int(n), int(best_of))
        return len(self.get_unfinished_seqs())

    def __repr__(self) -> str:
        return f"SequenceGroup(request_id={self.request_id!r}, seqs={self.seqs})"
