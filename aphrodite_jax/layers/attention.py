"""Self-attention over the paged KV cache, split over the 'model' mesh axis by KV heads.

QKV is one matmul. Its fused column layout, for attention split over a = attn_tp devices, is
[a, qs + 2*ks, D] flattened, each device's contiguous block being [its qs q heads | its ks k heads | its
ks v heads] (qs = Hq/a, ks = stored KV heads / a). With a = 1 it is the plain [q | k | v]. KV heads are
repeated at load time when there are fewer of them than devices (see distributed.sharding.plan_attention);
when heads cannot be split evenly, attention is replicated (a = 1) and the rest of the model stays split.

The kernel call runs under jax.shard_map: each device attends with its own heads against its own slice
of the KV cache [P, page, 2*Hkv/a, D] (K/V interleaved, so whole KV heads are contiguous).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import ragged_paged_attention
from aphrodite_jax.distributed.mesh import MODEL_AXIS
from aphrodite_jax.distributed.sharding import plan_attention
from aphrodite_jax.layers.attention_metadata import AttentionMetadata
from aphrodite_jax.layers.linear import Linear
from aphrodite_jax.layers.loading import load_fused, load_linear
from aphrodite_jax.layers.norm import RMSNorm
from aphrodite_jax.layers.rotary import RopeSpec, apply_rope


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, head_dim: int, attn_tp: int,
             kv_repeat: int) -> np.ndarray:
    """HF q [Hq*D, ...], k/v [Hkv*D, ...] (weights [out, in] or biases [out]) -> fused rows in the
    layout above, [(Hq + 2*Hkv*kv_repeat) * D, ...]. Transpose weights afterwards for [in, out]."""
    rest = q.shape[1:]
    a = attn_tp
    qh = q.reshape(a, -1, head_dim, *rest)  # [a, qs, D, ...]
    kh = np.repeat(k.reshape(-1, head_dim, *rest), kv_repeat, axis=0).reshape(a, -1, head_dim, *rest)
    vh = np.repeat(v.reshape(-1, head_dim, *rest), kv_repeat, axis=0).reshape(a, -1, head_dim, *rest)
    return np.concatenate([qh, kh, vh], axis=1).reshape(-1, *rest)


def paged_attention(q, k, v, kv_cache, md: AttentionMetadata, *, sm_scale: float,
                    sliding_window: Optional[int], mesh: Optional[Mesh], sharded: bool,
                    soft_cap: Optional[float] = None, backend: str = "auto"):
    """q [T, Hq, D], k/v [T, Hkv, D], kv_cache [P, page, 2*Hkv, D] -> (out [T, Hq, D], kv_cache).

    backend: the attention backend's name (pallas_kernels/backends.py), resolved once when the engine
    starts; a static value, so the traced step calls that backend directly."""
    def call(q, k, v, cache, kv_lens, pages, cu, ns):
        return ragged_paged_attention(q, k, v, cache, kv_lens, pages, cu, ns, sm_scale=sm_scale,
                                      sliding_window=sliding_window, soft_cap=soft_cap, impl=backend)

    args = (q, k, v, kv_cache, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs)
    if mesh is None or not sharded:
        return call(*args)
    heads = P(None, MODEL_AXIS, None)
    cache = P(None, None, MODEL_AXIS, None)
    fn = jax.shard_map(call, mesh=mesh, in_specs=(heads, heads, heads, cache, P(), P(), P(), P()),
                       out_specs=(heads, cache), check_vma=False)
    return fn(*args)


class PagedAttention(nnx.Module):
    """Llama-style attention: fused QKV (+bias), optional per-head q/k RMSNorm (Qwen3), RoPE, o_proj.

    sm_scale multiplies q.k (d ** -0.5 unless the family says otherwise); soft_cap, when set, caps the
    scores as cap * tanh(s / cap) before the softmax."""

    def __init__(self, *, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, rope: RopeSpec,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool, norm_eps: float,
                 sliding_window: Optional[int], dtype, rngs: nnx.Rngs, mesh: Optional[Mesh], tp_size: int,
                 sm_scale: Optional[float] = None, soft_cap: Optional[float] = None, norm_offset: bool = False,
                 attention_backend: str = "auto"):
        self.attn_tp, self.kv_heads_stored = plan_attention(num_heads, num_kv_heads, tp_size)
        self.attention_backend = attention_backend
        self.kv_repeat = self.kv_heads_stored // num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.sliding_window, self.mesh = rope, sliding_window, mesh
        self.sm_scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
        self.soft_cap = None if soft_cap is None else float(soft_cap)
        heads_axis = "heads" if self.attn_tp > 1 else None
        qkv_out = (num_heads + 2 * self.kv_heads_stored) * head_dim
        self.qkv = Linear(hidden, qkv_out, use_bias=qkv_bias, dtype=dtype, rngs=rngs, axes=("embed", heads_axis))
        self.o_proj = Linear(num_heads * head_dim, hidden, use_bias=o_bias, dtype=dtype, rngs=rngs,
                             axes=(heads_axis, "embed"))
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype, rngs=rngs, offset=norm_offset)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype, rngs=rngs, offset=norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, kv_cache: jax.Array, md: AttentionMetadata):
        t = x.shape[0]
        a, d = self.attn_tp, self.head_dim
        qs, ks = self.num_heads // a, self.kv_heads_stored // a
        qkv = self.qkv(x).reshape(t, a, qs + 2 * ks, d)  # [T, a, qs+2ks, D]
        q = qkv[:, :, :qs].reshape(t, self.num_heads, d)  # [T, Hq, D]
        k = qkv[:, :, qs:qs + ks].reshape(t, self.kv_heads_stored, d)  # [T, Hkv', D]
        v = qkv[:, :, qs + ks:].reshape(t, self.kv_heads_stored, d)  # [T, Hkv', D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, md.positions, self.rope)
        k = apply_rope(k, md.positions, self.rope)
        out, kv_cache = paged_attention(q, k, v, kv_cache, md, sm_scale=self.sm_scale,
                                        sliding_window=self.sliding_window, mesh=self.mesh,
                                        sharded=self.attn_tp > 1, soft_cap=self.soft_cap,
                                        backend=self.attention_backend)
        return self.o_proj(out.reshape(t, self.num_heads * d)), kv_cache  # [T, H]

    def hf_children(self) -> dict:
        return {"q_norm": self.q_norm, "k_norm": self.k_norm} if self.q_norm is not None else {}

    def load_hf(self, rel: str, value, session, full_name: str) -> None:
        """q/k/v_proj (weight and bias) fuse into qkv once all three are in; o_proj loads as is."""
        proj, _, kind = rel.partition(".")
        if proj == "o_proj":
            return load_linear(self.o_proj, kind, value, session, full_name)
        load_fused(self.qkv, kind, proj, value, ("q_proj", "k_proj", "v_proj"), self._fuse_qkv, session, full_name)

    def _fuse_qkv(self, parts: dict, kind: str):
        fused = fuse_qkv(parts["q_proj"], parts["k_proj"], parts["v_proj"], self.head_dim, self.attn_tp,
                         self.kv_repeat)  # [(Hq + 2*Hkv') * D, ...]
        return fused.T if kind == "weight" else fused
