"""EngineSnapshot: a plain copy of the engine's queues, KV usage and counters, for readers on other
threads (the server's admin and metrics routes, the stats logger). Pure Python, no JAX.

The engine thread changes the scheduler's queues while it steps; a reader takes a snapshot between
steps (AsyncLLMEngine.snapshot) and then reads only the copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestSnapshot:
    request_id: str
    state: str  # "running" | "waiting" | "swapped"
    prompt_tokens: int
    output_tokens: int  # the longest of the request's sequences


@dataclass(frozen=True)
class EngineSnapshot:
    requests: tuple[RequestSnapshot, ...]  # running, then waiting, then swapped
    num_running: int
    num_waiting: int
    num_swapped: int
    gpu_cache_usage: float  # fraction of device KV pages in use (0..1)
    cpu_cache_usage: float  # fraction of host swap pages in use (0..1)
    num_gpu_blocks: int
    num_cpu_blocks: int
    steps: int
    prompt_tokens: int  # prefill tokens computed so far
    generation_tokens: int
    finished: dict[str, int] = field(default_factory=dict)  # finished sequences by finish reason

    @classmethod
    def capture(cls, stats: Any, scheduler: Any, num_gpu_blocks: int = 0,
                num_cpu_blocks: int = 0) -> "EngineSnapshot":
        """Copy what a reader needs out of an EngineStats and a Scheduler (call it where they cannot
        change meanwhile: on the engine thread, or under the AsyncLLMEngine's lock)."""
        queues = (("running", scheduler.running), ("waiting", scheduler.waiting),
                  ("swapped", scheduler.swapped))
        requests = tuple(
            RequestSnapshot(g.request_id, state, len(g.prompt_token_ids),
                            max((s.get_output_len() for s in g.get_seqs()), default=0))
            for state, queue in queues for g in queue)
        return cls(requests=requests, num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                   num_swapped=len(scheduler.swapped), gpu_cache_usage=scheduler.gpu_cache_usage,
                   cpu_cache_usage=scheduler.cpu_cache_usage, num_gpu_blocks=num_gpu_blocks,
                   num_cpu_blocks=num_cpu_blocks, steps=stats.steps, prompt_tokens=stats.prompt_tokens,
                   generation_tokens=stats.generation_tokens, finished=dict(stats.finished))
