"""The one decoder-only model, built from a DecoderSpec (models/spec.py); every family is a spec of it.

`Model(hf_config, *, dtype, rngs, mesh=None, attention_backend="auto")` (a pallas_kernels backend name);
`model(input_ids i32[T], kv_caches, md) -> (hidden [T, H], kv_caches)`; `compute_logits(hidden [N, H]) ->
f32[N, V]`; `load_weights((hf_name, array HF layout))`.
models/registry.py makes one subclass per HF architecture, named as HF names it, whose `build_spec` is the
family's spec function.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aphrodite_jax.distributed.mesh import MODEL_AXIS, mesh_tp_size
from aphrodite_jax.distributed.sharding import plan_attention, shard_dim_if_divisible
from aphrodite_jax.layers.attention import PagedAttention
from aphrodite_jax.layers.attention_metadata import AttentionMetadata
from aphrodite_jax.layers.embed import Embedding
from aphrodite_jax.layers.linear import Linear
from aphrodite_jax.layers.loading import LoadSession, load_linear, load_tensor
from aphrodite_jax.layers.mlp import GatedMLP
from aphrodite_jax.layers.norm import RMSNorm
from aphrodite_jax.models.spec import DecoderSpec


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(input_norm(x)), then + mlp(post_norm(x)) (post_norm is the norm before the
    MLP, HF's `post_attention_layernorm`). With sandwich norms each block's output is normed again before
    its residual add (HF Gemma 2 names); with a parallel residual both blocks read the same x."""

    def __init__(self, spec: DecoderSpec, index: int, *, dtype, rngs: nnx.Rngs, mesh: Optional[Mesh], tp: int,
                 attention_backend: str = "auto"):
        if spec.mlp_kind(index) != "dense":
            raise NotImplementedError(f"MoE layers are not supported yet (layer {index}: {spec.mlp_kind(index)})")
        kind = spec.layer_attention[index]

        def norm():
            return RMSNorm(spec.hidden_size, eps=spec.norm_eps, dtype=dtype, rngs=rngs, offset=spec.norm_offset)

        self.input_norm = norm()
        self.attn = PagedAttention(
            hidden=spec.hidden_size, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim, rope=kind.rope, qkv_bias=spec.qkv_bias, o_bias=spec.o_bias,
            qk_norm=spec.qk_norm, norm_eps=spec.norm_eps, sliding_window=kind.sliding_window, dtype=dtype,
            rngs=rngs, mesh=mesh, tp_size=tp, sm_scale=spec.sm_scale, soft_cap=spec.attn_soft_cap,
            norm_offset=spec.norm_offset, attention_backend=attention_backend)
        self.post_norm = norm()
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, dtype=dtype, rngs=rngs, tp_size=tp,
                            act=spec.activation, bias=spec.mlp_bias)
        self.attn_out_norm = norm() if spec.sandwich_norms else None
        self.mlp_out_norm = norm() if spec.sandwich_norms else None
        self.parallel_residual = spec.parallel_residual

    def __call__(self, x, kv_cache, md):  # x [T, H]
        a, kv_cache = self.attn(self.input_norm(x), kv_cache, md)  # [T, H]
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        h = x if self.parallel_residual else x + a
        m = self.mlp(self.post_norm(h))  # [T, H]
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return (x + a + m if self.parallel_residual else h + m), kv_cache

    def hf_children(self) -> dict:
        children = {"self_attn": self.attn, "mlp": self.mlp, "input_layernorm": self.input_norm}
        if self.attn_out_norm is None:
            return {**children, "post_attention_layernorm": self.post_norm}
        return {**children, "post_attention_layernorm": self.attn_out_norm,
                "pre_feedforward_layernorm": self.post_norm, "post_feedforward_layernorm": self.mlp_out_norm}


class DecoderForCausalLM(nnx.Module):
    build_spec: Callable[..., DecoderSpec]  # set by the registry's subclass: hf_config -> DecoderSpec

    def __init__(self, hf_config, *, dtype=jnp.float32, rngs: nnx.Rngs, mesh: Optional[Mesh] = None,
                 attention_backend: str = "auto"):
        spec = type(self).build_spec(hf_config)
        tp = mesh_tp_size(mesh)
        self.mesh, self.dtype, self.tp_size = mesh, jnp.dtype(dtype), tp
        self.num_layers, self.head_dim = spec.num_layers, spec.head_dim
        self.vocab_size, self.hidden_size = spec.vocab_size, spec.hidden_size
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.embed_multiplier, self.final_soft_cap = spec.embed_multiplier, spec.final_soft_cap
        vocab_axis = shard_dim_if_divisible("vocab", spec.vocab_size, tp)
        self.embed = Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, rngs=rngs, vocab_axis=vocab_axis)
        self.layers = nnx.List([DecoderLayer(spec, i, dtype=dtype, rngs=rngs, mesh=mesh, tp=tp,
                                             attention_backend=attention_backend)
                                for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, eps=spec.norm_eps, dtype=dtype, rngs=rngs, offset=spec.norm_offset)
        self.lm_head = None if self.tie_word_embeddings else Linear(
            spec.hidden_size, spec.vocab_size, use_bias=False, dtype=dtype, rngs=rngs, axes=("embed", vocab_axis))

    @classmethod
    def kv_cache_spec(cls, hf_config, tp_size: int = 1) -> tuple[int, int, int]:
        """(num_layers, KV heads stored per layer (repeated for TP), head_dim); a layer's cache is
        [num_pages, page_size, 2 * heads, head_dim]."""
        spec = cls.build_spec(hf_config)
        _, stored = plan_attention(spec.num_heads, spec.num_kv_heads, tp_size)
        return spec.num_layers, stored, spec.head_dim

    @classmethod
    def attention_needs(cls, hf_config) -> dict:
        """What this model asks of its attention backend (pallas_kernels.AttentionNeeds, less the cache's
        dtype and page size)."""
        spec = cls.build_spec(hf_config)
        return dict(head_dim=spec.head_dim, num_q_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                    soft_cap=spec.attn_soft_cap is not None,
                    sliding_window=any(kind.sliding_window is not None for kind in spec.layer_attention))

    def kv_cache_sharding(self) -> Optional[NamedSharding]:
        """Where each layer's KV cache lives: split over KV heads when attention is split, else replicated."""
        if self.mesh is None:
            return None
        split = self.layers[0].attn.attn_tp > 1
        return NamedSharding(self.mesh, P(None, None, MODEL_AXIS if split else None, None))

    # --- forward ---
    def __call__(self, input_ids: jax.Array, kv_caches: list, md: AttentionMetadata):
        x = self.embed(input_ids)  # [T, H]
        if self.embed_multiplier is not None:
            x = x * jnp.asarray(self.embed_multiplier, x.dtype)
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches):
            x, cache = layer(x, cache, md)
            new_caches.append(cache)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [N, H] -> f32[N, V]
        logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head.project_f32(hidden)
        if self.final_soft_cap is not None:
            logits = self.final_soft_cap * jnp.tanh(logits / self.final_soft_cap)
        return logits

    # --- weights ---
    def hf_children(self) -> dict:
        out = {"model.embed_tokens": self.embed, "model.norm": self.norm}
        out.update({f"model.layers.{i}": layer for i, layer in enumerate(self.layers)})
        return out

    def load_hf(self, rel: str, value, session: LoadSession, full_name: str) -> None:
        if rel != "lm_head.weight":
            raise KeyError(f"unexpected weight {full_name!r}")
        if self.lm_head is not None:  # tied: the embedding is the head
            load_linear(self.lm_head, "weight", value, session, full_name)

    def load_weights(self, weights: Iterable[tuple[str, np.ndarray]]) -> set[str]:
        """Load HF-named, HF-layout tensors, each routed to the layer that owns it (layers/loading.py).
        Returns the HF names used; raises on an unknown tensor, an incomplete fused one, or a weight never
        provided."""
        session = LoadSession(self.mesh)
        for name, value in weights:
            if name.endswith("rotary_emb.inv_freq"):  # recomputed from the config
                continue
            load_tensor(self, name, value, session)
        return session.finish(self)
