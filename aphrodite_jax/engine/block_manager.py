"""KV-cache page bookkeeping on the host: page tables, ref counts, copy-on-write, prefix caching, swap.

Pure Python, no JAX. The device holds `num_gpu_blocks` pages (ids 0..num_gpu_blocks-1) of
`block_size` tokens; the host holds `num_cpu_blocks` swap pages. A sequence's block table maps its
logical page i (tokens i*block_size .. (i+1)*block_size-1) to a physical page.

Interface (all take `Sequence` / `SequenceGroup` from sequence.py):
- `BlockManager(num_gpu_blocks, num_cpu_blocks, block_size, enable_prefix_caching=False, watermark=0.01)`
- `can_allocate(group) -> AllocStatus` (OK / LATER / NEVER; truthy only when OK) and
  `allocate(group)`: pages for every token of each WAITING seq. With prefix caching the longest
  cached prefix of full pages is reused (never the page holding the last token, so at least one
  token is left to compute) and `seq.num_computed_tokens` is set to the reused token count.
- `can_append_slots(group, num_tokens=1)`, `append_slots(seq, num_tokens) -> [(src, dst)]`: make
  the table cover `seq.num_computed_tokens + num_tokens` tokens; a shared page that will be written
  is copied first (copy-on-write; the runner copies page src to dst on device before the step).
- `fork(parent, child)`: the child shares all the parent's pages (ref counts +1).
- `free(seq)`: drop the seq's pages (idempotent); cached pages stay reusable until evicted (LRU).
- `can_swap_out(group)`, `swap_out(group) -> [(gpu, cpu)]`, `can_swap_in(group)`,
  `swap_in(group) -> [(cpu, gpu)]`: the RUNNING (resp. SWAPPED) seqs of the group; the scheduler
  changes statuses.
- `mark_blocks_computed(seq)`: full pages whose tokens are all computed become cacheable.
- `get_block_table(seq) -> list[int]`, `num_free_gpu_blocks`, `num_free_cpu_blocks`,
  `get_num_cached_tokens(seq)` (prefix-cache hit at allocation), `peek_num_cached_tokens(seq)`.
Page key for prefix caching: hash((parent page key, tuple(page tokens))), chained from the first page.
"""
from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Optional

from aphrodite_jax.engine.sequence import Sequence, SequenceGroup, SequenceStatus


class AllocStatus(enum.Enum):
    OK = enum.auto()
    LATER = enum.auto()   # not enough free pages now
    NEVER = enum.auto()   # the request can never fit in the cache

    def __bool__(self) -> bool:
        return self is AllocStatus.OK


class _HostPool:
    """Swap pages on the host: ref counts and a free list."""

    def __init__(self, n: int) -> None:
        self.ref = [0] * n
        self.free: deque[int] = deque(range(n))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def alloc(self) -> int:
        b = self.free.popleft()
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        assert self.ref[b] > 0, f"double free of host page {b}"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free.append(b)


class _DevicePool:
    """Device pages with ref counts; free pages that hold cached content wait in an LRU evictor."""

    def __init__(self, n: int) -> None:
        self.ref = [0] * n
        self.free: deque[int] = deque(range(n))           # free, no cached content
        self.evictor: "OrderedDict[int, int]" = OrderedDict()  # free, cached: page -> key (oldest first)
        self.key_to_page: dict[int, int] = {}
        self.page_to_key: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictor)

    def alloc(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, key = self.evictor.popitem(last=False)
            del self.key_to_page[key]
            del self.page_to_key[b]
            self.num_evictions += 1
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.evictor.pop(b)  # a cache hit on a free page takes it out of the evictor
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        assert self.ref[b] > 0, f"double free of device page {b}"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            key = self.page_to_key.get(b)
            if key is None:
                self.free.append(b)
            else:
                self.evictor[b] = key  # most recently used at the end

    def lookup(self, key: int) -> Optional[int]:
        return self.key_to_page.get(key)

    def register(self, b: int, key: int) -> None:
        if key in self.key_to_page or b in self.page_to_key:
            return  # same content already cached elsewhere, or page already keyed
        self.key_to_page[key] = b
        self.page_to_key[b] = key


class BlockManager:
    """Maps sequences to KV pages; see the module docstring for the contract."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False, watermark: float = 0.01) -> None:
        if num_gpu_blocks <= 0 or block_size <= 0 or num_cpu_blocks < 0:
            raise ValueError("num_gpu_blocks and block_size must be positive, num_cpu_blocks >= 0")
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self._gpu = _DevicePool(num_gpu_blocks)
        self._cpu = _HostPool(num_cpu_blocks)
        self._gpu_tables: dict[int, list[int]] = {}
        self._cpu_tables: dict[int, list[int]] = {}
        self._keys: dict[int, list[int]] = {}      # seq_id -> chained keys of its full pages
        self._marked: dict[int, int] = {}          # seq_id -> pages already offered to the cache
        self._num_cached: dict[int, int] = {}      # seq_id -> tokens reused at allocation
        # Prefix-cache statistics (pages).
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    # ---- counters -------------------------------------------------------------------------
    @property
    def num_free_gpu_blocks(self) -> int:
        return self._gpu.num_free

    @property
    def num_free_cpu_blocks(self) -> int:
        return self._cpu.num_free

    @property
    def num_evictions(self) -> int:
        return self._gpu.num_evictions

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def gpu_ref_count(self, page: int) -> int:
        return self._gpu.ref[page]

    def get_block_table(self, seq: Sequence) -> list[int]:
        return list(self._gpu_tables[seq.seq_id])

    def get_cpu_block_table(self, seq: Sequence) -> list[int]:
        return list(self._cpu_tables[seq.seq_id])

    def has_gpu_blocks(self, seq: Sequence) -> bool:
        return seq.seq_id in self._gpu_tables

    def has_blocks(self, seq: Sequence) -> bool:
        return seq.seq_id in self._gpu_tables or seq.seq_id in self._cpu_tables

    def get_num_cached_tokens(self, seq: Sequence) -> int:
        return self._num_cached.get(seq.seq_id, 0)

    # ---- prefix keys ----------------------------------------------------------------------
    def _page_keys(self, seq: Sequence, num_pages: int) -> list[int]:
        """Chained keys of the first `num_pages` full pages of seq (cached per seq, extended lazily)."""
        keys = self._keys.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(keys) < num_pages:
            i = len(keys)
            parent = keys[-1] if keys else None
            keys.append(hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))))
        return keys

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages for the longest prefix of full pages, excluding the page of the last token."""
        if not self.enable_prefix_caching:
            return []
        max_pages = (seq.get_len() - 1) // self.block_size
        pages = []
        for key in self._page_keys(seq, max_pages)[:max_pages]:
            b = self._gpu.lookup(key)
            if b is None:
                break
            pages.append(b)
        return pages

    def peek_num_cached_tokens(self, seq: Sequence) -> int:
        """Tokens `allocate` would reuse from the prefix cache right now (no side effects on pages)."""
        return len(self._cached_prefix(seq)) * self.block_size

    def _num_pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------------
    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        total = 0
        drop = 0  # how far the free count falls
        for seq in group.get_seqs(SequenceStatus.WAITING):
            n = self._num_pages(seq.get_len())
            hits_in_use = sum(1 for b in self._cached_prefix(seq) if self._gpu.ref[b] > 0)
            total += n
            drop += n - hits_in_use
        if total > self.num_gpu_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        if self._gpu.num_free - drop >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def allocate(self, group: SequenceGroup) -> None:
        for seq in group.get_seqs(SequenceStatus.WAITING):
            if seq.seq_id in self._gpu_tables:
                raise RuntimeError(f"sequence {seq.seq_id} already has pages")
            hits = self._cached_prefix(seq)
            if self.enable_prefix_caching:
                self.num_prefix_queries += (seq.get_len() - 1) // self.block_size
                self.num_prefix_hits += len(hits)
            for b in hits:
                self._gpu.incref(b)
            n = self._num_pages(seq.get_len())
            table = hits + [self._gpu.alloc() for _ in range(n - len(hits))]
            self._gpu_tables[seq.seq_id] = table
            self._marked[seq.seq_id] = len(hits)
            self._num_cached[seq.seq_id] = len(hits) * self.block_size
            seq.num_computed_tokens = len(hits) * self.block_size

    def _slots_needed(self, seq: Sequence, num_tokens: int) -> int:
        table = self._gpu_tables[seq.seq_id]
        start = seq.num_computed_tokens
        end = start + num_tokens
        if num_tokens <= 0:
            return 0
        first, last = start // self.block_size, (end - 1) // self.block_size
        cow = sum(1 for i in range(first, min(last + 1, len(table))) if self._gpu.ref[table[i]] > 1)
        return cow + max(0, last + 1 - len(table))

    def can_append_slots(self, group: SequenceGroup, num_tokens: int = 1) -> bool:
        need = sum(self._slots_needed(s, num_tokens) for s in group.get_seqs(SequenceStatus.RUNNING))
        return need <= self._gpu.num_free

    def append_slots(self, seq: Sequence, num_tokens: int = 1) -> list[tuple[int, int]]:
        """Cover tokens up to num_computed + num_tokens; returns (src, dst) page copies to run first."""
        table = self._gpu_tables[seq.seq_id]
        if num_tokens <= 0:
            return []
        bs = self.block_size
        start = seq.num_computed_tokens
        first, last = start // bs, (start + num_tokens - 1) // bs
        copies = []
        for i in range(first, min(last + 1, len(table))):
            b = table[i]
            if self._gpu.ref[b] > 1:  # shared page about to be written: copy on write
                nb = self._gpu.alloc()
                self._gpu.decref(b)
                table[i] = nb
                if i * bs < start:  # the page holds tokens before the write: keep them
                    copies.append((b, nb))
        while len(table) < last + 1:
            table.append(self._gpu.alloc())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        table = self._gpu_tables[parent.seq_id]
        for b in table:
            self._gpu.incref(b)
        self._gpu_tables[child.seq_id] = list(table)
        self._keys[child.seq_id] = list(self._keys.get(parent.seq_id, []))
        self._marked[child.seq_id] = self._marked.get(parent.seq_id, 0)
        self._num_cached[child.seq_id] = self._num_cached.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Release the seq's pages, last page first so a prefix outlives its continuation in the LRU."""
        table = self._gpu_tables.pop(seq.seq_id, None)
        if table is not None:
            for b in reversed(table):
                self._gpu.decref(b)
        cpu_table = self._cpu_tables.pop(seq.seq_id, None)
        if cpu_table is not None:
            for b in reversed(cpu_table):
                self._cpu.decref(b)
        self._keys.pop(seq.seq_id, None)
        self._marked.pop(seq.seq_id, None)
        self._num_cached.pop(seq.seq_id, None)

    def mark_blocks_computed(self, seq: Sequence) -> None:
        """Offer the seq's full, computed pages to the prefix cache (called after each step)."""
        if not self.enable_prefix_caching:
            return
        table = self._gpu_tables.get(seq.seq_id)
        if table is None:
            return
        n_full = min(seq.num_computed_tokens // self.block_size, len(table))
        start = self._marked.get(seq.seq_id, 0)
        if n_full <= start:
            return
        keys = self._page_keys(seq, n_full)
        for i in range(start, n_full):
            self._gpu.register(table[i], keys[i])
        self._marked[seq.seq_id] = n_full

    # ---- swap -----------------------------------------------------------------------------
    def _unique_pages(self, tables: list[list[int]]) -> int:
        return len({b for t in tables for b in t})

    def can_swap_out(self, group: SequenceGroup) -> bool:
        tables = [self._gpu_tables[s.seq_id] for s in group.get_seqs(SequenceStatus.RUNNING)]
        return self._unique_pages(tables) <= self._cpu.num_free

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        mapping: dict[int, int] = {}
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            cpu_table = []
            for b in self._gpu_tables.pop(seq.seq_id):
                if b in mapping:
                    self._cpu.incref(mapping[b])
                else:
                    mapping[b] = self._cpu.alloc()
                cpu_table.append(mapping[b])
                self._gpu.decref(b)
            self._cpu_tables[seq.seq_id] = cpu_table
            self._marked[seq.seq_id] = 0
        return list(mapping.items())

    def can_swap_in(self, group: SequenceGroup) -> bool:
        seqs = group.get_seqs(SequenceStatus.SWAPPED)
        need = self._unique_pages([self._cpu_tables[s.seq_id] for s in seqs]) + len(seqs)
        return self._gpu.num_free - need >= self.watermark_blocks

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        mapping: dict[int, int] = {}
        for seq in group.get_seqs(SequenceStatus.SWAPPED):
            table = []
            for c in self._cpu_tables.pop(seq.seq_id):
                if c in mapping:
                    self._gpu.incref(mapping[c])
                else:
                    mapping[c] = self._gpu.alloc()
                table.append(mapping[c])
                self._cpu.decref(c)
            self._gpu_tables[seq.seq_id] = table
            self._marked[seq.seq_id] = 0
        return list(mapping.items())
