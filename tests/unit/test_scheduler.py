"""Scheduler: FCFS, limits, decode-first order, chunked prefill, preemption, aborts, ignored prompts.

A fake engine loop drives it: schedule, check the invariants the runner relies on, on_step_done,
then append a fake token to every sampled row.
"""
import random
from types import SimpleNamespace

import pytest

from aphrodite_jax.config import CacheConfig, SchedulerConfig
from aphrodite_jax.engine.scheduler import Scheduler
from aphrodite_jax.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from aphrodite_jax.tuning import TuningProfile

BS = 8


def make_sched(num_gpu=64, num_cpu=0, max_model_len=256, prefix=False, token_buckets=None, min_trim_bucket=8,
               **kw):
    # min_trim_bucket 8: the tests' steps are tiny
    return Scheduler(SchedulerConfig(**kw), CacheConfig(block_size=BS, enable_prefix_caching=prefix),
                     num_gpu, num_cpu, max_model_len, token_buckets=token_buckets,
                     tuning=TuningProfile(min_trim_bucket=min_trim_bucket))


def add(s, rid, prompt, t=None, params=None):
    seq = Sequence(int(rid), list(prompt))
    g = SequenceGroup(str(rid), [seq], arrival_time=float(rid if t is None else t),
                      sampling_params=params)
    s.add_seq_group(g)
    return g


def check_rows(s, out):
    """The runner's invariants: pages cover each row's tokens and belong to nobody else."""
    seen = {}
    for r in out.scheduled:
        assert r.num_new_tokens >= 1
        end = r.seq.num_computed_tokens + r.num_new_tokens
        assert end <= r.seq.get_len()
        assert len(r.block_table) * BS >= end
        assert r.do_sample == (end == r.seq.get_len())
        # Pages written this step are private to the row.
        for page in r.block_table[r.seq.num_computed_tokens // BS:(end - 1) // BS + 1]:
            assert page not in seen, "two rows write the same page"
            seen[page] = r.seq.seq_id
    kinds = [r.is_prefill for r in out.scheduled]
    assert kinds == sorted(kinds), "decode rows must come before prefill rows"
    assert out.num_batched_tokens == sum(r.num_new_tokens for r in out.scheduled)
    assert out.num_batched_tokens <= s.max_num_batched_tokens
    assert sum(g.num_seqs(SequenceStatus.RUNNING) for g in s.running) <= s.max_num_seqs


def step(s, max_out=4, token=1):
    out = s.schedule()
    check_rows(s, out)
    s.on_step_done(out)
    for r in out.scheduled:
        if r.do_sample:
            r.seq.append_token(token, -1.0)
            if r.seq.get_output_len() >= max_out:
                r.seq.status = SequenceStatus.FINISHED_LENGTH
                s.free_seq(r.seq)
    s.free_finished_seq_groups()
    return out


def run_to_end(s, max_out=4, limit=2000):
    outs = []
    while s.has_unfinished_seqs():
        outs.append(step(s, max_out))
        assert len(outs) < limit, "scheduler made no progress"
    return outs


def test_fcfs_and_max_num_seqs():
    s = make_sched(max_num_seqs=2)
    groups = [add(s, i, range(5)) for i in range(4)]
    out = s.schedule()
    assert [r.group.request_id for r in out.scheduled] == ["0", "1"]
    assert all(r.is_prefill and r.do_sample and r.num_new_tokens == 5 for r in out.scheduled)
    assert len(s.waiting) == 2 and s.waiting[0] is groups[2]


def test_token_budget_limits_prefills_without_chunking():
    s = make_sched(max_num_batched_tokens=20, max_model_len=20)
    for i in range(3):
        add(s, i, range(8))
    out = s.schedule()
    assert [r.group.request_id for r in out.scheduled] == ["0", "1"]
    assert out.num_batched_tokens == 16


def test_decodes_first_then_new_prefills():
    s = make_sched()
    add(s, 0, range(5))
    step(s, max_out=10)
    add(s, 1, range(7))
    out = s.schedule()
    assert [(r.group.request_id, r.num_new_tokens, r.is_prefill) for r in out.scheduled] == [
        ("0", 1, False), ("1", 7, True)]
    assert all(r.do_sample for r in out.scheduled)


def test_chunked_prefill_splits_long_prompt():
    budget = 16
    s = make_sched(enable_chunked_prefill=True, max_num_batched_tokens=budget)
    g = add(s, 0, range(40))
    seq = g.seqs[0]
    chunks, samples = [], []
    while seq.get_output_len() == 0:
        out = step(s, max_out=10)
        (row,) = out.scheduled
        chunks.append(row.num_new_tokens)
        samples.append(row.do_sample)
    assert sum(chunks) == 40 and max(chunks) <= budget and len(chunks) == -(-40 // budget)
    assert samples == [False] * (len(chunks) - 1) + [True]
    assert s.num_prefill_tokens_computed == 40


def test_chunked_prefill_keeps_decodes_first_and_within_budget():
    s = make_sched(enable_chunked_prefill=True, max_num_batched_tokens=10)
    add(s, 0, range(3))
    step(s, max_out=20)
    add(s, 1, range(30))
    out = step(s, max_out=20)
    assert [(r.group.request_id, r.num_new_tokens) for r in out.scheduled] == [("0", 1), ("1", 9)]
    assert not out.scheduled[1].do_sample
    out = step(s, max_out=20)
    assert [(r.group.request_id, r.num_new_tokens) for r in out.scheduled] == [("0", 1), ("1", 9)]


BUCKETS = [8, 16, 32, 64, 128, 256]


def test_chunked_step_is_trimmed_down_to_a_bucket():
    """3 decodes + a 40-token prompt = 43 tokens would pad to 64: the chunk is cut to fill 32, and the
    other 11 prompt tokens ride along the next decode step (14 tokens, bucket 16)."""
    s = make_sched(enable_chunked_prefill=True, max_num_batched_tokens=256, token_buckets=BUCKETS)
    for i in range(3):
        add(s, i, range(5))
    step(s, max_out=20)
    g = add(s, 3, range(40))
    out = step(s, max_out=20)
    assert [(r.group.request_id, r.num_new_tokens) for r in out.scheduled] == [
        ("0", 1), ("1", 1), ("2", 1), ("3", 29)]
    assert out.num_batched_tokens == 32 and not out.scheduled[-1].do_sample
    assert g.seqs[0].num_computed_tokens == 29 and g.seqs[0].get_output_len() == 0
    out = step(s, max_out=20)
    assert [(r.group.request_id, r.num_new_tokens) for r in out.scheduled] == [
        ("0", 1), ("1", 1), ("2", 1), ("3", 11)]
    assert out.scheduled[-1].do_sample and g.seqs[0].get_output_len() == 1


def test_chunked_step_keeps_small_padding_and_whole_prompts_without_buckets():
    # 3 decodes + 58 prompt tokens = 61: padding to 64 (3) is less than the overshoot past 32 (29).
    s = make_sched(enable_chunked_prefill=True, max_num_batched_tokens=256, token_buckets=BUCKETS)
    for i in range(3):
        add(s, i, range(5))
    step(s, max_out=20)
    add(s, 3, range(58))
    assert step(s, max_out=20).num_batched_tokens == 61
    # Without buckets (or without chunking) nothing is trimmed.
    for kw in (dict(enable_chunked_prefill=True, max_num_batched_tokens=256),
               dict(max_num_batched_tokens=256, token_buckets=BUCKETS)):
        s = make_sched(**kw)
        for i in range(3):
            add(s, i, range(5))
        step(s, max_out=20)
        add(s, 3, range(40))
        assert step(s, max_out=20).num_batched_tokens == 43


def test_trimming_drops_a_chunk_cut_to_nothing():
    """1 decode + prompts of 31 and 2 tokens = 34 -> 32: the 2-token prompt loses its whole chunk this
    step (it stays admitted, holding its pages) and runs whole in the next."""
    s = make_sched(enable_chunked_prefill=True, max_num_batched_tokens=256, token_buckets=BUCKETS)
    add(s, 0, range(5))
    step(s, max_out=20)
    add(s, 1, range(31))
    late = add(s, 2, range(2))
    out = step(s, max_out=20)
    assert [(r.group.request_id, r.num_new_tokens) for r in out.scheduled] == [("0", 1), ("1", 31)]
    assert out.num_batched_tokens == 32 and late in s.running and late.seqs[0].num_computed_tokens == 0
    out = step(s, max_out=20)
    assert ("2", 2, True) in [(r.group.request_id, r.num_new_tokens, r.do_sample) for r in out.scheduled]
    assert late.seqs[0].get_output_len() == 1


def test_no_trim_below_the_minimum_bucket():
    s = make_sched(enable_chunked_prefill=True, max_num_batched_tokens=256, token_buckets=BUCKETS, min_trim_bucket=64)
    for i in range(3):
        add(s, i, range(5))
    step(s, max_out=20)
    add(s, 3, range(40))
    assert step(s, max_out=20).num_batched_tokens == 43  # would be trimmed to 32 with a smaller minimum


def test_prompt_too_long_is_ignored():
    s = make_sched(max_model_len=16)
    g = add(s, 0, range(17))
    ok = add(s, 1, range(4))
    out = s.schedule()
    assert out.ignored == [g]
    assert g.seqs[0].status is SequenceStatus.FINISHED_IGNORED
    assert [r.group for r in out.scheduled] == [ok]


def test_prompt_larger_than_cache_is_ignored():
    s = make_sched(num_gpu=2, max_model_len=64)
    g = add(s, 0, range(3 * BS))
    out = s.schedule()
    assert out.ignored == [g] and out.is_empty
    assert not s.has_unfinished_seqs()


@pytest.mark.parametrize("mode,num_cpu", [("recompute", 0), ("swap", 16), ("swap", 0)])
@pytest.mark.parametrize("chunked", [False, True])
def test_preemption_under_tiny_cache_still_finishes_everything(mode, num_cpu, chunked):
    num_gpu = 6
    s = make_sched(num_gpu=num_gpu, num_cpu=num_cpu, max_model_len=48, preemption_mode=mode,
                   enable_chunked_prefill=chunked, max_num_batched_tokens=32 if chunked else None)
    rng = random.Random(1)
    groups = [add(s, i, [rng.randrange(1000) for _ in range(rng.randrange(3, 14))]) for i in range(6)]
    outs = run_to_end(s, max_out=12)
    assert s.num_preemptions > 0
    assert all(g.seqs[0].status is SequenceStatus.FINISHED_LENGTH for g in groups)
    assert all(g.seqs[0].get_output_len() == 12 for g in groups)
    bm = s.block_manager
    assert bm.num_free_gpu_blocks == num_gpu and bm.num_free_cpu_blocks == num_cpu
    swapped_out = sum(len(o.blocks_to_swap_out) for o in outs)
    swapped_in = sum(len(o.blocks_to_swap_in) for o in outs)
    assert swapped_out == swapped_in
    assert (swapped_out > 0) == (mode == "swap" and num_cpu > 0)


def test_recompute_preemption_goes_to_front_and_reprefills_outputs():
    s = make_sched(num_gpu=3, max_model_len=24)
    a = add(s, 0, range(BS))
    b = add(s, 1, range(100, 100 + BS))
    out = step(s, max_out=8)  # both prefilled: one full page each, one page free
    assert not out.preempted and len(out.scheduled) == 2
    out = step(s, max_out=8)  # both need a second page, only one is free: the later one yields
    assert out.preempted == [b] and s.num_preemptions == 1
    assert [r.group for r in out.scheduled] == [a]
    assert s.waiting[0] is b and b.seqs[0].status is SequenceStatus.WAITING
    assert b.seqs[0].num_computed_tokens == 0 and b.seqs[0].get_output_len() == 1
    prefills = []
    while s.has_unfinished_seqs():
        before = b.seqs[0].get_len()
        out = step(s, max_out=8)
        prefills += [(r.num_new_tokens, before) for r in out.scheduled if r.group is b and r.is_prefill]
    # b came back with its whole token list (prompt + the output it had) as one prefill.
    assert prefills == [(BS + 1, BS + 1)]
    assert b.seqs[0].get_output_len() == 8 and a.seqs[0].get_output_len() == 8
    assert s.block_manager.num_free_gpu_blocks == 3


def test_abort_frees_pages_in_every_queue():
    s = make_sched(num_gpu=4, num_cpu=8, max_model_len=40, preemption_mode="swap")
    add(s, 0, range(BS))
    add(s, 1, range(100, 100 + BS))
    step(s, max_out=30)
    step(s, max_out=30)
    while not s.swapped:
        step(s, max_out=30)
    add(s, 2, range(5))
    assert s.running and s.swapped and s.waiting
    ids = [g.request_id for g in list(s.running) + list(s.swapped) + list(s.waiting)]
    aborted = s.abort_seq_group(ids)
    assert len(aborted) == 3
    assert all(seq.status is SequenceStatus.FINISHED_ABORTED for g in aborted for seq in g.seqs)
    assert not s.has_unfinished_seqs() and s.get_num_unfinished_seq_groups() == 0
    assert s.block_manager.num_free_gpu_blocks == 4 and s.block_manager.num_free_cpu_blocks == 8


def test_fork_copy_on_write_and_n_reserves_seq_slots():
    s = make_sched(max_num_seqs=3)
    g = add(s, 0, range(BS + 3), params=SimpleNamespace(n=2, best_of=None))
    other = add(s, 1, range(4), params=SimpleNamespace(n=2, best_of=None))
    out = s.schedule()
    assert [r.group for r in out.scheduled] == [g]  # 2 reserved + 2 would exceed 3
    s.on_step_done(out)
    parent = g.seqs[0]
    child = s.fork_seq(g, parent, 100)
    child.status = SequenceStatus.RUNNING
    parent.append_token(1, -0.1)
    child.append_token(2, -0.2)
    assert child.prompt_len == parent.prompt_len and child.output_token_ids == [2]
    out = s.schedule()
    rows = [r for r in out.scheduled if r.group is g]
    assert len(rows) == 2 and len(out.blocks_to_copy) == 1
    src, dst = out.blocks_to_copy[0]
    tables = {r.seq.seq_id: r.block_table for r in rows}
    assert tables[parent.seq_id][0] == tables[child.seq_id][0]
    assert {tables[parent.seq_id][1], tables[child.seq_id][1]} == {src, dst}
    assert other in s.waiting


def test_prefix_cache_hits_skip_prefill_tokens():
    s = make_sched(prefix=True)
    prompt = list(range(3 * BS + 2))
    add(s, 0, prompt)
    run_to_end(s, max_out=2)
    first = s.num_prefill_tokens_computed
    assert first == len(prompt)
    g = add(s, 1, prompt)
    out = step(s, max_out=2)
    (row,) = out.scheduled
    assert row.num_new_tokens == 2
    assert s.num_prefill_tokens_computed - first == 2
    run_to_end(s, max_out=2)
    assert g.seqs[0].get_output_len() == 2
    assert s.block_manager.num_free_gpu_blocks == 64


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_sequence_outgrowing_the_whole_cache_is_ignored_not_stuck(mode):
    s = make_sched(num_gpu=2, num_cpu=8, max_model_len=64, preemption_mode=mode)
    g = add(s, 0, range(BS))
    outs = run_to_end(s, max_out=30)
    assert any(g in o.ignored for o in outs)
    seq = g.seqs[0]
    assert seq.status is SequenceStatus.FINISHED_IGNORED
    assert BS < seq.get_len() <= 2 * BS + 1
    assert s.block_manager.num_free_gpu_blocks == 2 and s.block_manager.num_free_cpu_blocks == 8
    assert s.gpu_cache_usage == 0.0 and s.cpu_cache_usage == 0.0


class FakeDevice:
    """Pages as token lists: applies swaps/copies and writes rows like the runner, then checks
    that every row reads back exactly its own tokens through its block table."""

    def __init__(self, num_gpu, num_cpu):
        self.gpu = [[None] * BS for _ in range(num_gpu)]
        self.cpu = [[None] * BS for _ in range(num_cpu)]

    def run(self, out):
        for g, c in out.blocks_to_swap_out:
            self.cpu[c] = list(self.gpu[g])
        for c, g in out.blocks_to_swap_in:
            self.gpu[g] = list(self.cpu[c])
        for src, dst in out.blocks_to_copy:
            self.gpu[dst] = list(self.gpu[src])
        for r in out.scheduled:
            start = r.seq.num_computed_tokens
            for pos in range(start, start + r.num_new_tokens):
                self.gpu[r.block_table[pos // BS]][pos % BS] = r.seq.token_ids[pos]
        for r in out.scheduled:
            end = r.seq.num_computed_tokens + r.num_new_tokens
            seen = [self.gpu[r.block_table[p // BS]][p % BS] for p in range(end)]
            assert seen == r.seq.token_ids[:end], f"KV of seq {r.seq.seq_id} is corrupt"


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_kv_consistent(seed):
    """Forks (n=2), shared prefixes, aborts, tiny cache: the KV read back always matches."""
    rng = random.Random(seed)
    mode = ["recompute", "swap"][seed % 2]
    chunked = seed % 3 in (0, 1)
    num_gpu, num_cpu = 10, 12
    s = make_sched(num_gpu=num_gpu, num_cpu=num_cpu, max_model_len=64, prefix=seed % 2 == 0,
                   preemption_mode=mode, enable_chunked_prefill=chunked, max_num_seqs=6,
                   max_num_batched_tokens=24 if chunked else None,
                   token_buckets=[8, 16, 32] if seed % 3 == 1 else None)
    dev = FakeDevice(num_gpu, num_cpu)
    shared = [rng.randrange(50) for _ in range(2 * BS)]
    next_id, groups, limits = 1000, [], {}
    for i in range(12):
        prompt = shared[:rng.choice([0, BS, 2 * BS])] + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
        groups.append(add(s, i, prompt, params=SimpleNamespace(n=rng.choice([1, 2]), best_of=None)))
    steps = 0
    while s.has_unfinished_seqs():
        steps += 1
        assert steps < 3000
        out = s.schedule()
        check_rows(s, out)
        dev.run(out)
        s.on_step_done(out)
        for r in out.scheduled:
            if not r.do_sample:
                continue
            seq, g = r.seq, r.group
            fork = g.sampling_params.n == 2 and len(g.seqs) == 1 and seq.get_output_len() == 0
            if fork and rng.random() < 0.5:  # the engine may fork before or after the parent's append
                seq.append_token(rng.randrange(50), -1.0)
                fork_after = True
            else:
                fork_after = False
            if fork:
                child = s.fork_seq(g, seq, next_id)
                next_id += 1
                child.append_token(rng.randrange(50), -1.0)
                limits[child.seq_id] = rng.randrange(1, 12)
            if not fork_after:
                seq.append_token(rng.randrange(50), -1.0)
            for x in g.get_seqs(SequenceStatus.RUNNING):
                if x.get_output_len() >= limits.setdefault(x.seq_id, rng.randrange(1, 12)):
                    x.status = SequenceStatus.FINISHED_LENGTH
                    s.free_seq(x)
        s.free_finished_seq_groups()
        if rng.random() < 0.03:
            live = [g.request_id for g in list(s.running) + list(s.waiting) + list(s.swapped)]
            if live:
                s.abort_seq_group(rng.choice(live))
    assert all(g.is_finished() for g in groups)
    assert s.block_manager.num_free_gpu_blocks == num_gpu
    assert s.block_manager.num_free_cpu_blocks == num_cpu


@pytest.mark.parametrize("order", ["fork_first", "append_first", "parent_finished"])
def test_fork_gives_same_child_whatever_the_engine_order(order):
    s = make_sched()
    g = add(s, 0, range(BS + 3), params=SimpleNamespace(n=2, best_of=None))
    out = s.schedule()
    s.on_step_done(out)
    parent = g.seqs[0]
    if order == "fork_first":
        child = s.fork_seq(g, parent, 7)
        parent.append_token(11, -0.5)
    else:
        parent.append_token(11, -0.5)
        if order == "parent_finished":
            parent.status = SequenceStatus.FINISHED_STOPPED
            s.free_seq(parent)
        child = s.fork_seq(g, parent, 7)
    child.append_token(22, -0.25)
    assert child.status is SequenceStatus.RUNNING
    assert child.token_ids == list(range(BS + 3)) + [22]
    assert child.cumulative_logprob == -0.25 and child.output_token_ids == [22]
    assert parent.token_ids[-1] == 11
    s.free_finished_seq_groups()
    out = s.schedule()
    (row,) = [r for r in out.scheduled if r.seq is child]
    assert row.num_new_tokens == 1 and row.do_sample and not row.is_prefill
    assert len(out.scheduled) == (1 if order == "parent_finished" else 2)
    # The child's prompt pages survived the parent's release.
    assert row.block_table[0] == s.block_manager.get_block_table(child)[0]
    assert s.block_manager.gpu_ref_count(row.block_table[0]) == (1 if order == "parent_finished" else 2)


def test_group_needing_more_seqs_than_max_num_seqs_is_ignored_not_stuck():
    s = make_sched(max_num_seqs=2)
    g = add(s, 0, range(4), params=SimpleNamespace(n=3, best_of=None))
    ok = add(s, 1, range(4))
    out = s.schedule()
    assert out.ignored == [g] and [r.group for r in out.scheduled] == [ok]
