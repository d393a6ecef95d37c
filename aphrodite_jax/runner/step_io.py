"""What passes between the engine, the ModelRunner and the sampler for one step.

Plain values, no hidden state: everything a later call of the same step needs (the hidden states for
prompt logprobs, the token bucket they are padded to, the sampler metadata on the device) comes back in
the StepOutput, so two steps' values can be used in any order.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

Row = tuple[list[int], int, list[int]]  # (new token ids, start position, page table) of one sequence


class StepInput(NamedTuple):
    """One scheduled step as the runner sees it."""

    rows: list[Row]  # per sequence, in batch order
    sample_rows: list[int]  # indices into `rows` whose last token's logits are wanted
    sampling: Any = None  # host sampler metadata (runner/packing.Packed): rides in the step's one transfer
    logprobs: bool = False  # a draw of the step wants logprobs (picks the sample bucket: buckets_for)
    prompt_logprobs: bool = False  # the step computes prompt logprobs

    @property
    def num_tokens(self) -> int:
        return sum(len(r[0]) for r in self.rows)


class StepOutput(NamedTuple):
    """The device results of one step's model run."""

    logits: Optional[Any]  # f32[B_bucket, V] for the sample rows, or None when nothing samples
    sampling: Any  # the StepInput's sampler metadata, now on the device
    hidden: Any  # [T_bucket, H]: the last layer's hidden states (prompt logprobs read them)
    token_bucket: int  # T_bucket, the padded token count `hidden` has
