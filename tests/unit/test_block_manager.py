"""BlockManager: page accounting, ref counts, copy-on-write, prefix cache hits and LRU eviction, swap."""
from aphrodite_jax.engine.block_manager import AllocStatus, BlockManager
from aphrodite_jax.engine.sequence import Sequence, SequenceGroup, SequenceStatus

BS = 4


def make_group(seq_id, tokens, rid=None):
    seq = Sequence(seq_id, list(tokens))
    return SequenceGroup(rid or f"r{seq_id}", [seq], arrival_time=float(seq_id)), seq


def admit(bm, seq_id, tokens):
    group, seq = make_group(seq_id, tokens)
    assert bm.can_allocate(group) is AllocStatus.OK
    bm.allocate(group)
    seq.status = SequenceStatus.RUNNING
    return group, seq


def compute_all(bm, seq):
    seq.num_computed_tokens = seq.get_len()
    bm.mark_blocks_computed(seq)


def test_allocate_covers_prompt_and_free_returns_everything():
    bm = BlockManager(10, 0, BS, watermark=0.0)
    _, a = admit(bm, 1, range(9))      # 3 pages
    _, b = admit(bm, 2, range(100, 104))  # 1 page
    ta, tb = bm.get_block_table(a), bm.get_block_table(b)
    assert len(ta) == 3 and len(tb) == 1
    assert not set(ta) & set(tb)
    assert all(0 <= p < 10 for p in ta + tb)
    assert bm.num_free_gpu_blocks == 10 - 4
    assert all(bm.gpu_ref_count(p) == 1 for p in ta + tb)
    bm.free(a)
    bm.free(a)  # idempotent
    bm.free(b)
    assert bm.num_free_gpu_blocks == 10


def test_can_allocate_never_and_later():
    bm = BlockManager(4, 0, BS, watermark=0.0)
    big, _ = make_group(1, range(4 * BS + 1))
    assert bm.can_allocate(big) is AllocStatus.NEVER
    assert not bm.can_allocate(big)
    admit(bm, 2, range(3 * BS))
    g, _ = make_group(3, range(2 * BS))
    assert bm.can_allocate(g) is AllocStatus.LATER


def test_append_slots_grows_table_only_at_page_boundary():
    bm = BlockManager(8, 0, BS, watermark=0.0)
    _, s = admit(bm, 1, range(BS))
    compute_all(bm, s)
    s.append_token(7, 0.0)
    assert bm.can_append_slots(SequenceGroup("x", [s], 0.0), 1)
    assert bm.append_slots(s, 1) == []
    assert len(bm.get_block_table(s)) == 2
    s.num_computed_tokens += 1
    s.append_token(8, 0.0)
    bm.append_slots(s, 1)
    assert len(bm.get_block_table(s)) == 2


def test_fork_shares_pages_and_copy_on_write_of_partial_last_page():
    bm = BlockManager(8, 0, BS, watermark=0.0)
    group, parent = admit(bm, 1, range(BS + 2))  # 2 pages, last one half full
    compute_all(bm, parent)
    child = parent.fork(2)
    bm.fork(parent, child)
    group.add(child)
    table = bm.get_block_table(parent)
    assert bm.get_block_table(child) == table
    assert all(bm.gpu_ref_count(p) == 2 for p in table)
    free_before = bm.num_free_gpu_blocks
    parent.append_token(50, 0.0)
    child.append_token(51, 0.0)
    copies = bm.append_slots(parent, 1)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == table[1] and dst != src
    assert bm.get_block_table(parent) == [table[0], dst]
    assert bm.gpu_ref_count(src) == 1 and bm.gpu_ref_count(table[0]) == 2
    assert bm.append_slots(child, 1) == []  # now the only owner: writes in place
    assert bm.get_block_table(child) == table
    assert bm.num_free_gpu_blocks == free_before - 1
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_gpu_blocks == 8


def test_fork_with_full_last_page_needs_no_copy():
    bm = BlockManager(8, 0, BS, watermark=0.0)
    group, parent = admit(bm, 1, range(2 * BS))
    compute_all(bm, parent)
    child = parent.fork(2)
    bm.fork(parent, child)
    group.add(child)
    for s in (parent, child):
        s.append_token(1, 0.0)
    assert bm.append_slots(parent, 1) == []
    assert bm.append_slots(child, 1) == []
    tp, tc = bm.get_block_table(parent), bm.get_block_table(child)
    assert tp[:2] == tc[:2] and tp[2] != tc[2]


def test_prefix_cache_reuses_full_pages_and_leaves_one_token():
    bm = BlockManager(16, 0, BS, enable_prefix_caching=True, watermark=0.0)
    prompt = list(range(3 * BS + 1))
    _, a = admit(bm, 1, prompt)
    assert a.num_computed_tokens == 0
    compute_all(bm, a)
    _, b = admit(bm, 2, prompt)
    assert b.num_computed_tokens == 3 * BS
    assert bm.get_num_cached_tokens(b) == 3 * BS
    assert bm.get_block_table(b)[:3] == bm.get_block_table(a)[:3]
    assert bm.get_block_table(b)[3] != bm.get_block_table(a)[3]
    assert bm.num_prefix_hits == 3
    # An exact multiple of the page size: the last page is recomputed, not shared.
    _, c = admit(bm, 3, prompt[:2 * BS])
    assert c.num_computed_tokens == BS
    assert c.num_computed_tokens < c.get_len()


def test_prefix_key_is_chained_over_previous_pages():
    bm = BlockManager(16, 0, BS, enable_prefix_caching=True, watermark=0.0)
    _, a = admit(bm, 1, [1] * BS + [2] * BS + [0])
    compute_all(bm, a)
    # Same second page, different first page: no hit at all.
    _, b = admit(bm, 2, [9] * BS + [2] * BS + [0])
    assert b.num_computed_tokens == 0
    # Same first page only: one page hit.
    _, c = admit(bm, 3, [1] * BS + [3] * BS + [0])
    assert c.num_computed_tokens == BS


def test_cached_free_pages_count_as_free_and_are_evicted_lru():
    n = 7
    bm = BlockManager(n, 0, BS, enable_prefix_caching=True, watermark=0.0)
    _, a = admit(bm, 1, [1] * BS + [1])   # 2 pages, the first becomes cached
    compute_all(bm, a)
    _, b = admit(bm, 2, [2] * BS + [2])
    compute_all(bm, b)
    b_first = bm.get_block_table(b)[0]
    bm.free(a)  # freed first: least recently used
    bm.free(b)
    assert bm.num_free_gpu_blocks == n
    assert bm.peek_num_cached_tokens(Sequence(9, [1] * BS + [5])) == BS
    # Six fresh pages: only five hold no cached content, so one cached page is evicted: a's.
    _, c = admit(bm, 3, [7] * (5 * BS + 1))
    assert bm.num_evictions == 1
    assert bm.peek_num_cached_tokens(Sequence(10, [1] * BS + [5])) == 0
    assert bm.peek_num_cached_tokens(Sequence(11, [2] * BS + [5])) == BS
    bm.free(c)
    assert bm.num_free_gpu_blocks == n
    # A hit on a free cached page reuses that very page and takes it out of the free pool.
    _, d = admit(bm, 4, [2] * BS + [6])
    assert d.num_computed_tokens == BS
    assert bm.get_block_table(d)[0] == b_first
    assert bm.num_free_gpu_blocks == n - 2
    bm.free(d)
    assert bm.num_free_gpu_blocks == n


def test_swap_out_and_in_round_trip_maps_shared_pages_once():
    bm = BlockManager(8, 8, BS, watermark=0.0)
    group, parent = admit(bm, 1, range(BS + 2))
    compute_all(bm, parent)
    child = parent.fork(2)
    child.status = SequenceStatus.RUNNING
    bm.fork(parent, child)
    group.add(child)
    assert bm.can_swap_out(group)
    out_map = bm.swap_out(group)
    assert len(out_map) == 2  # two unique pages, shared by both seqs
    assert bm.num_free_gpu_blocks == 8 and bm.num_free_cpu_blocks == 6
    assert bm.get_cpu_block_table(parent) == bm.get_cpu_block_table(child)
    for s in group.get_seqs():
        s.status = SequenceStatus.SWAPPED
    assert bm.can_swap_in(group)
    in_map = bm.swap_in(group)
    assert sorted(c for c, _ in in_map) == sorted(c for _, c in out_map)
    assert bm.num_free_cpu_blocks == 8
    assert bm.get_block_table(parent) == bm.get_block_table(child)
    assert all(bm.gpu_ref_count(p) == 2 for p in bm.get_block_table(parent))
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_gpu_blocks == 8


def test_can_swap_out_false_when_host_pool_too_small():
    bm = BlockManager(8, 1, BS, watermark=0.0)
    group, _ = admit(bm, 1, range(2 * BS))
    assert not bm.can_swap_out(group)
