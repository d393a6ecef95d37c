"""Random ragged paged-attention batches and a dense NumPy oracle, shared by the kernel tests.

A batch mixes decode rows (q_len 1), full prefill rows (q_len == kv_len) and chunked-prefill rows whose
earlier context already sits in the cache, then padding sequence rows (past num_seqs) and padding query
rows (past cu_q_lens[num_seqs]). The cache starts filled with random values everywhere, so a kernel that
reads a wrong slot or forgets to write one gives a wrong answer.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Batch:
    q: np.ndarray  # [T, Hq, D]
    k: np.ndarray  # [T, Hkv, D]
    v: np.ndarray  # [T, Hkv, D]
    kv_cache: np.ndarray  # [P, page_size, 2*Hkv, D]
    kv_lens: np.ndarray  # i32[S]
    page_indices: np.ndarray  # i32[S, pages_per_seq]
    cu_q_lens: np.ndarray  # i32[S+1]
    num_seqs: np.ndarray  # i32[1]

    def args(self):
        """The positional arguments of ragged_paged_attention, as device arrays."""
        import jax.numpy as jnp
        return tuple(jnp.asarray(a) for a in (self.q, self.k, self.v, self.kv_cache, self.kv_lens, self.page_indices,
                                              self.cu_q_lens, self.num_seqs))


def make_batch(rng: np.random.Generator, *, seqs: list[tuple[int, int]], page_size: int, num_kv_heads: int,
               group: int, head_dim: int, pad_seqs: int = 2, pad_tokens: int = 3,
               extra_pages: int = 3) -> Batch:
    """Build a batch from (q_len, kv_len) pairs; each sequence gets distinct random pages of one pool."""
    n = len(seqs)
    pages_needed = [-(-kv // page_size) for _, kv in seqs]
    pages_per_seq = max(pages_needed) + 1  # a spare column, so table ends are exercised
    num_pages = sum(pages_needed) + extra_pages
    perm = rng.permutation(num_pages)
    s_total = n + pad_seqs
    # Unused table entries point at random (valid) pages, as a stale table would.
    table = rng.integers(0, num_pages, size=(s_total, pages_per_seq)).astype(np.int32)
    off = 0
    for i, p in enumerate(pages_needed):
        table[i, :p] = perm[off:off + p]
        off += p
    q_lens = [q for q, _ in seqs]
    cu = np.zeros(s_total + 1, np.int32)
    cu[1:n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    kv_lens = np.zeros(s_total, np.int32)
    kv_lens[:n] = [kv for _, kv in seqs]
    kv_lens[n:] = rng.integers(1, page_size * pages_per_seq, size=pad_seqs)  # must be ignored
    t = int(cu[n]) + pad_tokens
    hq = num_kv_heads * group
    f = np.float32
    return Batch(
        q=rng.standard_normal((t, hq, head_dim)).astype(f),
        k=rng.standard_normal((t, num_kv_heads, head_dim)).astype(f),
        v=rng.standard_normal((t, num_kv_heads, head_dim)).astype(f),
        kv_cache=rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)).astype(f),
        kv_lens=kv_lens, page_indices=table, cu_q_lens=cu, num_seqs=np.array([n], np.int32))


def random_seqs(rng: np.random.Generator, *, n_decode: int, n_prefill: int, n_chunked: int,
                max_len: int) -> list[tuple[int, int]]:
    """(q_len, kv_len) pairs in a shuffled order: decode, full prefill and chunked prefill rows."""
    seqs = [(1, int(rng.integers(1, max_len + 1))) for _ in range(n_decode)]
    for _ in range(n_prefill):
        L = int(rng.integers(1, max_len + 1))
        seqs.append((L, L))
    for _ in range(n_chunked):
        kv = int(rng.integers(3, max_len + 1))
        seqs.append((int(rng.integers(2, kv)), kv))
    order = rng.permutation(len(seqs))
    return [seqs[i] for i in order]


def expected_cache(b: Batch) -> np.ndarray:
    """The cache after this step's K/V are written: token i of a sequence lands at its absolute position."""
    cache = b.kv_cache.copy()
    page_size = cache.shape[1]
    hkv = b.k.shape[1]
    for s in range(int(b.num_seqs[0])):
        q0, q1 = int(b.cu_q_lens[s]), int(b.cu_q_lens[s + 1])
        kv_len = int(b.kv_lens[s])
        for t in range(q0, q1):
            pos = kv_len - (q1 - t)
            page, slot = b.page_indices[s, pos // page_size], pos % page_size
            for h in range(hkv):
                cache[page, slot, 2 * h] = b.k[t, h]
                cache[page, slot, 2 * h + 1] = b.v[t, h]
    return cache


def dense_attention(b: Batch, *, sm_scale: float, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Naive masked attention in float64 over each sequence's logical K/V (context from the old cache,
    this step's tokens from k/v). Padding rows give zeros."""
    t_total, hq, d = b.q.shape
    hkv = b.k.shape[1]
    group = hq // hkv
    page_size = b.kv_cache.shape[1]
    out = np.zeros((t_total, hq, d), np.float64)
    for s in range(int(b.num_seqs[0])):
        q0, q1 = int(b.cu_q_lens[s]), int(b.cu_q_lens[s + 1])
        q_len, kv_len = q1 - q0, int(b.kv_lens[s])
        ctx = kv_len - q_len
        keys = np.zeros((kv_len, hkv, d))  # [L, Hkv, D]
        vals = np.zeros((kv_len, hkv, d))
        for p in range(ctx):
            row = b.kv_cache[b.page_indices[s, p // page_size], p % page_size]  # [2Hkv, D]
            keys[p], vals[p] = row[0::2], row[1::2]
        keys[ctx:], vals[ctx:] = b.k[q0:q1], b.v[q0:q1]
        qpos = ctx + np.arange(q_len)  # [q]
        kpos = np.arange(kv_len)  # [L]
        mask = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > qpos[:, None] - sliding_window
        for h in range(hq):
            kh = h // group
            sc = (b.q[q0:q1, h].astype(np.float64) * sm_scale) @ keys[:, kh].T  # [q, L]
            if soft_cap is not None:
                sc = soft_cap * np.tanh(sc / soft_cap)
            sc = np.where(mask, sc, -np.inf)
            w = np.exp(sc - sc.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[q0:q1, h] = w @ vals[:, kh]
    return out
