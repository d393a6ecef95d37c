"""Continuous batching on the host: which sequences run this step, with how many tokens, on which pages.

Pure Python, no JAX. Queues: `waiting` (FCFS deque), `running`, `swapped`.

Engine loop contract:
1. `out = scheduler.schedule()`.
2. The runner applies, in this order: `out.blocks_to_swap_out` (gpu, cpu), `out.blocks_to_swap_in`
   (cpu, gpu), `out.blocks_to_copy` (src, dst), then runs the rows of `out.scheduled`: for each
   `ScheduledSeq` r, tokens `r.seq.token_ids[c : c + r.num_new_tokens]` with
   `c = r.seq.num_computed_tokens`, at positions c.., KV written into `r.block_table`; logits of
   the row's last token are sampled iff `r.do_sample`. Decode rows come first, then prefill rows.
3. `scheduler.on_step_done(out)` (advances num_computed_tokens, feeds the prefix cache), THEN the
   engine appends the sampled tokens (`seq.append_token`) to rows with do_sample.
4. For n>1/best_of, after the prompt's first sample: `scheduler.fork_seq(group, parent, child_id)`
   -> a RUNNING child holding the parent's computed tokens (the prompt), whether or not the
   parent's own new token was already appended and even if the parent just finished.
5. A finished seq: set its status, `scheduler.free_seq(seq)` (pages released at the end of the
   step); then `free_finished_seq_groups()` once per step.
`out.preempted` / `out.ignored` are for reporting; ignored groups are FINISHED_IGNORED (prompt
longer than max_model_len, larger than the token budget without chunked prefill, or than the cache,
or n/best_of above max_num_seqs).

Policy: running groups in (priority, arrival) order (lower value first) get their decode tokens
first; when pages run out the last (lowest-priority, latest-arrived) running group is preempted:
by recompute (pages freed, front of `waiting`, num_computed_tokens=0, later re-prefills
prompt+output) or by swap (pages copied to host, `swapped` queue). Multi-sequence groups prefer swap;
with no swap space, recompute.
Then (only when nobody was preempted this step) swapped groups come back, then waiting groups are
admitted FCFS within `max_num_seqs` and the token budget. With chunked prefill the remaining
budget is filled with prefill chunks (continuing prompts first), `do_sample` only on the last chunk.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from aphrodite_jax.engine.block_manager import AllocStatus, BlockManager
from aphrodite_jax.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from aphrodite_jax.tuning import TuningProfile

RUNNING, WAITING, SWAPPED = SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.SWAPPED


@dataclass
class ScheduledSeq:
    group: SequenceGroup
    seq: Sequence
    num_new_tokens: int
    block_table: list[int]
    do_sample: bool
    is_prefill: bool = False

    @property
    def num_computed_tokens(self) -> int:
        return self.seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)   # (cpu, gpu)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)      # (src, dst)
    preempted: list[SequenceGroup] = field(default_factory=list)
    ignored: list[SequenceGroup] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        """No device work (there may still be ignored groups to report)."""
        return not (self.scheduled or self.blocks_to_swap_in or self.blocks_to_swap_out
                    or self.blocks_to_copy)

    @property
    def num_decode_rows(self) -> int:
        return sum(1 for r in self.scheduled if not r.is_prefill)


class Scheduler:
    """FCFS continuous-batching scheduler over a `BlockManager`; see the module docstring."""

    def __init__(self, scheduler_config, cache_config, num_gpu_blocks: int, num_cpu_blocks: int,
                 max_model_len: int, watermark: float = 0.01,
                 token_buckets: Optional[Iterable[int]] = None, tuning: Optional[TuningProfile] = None) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len
        self.chunked = bool(scheduler_config.enable_chunked_prefill)
        budget = scheduler_config.max_num_batched_tokens
        if budget is None:
            budget = max(512, scheduler_config.max_num_seqs) if self.chunked else max(max_model_len, 2048)
        self.max_num_batched_tokens = budget
        # The runner pads each step's tokens up to one of these (runner/buckets.py); with chunked
        # prefill the scheduler trims prefill chunks so a step does not pay for a mostly empty bucket.
        self.token_buckets = sorted(token_buckets) if token_buckets else None
        # Steps are only trimmed down to buckets of at least tuning.min_trim_bucket tokens (aphrodite_jax/tuning.py).
        self.tuning = tuning or TuningProfile()
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.preemption_mode = scheduler_config.preemption_mode
        self.block_manager = BlockManager(num_gpu_blocks, num_cpu_blocks, cache_config.block_size,
                                          enable_prefix_caching=cache_config.enable_prefix_caching,
                                          watermark=watermark)
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: list[SequenceGroup] = []
        self.num_prefill_tokens_computed = 0
        self.num_preemptions = 0
        self._to_free: list[Sequence] = []
        self._num_running = 0  # seq slots reserved by running groups, during schedule()

    # ---- queues ---------------------------------------------------------------------------
    def add_seq_group(self, group: SequenceGroup) -> None:
        for seq in group.get_seqs():
            seq.status = WAITING
        self.waiting.append(group)

    def abort_seq_group(self, request_id: Union[str, Iterable[str]]) -> list[SequenceGroup]:
        """Abort requests in any queue: unfinished seqs become FINISHED_ABORTED, pages are freed."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        aborted = []
        for name in ("waiting", "running", "swapped"):
            queue = getattr(self, name)
            keep = []
            for group in queue:
                if group.request_id in ids:
                    for seq in group.get_seqs():
                        if not seq.is_finished():
                            seq.status = SequenceStatus.FINISHED_ABORTED
                        self.block_manager.free(seq)
                    aborted.append(group)
                else:
                    keep.append(group)
            setattr(self, name, deque(keep) if name == "waiting" else keep)
        return aborted

    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def get_num_unfinished_seq_groups(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def fork_seq(self, group: SequenceGroup, parent: Sequence, child_seq_id: int) -> Sequence:
        """A RUNNING sibling sharing the parent's pages (n/best_of after the first sample).

        The child inherits only the parent's computed tokens (at least the prompt), so forking
        before or after the parent's newest sampled token is appended gives the same child. The
        parent may already be finished and passed to `free_seq` in this step: pages are released
        only by `free_finished_seq_groups()` or the next `schedule()`.
        """
        if not self.block_manager.has_gpu_blocks(parent):
            raise RuntimeError(f"cannot fork sequence {parent.seq_id}: it holds no device pages")
        keep = min(max(parent.num_computed_tokens, parent.prompt_len), parent.get_len())
        child = parent.fork(child_seq_id, num_tokens=keep)
        child.status = RUNNING
        self.block_manager.fork(parent, child)
        group.add(child)
        return child

    def free_seq(self, seq: Sequence) -> None:
        """Release a finished seq's pages (deferred to the end of the step, see fork_seq)."""
        self._to_free.append(seq)

    def _flush_frees(self) -> None:
        for seq in self._to_free:
            self.block_manager.free(seq)
        self._to_free.clear()

    def free_finished_seq_groups(self) -> list[SequenceGroup]:
        self._flush_frees()
        finished = [g for g in self.running if g.is_finished()]
        for g in finished:
            for seq in g.get_seqs():
                self.block_manager.free(seq)
        self.running = [g for g in self.running if not g.is_finished()]
        return finished

    # ---- stats ----------------------------------------------------------------------------
    @property
    def num_running_seqs(self) -> int:
        return sum(g.num_seqs(RUNNING) for g in self.running)

    @property
    def gpu_cache_usage(self) -> float:
        """Fraction of device pages in use (free cached pages count as free)."""
        bm = self.block_manager
        return 1.0 - bm.num_free_gpu_blocks / bm.num_gpu_blocks

    @property
    def cpu_cache_usage(self) -> float:
        bm = self.block_manager
        return 1.0 - bm.num_free_cpu_blocks / bm.num_cpu_blocks if bm.num_cpu_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.block_manager.prefix_cache_hit_rate

    # ---- scheduling -----------------------------------------------------------------------
    def _num_running_seqs(self) -> int:
        return sum(g.max_num_running_seqs() for g in self.running)

    def _row(self, group: SequenceGroup, seq: Sequence, n: int, out: SchedulerOutput,
             is_prefill: bool) -> ScheduledSeq:
        out.blocks_to_copy.extend(self.block_manager.append_slots(seq, n))
        return ScheduledSeq(group=group, seq=seq, num_new_tokens=n,
                            block_table=self.block_manager.get_block_table(seq),
                            do_sample=seq.num_computed_tokens + n >= seq.get_len(),
                            is_prefill=is_prefill)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        bm = self.block_manager
        use_swap = self.preemption_mode == "swap" or group.num_seqs(RUNNING) > 1
        if use_swap and bm.num_cpu_blocks > 0 and bm.can_swap_out(group):
            out.blocks_to_swap_out.extend(bm.swap_out(group))
            for seq in group.get_seqs(RUNNING):
                seq.status = SWAPPED
            self.swapped.append(group)
        else:
            for seq in group.get_seqs(RUNNING):
                bm.free(seq)
                seq.status = WAITING
                seq.num_computed_tokens = 0
            self.waiting.appendleft(group)
        out.preempted.append(group)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        self._flush_frees()
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        decode_rows: list[ScheduledSeq] = []
        prefill_rows: list[ScheduledSeq] = []

        # 1. Running groups: decode slots first, preempting from the back when pages run out.
        queue = deque(sorted(self.running, key=lambda g: (g.priority, g.arrival_time)))
        kept: list[SequenceGroup] = []
        continuing: list[SequenceGroup] = []  # running groups still in (chunked) prefill
        while queue:
            group = queue.popleft()
            seqs = group.get_seqs(RUNNING)
            while not bm.can_append_slots(group, 1):
                if queue:
                    self._preempt(queue.pop(), out)
                else:
                    self._preempt(group, out)
                    break
            else:
                kept.append(group)
                if any(s.num_uncomputed_tokens > 1 for s in seqs):
                    continuing.append(group)  # prompt pages exist; chunks come after decodes
                    continue
                for seq in seqs:
                    if seq.num_uncomputed_tokens < 1 or budget < 1:
                        continue
                    decode_rows.append(self._row(group, seq, 1, out, is_prefill=False))
                    budget -= 1
        self.running = kept  # preempted groups never reached `kept`
        for group in continuing:
            for seq in group.get_seqs(RUNNING):
                left = seq.num_uncomputed_tokens
                n = min(left, budget)
                if n <= 0 or (not self.chunked and n < left):
                    continue
                row = self._row(group, seq, n, out, is_prefill=seq.is_prefill())
                (prefill_rows if row.is_prefill else decode_rows).append(row)
                budget -= n

        if not out.preempted:
            self._num_running = self._num_running_seqs()
            budget = self._schedule_swapped(out, budget, decode_rows, prefill_rows)
            if not self.swapped:
                self._schedule_waiting(out, budget, prefill_rows)

        if self.chunked and self.token_buckets and prefill_rows:
            prefill_rows = self._align_to_bucket(decode_rows, prefill_rows)
        out.scheduled = decode_rows + prefill_rows
        out.num_batched_tokens = sum(r.num_new_tokens for r in out.scheduled)
        return out

    def _align_to_bucket(self, decode_rows: list, prefill_rows: list) -> list:
        """Trim the last prefill chunks so the step's tokens end on a bucket when that is cheaper.

        A step costs about its padded bucket, so e.g. 15 decodes + a 256-token prompt (271 tokens)
        would run as 512. When the padding up would be larger than the overshoot past the bucket
        below, the overshoot waits for the next step (where it rides along the decodes), so the
        device never computes more padding than real tokens are deferred. Trimmed chunks keep their
        pages (they are reused next step); a row trimmed to nothing is dropped (its group stays
        running and continues next step).
        """
        total = sum(r.num_new_tokens for r in decode_rows) + sum(r.num_new_tokens for r in prefill_rows)
        buckets = self.token_buckets
        if total <= buckets[0] or total in buckets:
            return prefill_rows
        up = next((b for b in buckets if b >= total), None)
        low = max(b for b in buckets if b < total)
        if low < self.tuning.min_trim_bucket:
            return prefill_rows  # small steps cost about the same padded or not: deferring only delays
        if up is not None and up - total <= total - low:
            return prefill_rows
        excess = total - low
        if excess >= sum(r.num_new_tokens for r in prefill_rows):
            return prefill_rows  # the bucket below would hold no prefill at all: keep the step as is
        kept = list(prefill_rows)
        while excess > 0:
            row = kept[-1]
            cut = min(excess, row.num_new_tokens)
            row.num_new_tokens -= cut
            excess -= cut
            if row.num_new_tokens == 0:
                kept.pop()
            else:
                row.do_sample = row.seq.num_computed_tokens + row.num_new_tokens >= row.seq.get_len()
        return kept

    def _schedule_swapped(self, out: SchedulerOutput, budget: int, decode_rows: list,
                          prefill_rows: list) -> int:
        bm = self.block_manager
        self.swapped.sort(key=lambda g: (g.priority, g.arrival_time))
        while self.swapped:
            group = self.swapped[0]
            seqs = group.get_seqs(SWAPPED)
            need = sum(min(s.num_uncomputed_tokens, budget) if self.chunked
                       else s.num_uncomputed_tokens for s in seqs)
            if not bm.can_swap_in(group) and not self.running:
                # Nothing else holds device pages, so it can never come back: it outgrew the cache.
                self.swapped.pop(0)
                self._ignore(group, out)
                continue
            reserve = group.max_num_running_seqs()
            if (self._num_running + reserve > self.max_num_seqs
                    or need > budget or not bm.can_swap_in(group)):
                break
            self._num_running += reserve
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(bm.swap_in(group))
            for seq in seqs:
                seq.status = RUNNING
            self.running.append(group)
            for seq in seqs:
                left = seq.num_uncomputed_tokens
                n = min(left, budget) if self.chunked else left
                if n <= 0:
                    continue
                row = self._row(group, seq, n, out, is_prefill=seq.is_prefill())
                (prefill_rows if row.is_prefill else decode_rows).append(row)
                budget -= n
        return budget

    def _ignore(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        for seq in group.get_seqs():
            if not seq.is_finished():
                seq.status = SequenceStatus.FINISHED_IGNORED
            self.block_manager.free(seq)
        out.ignored.append(group)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, prefill_rows: list) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0:
            group = self.waiting[0]
            seqs = group.get_seqs(WAITING)
            if not seqs:  # nothing left to run (e.g. all finished): drop it
                self.waiting.popleft()
                continue
            lens = [s.get_len() for s in seqs]
            too_long = max(lens) > self.max_model_len or (
                not self.chunked and max(lens) > self.max_num_batched_tokens) or (
                group.max_num_running_seqs() > self.max_num_seqs)  # n/best_of can never fit
            status = AllocStatus.NEVER if too_long else bm.can_allocate(group)
            if status is AllocStatus.NEVER:
                self.waiting.popleft()
                self._ignore(group, out)
                continue
            if status is AllocStatus.LATER:
                break
            reserve = group.max_num_running_seqs()
            if self._num_running + reserve > self.max_num_seqs:
                break
            if not self.chunked:
                need = sum(n - bm.peek_num_cached_tokens(s) for s, n in zip(seqs, lens))
                if need > budget:
                    break
            self.waiting.popleft()
            self._num_running += reserve
            bm.allocate(group)
            for seq in seqs:
                seq.status = RUNNING
            self.running.append(group)
            for seq in seqs:
                n = seq.num_uncomputed_tokens
                if self.chunked:
                    n = min(n, budget)
                if n <= 0:
                    continue
                prefill_rows.append(self._row(group, seq, n, out, is_prefill=True))
                budget -= n

    def on_step_done(self, out: SchedulerOutput) -> None:
        """After the device step, before sampled tokens are appended: advance the computed counts."""
        for row in out.scheduled:
            seq = row.seq
            if seq.status is not RUNNING or not self.block_manager.has_blocks(seq):
                continue  # aborted or finished meanwhile
            seq.num_computed_tokens += row.num_new_tokens
            if row.is_prefill:
                self.num_prefill_tokens_computed += row.num_new_tokens
            self.block_manager.mark_blocks_computed(seq)
