"""Test helper: drive the engine's ModelRunner with page tables chosen by the test."""
from __future__ import annotations

import numpy as np


def make_runner(loaded, *, mesh=None, num_pages: int = 128, block_size: int = 8, max_tokens: int = 512,
                max_seqs: int = 64):
    """The engine's ModelRunner over a loaded model, with a small fixed cache (the production step)."""
    from aphrodite_jax.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
    from aphrodite_jax.runner.model_runner import ModelRunner

    tp = 1 if mesh is None else int(mesh.shape["model"])
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_gpu_blocks_override=num_pages, swap_space=0),
                          scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens),
                          parallel=ParallelConfig(tensor_parallel_size=tp), compilation_cache_dir=None)
    config = config.resolve(loaded.max_model_len)  # the runner takes the config resolved against the model
    return ModelRunner(config, loaded.model, loaded.hf_config, max_model_len=loaded.max_model_len,
                       vocab_size=loaded.hf_config.vocab_size, dtype=loaded.dtype, mesh=mesh)


class RunnerDriver:
    """Feeds a ModelRunner ragged steps with page tables of its own (pages from a shuffled free list), as
    the scheduler would, and reads the logits of every token fed.

    The runner returns the logits of each row's last token; the logits of every position of a prompt come
    from the prompt's prefixes, each a throwaway sequence with pages of its own, run in the same ragged
    steps as the prompt itself."""

    def __init__(self, runner, seed: int = 0):
        self.runner = runner
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(runner.num_gpu_blocks)]
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self._scratch = 0

    def _row(self, sid, toks: list[int]):
        start = self.lens.get(sid, 0)
        table = self.tables.setdefault(sid, [])
        while len(table) * self.runner.block_size < start + len(toks):
            table.append(self.free.pop())
        self.lens[sid] = start + len(toks)
        return list(toks), start, list(table)

    def step(self, chunks: dict[int, list[int]]) -> np.ndarray:
        """chunks: seq id -> this step's token ids. Returns f32[sum of chunk lengths, V]: the logits of every
        token fed, in order. A chunk of several tokens must start its sequence."""
        rows, wanted = [], []  # wanted: (chunk index, position in chunk) of each row
        for c, (sid, toks) in enumerate(chunks.items()):
            if len(toks) > 1 and self.lens.get(sid, 0):
                raise NotImplementedError("a multi-token chunk after the first one")
            rows.append(self._row(sid, toks))
            wanted.append((c, len(toks) - 1))
        for c, (sid, toks) in enumerate(chunks.items()):
            for j in range(len(toks) - 1):
                self._scratch -= 1
                rows.append(self._row(("prefix", self._scratch), toks[:j + 1]))
                wanted.append((c, j))
        got = {}
        for batch in self._batches(rows):
            logits = np.asarray(_run_step(self.runner, [rows[i] for i in batch], list(range(len(batch)))))
            for k, i in enumerate(batch):
                got[wanted[i]] = logits[k]
        return np.stack([got[(c, j)] for c, toks in enumerate(chunks.values()) for j in range(len(toks))])

    def _batches(self, rows) -> list[list[int]]:
        """Row indices grouped into steps within the runner's token and sequence budgets, in order."""
        out, cur, tokens = [], [], 0
        for i, row in enumerate(rows):
            n = len(row[0])
            if cur and (tokens + n > self.runner.max_tokens or len(cur) == self.runner.max_num_seqs):
                out.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += n
        return out + ([cur] if cur else [])


def _run_step(runner, rows, sample_rows):
    """One runner step; returns the logits f32[B_bucket, V] of the sample rows."""
    from aphrodite_jax.runner.step_io import StepInput

    return runner.run_model(StepInput(rows, sample_rows)).logits
