"""Llama and Mistral (sliding window): the decoder-only family that Qwen2/Qwen3 extend.

`Model(hf_config, *, dtype, rngs, mesh=None)`; `model(input_ids i32[T], kv_caches, md) -> (hidden [T, H],
kv_caches)`; `compute_logits(hidden [N, H]) -> f32[N, V]`; `load_weights((hf_name, array HF layout))`.
Subclasses change behaviour through the small `_...` class hooks, not by copying the forward.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aphrodite_jax.distributed.mesh import MODEL_AXIS, mesh_tp_size
from aphrodite_jax.distributed.sharding import named_sharding, plan_attention, shard_dim_if_divisible
from aphrodite_jax.layers.attention import PagedAttention, fuse_qkv
from aphrodite_jax.layers.attention_metadata import AttentionMetadata
from aphrodite_jax.layers.embed import Embedding
from aphrodite_jax.layers.linear import Linear
from aphrodite_jax.layers.mlp import GatedMLP, fuse_gate_up
from aphrodite_jax.layers.norm import RMSNorm
from aphrodite_jax.layers.rotary import make_rope_spec

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class DecoderLayer(nnx.Module):
    def __init__(self, attn: PagedAttention, mlp: GatedMLP, hidden: int, eps: float, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(hidden, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = attn
        self.post_norm = RMSNorm(hidden, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = mlp

    def __call__(self, x, kv_cache, md):  # x [T, H]
        a, kv_cache = self.attn(self.input_norm(x), kv_cache, md)
        x = x + a
        return x + self.mlp(self.post_norm(x)), kv_cache


class LlamaForCausalLM(nnx.Module):
    # --- hooks for the family ---
    @classmethod
    def _qkv_bias(cls, cfg) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    @classmethod
    def _o_bias(cls, cfg) -> bool:
        return bool(getattr(cfg, "attention_bias", False))

    _qk_norm = False

    @classmethod
    def _sliding_window(cls, cfg, layer: int) -> Optional[int]:
        types = getattr(cfg, "layer_types", None)
        if types and types[layer] == "sliding_attention":
            return getattr(cfg, "sliding_window", None)
        return None

    # --- construction ---
    def __init__(self, hf_config, *, dtype=jnp.float32, rngs: nnx.Rngs, mesh: Optional[Mesh] = None):
        cfg = hf_config
        if getattr(cfg, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True is not supported")
        tp = mesh_tp_size(mesh)
        self.mesh, self.dtype, self.tp_size = mesh, jnp.dtype(dtype), tp
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = head_dim_of(cfg)
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.hidden_size
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        eps = cfg.rms_norm_eps
        rope = make_rope_spec(cfg, self.head_dim)
        vocab_axis = shard_dim_if_divisible("vocab", cfg.vocab_size, tp)
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, vocab_axis=vocab_axis)
        layers = []
        for i in range(cfg.num_hidden_layers):
            attn = PagedAttention(
                hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                head_dim=self.head_dim, rope=rope, qkv_bias=self._qkv_bias(cfg), o_bias=self._o_bias(cfg),
                qk_norm=self._qk_norm, norm_eps=eps, sliding_window=self._sliding_window(cfg, i), dtype=dtype,
                rngs=rngs, mesh=mesh, tp_size=tp)
            mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs, tp_size=tp,
                           act=getattr(cfg, "hidden_act", "silu"))
            layers.append(DecoderLayer(attn, mlp, cfg.hidden_size, eps, dtype, rngs))
        self.layers = nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.lm_head = None if self.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs, axes=("embed", vocab_axis))

    @classmethod
    def kv_cache_spec(cls, hf_config, tp_size: int = 1) -> tuple[int, int, int]:
        """(num_layers, KV heads stored per layer (repeated for TP), head_dim); a layer's cache is
        [num_pages, page_size, 2 * heads, head_dim]."""
        _, stored = plan_attention(hf_config.num_attention_heads, hf_config.num_key_value_heads, tp_size)
        return hf_config.num_hidden_layers, stored, head_dim_of(hf_config)

    def kv_cache_sharding(self) -> Optional[NamedSharding]:
        """Where each layer's KV cache lives: split over KV heads when attention is split, else replicated."""
        if self.mesh is None:
            return None
        split = self.layers[0].attn.attn_tp > 1
        return NamedSharding(self.mesh, P(None, None, MODEL_AXIS if split else None, None))

    # --- forward ---
    def __call__(self, input_ids: jax.Array, kv_caches: list, md: AttentionMetadata):
        x = self.embed(input_ids)  # [T, H]
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches):
            x, cache = layer(x, cache, md)
            new_caches.append(cache)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [N, H] -> f32[N, V]
        if self.lm_head is None:
            return self.embed.attend(hidden)
        return self.lm_head.project_f32(hidden)

    # --- weights ---
    def _assign(self, param: nnx.Param, value: np.ndarray, name: str) -> None:
        """Put one host tensor straight into its (sharded) device array."""
        cur = param.get_value()
        if tuple(value.shape) != tuple(cur.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the model's {tuple(cur.shape)}")
        host = np.ascontiguousarray(np.asarray(value).astype(cur.dtype))
        if self.mesh is not None:
            arr = jax.device_put(host, named_sharding(self.mesh, param.get_metadata()["logical_axes"]))
        else:
            arr = jax.device_put(host)
        param.set_value(arr)

    def load_weights(self, weights: Iterable[tuple[str, np.ndarray]]) -> set[str]:
        """Load HF-named, HF-layout tensors; q/k/v and gate/up are buffered per layer until complete and
        fused. Returns the HF names used; raises if a model weight was never provided."""
        pending: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        done: set[int] = set()
        used: set[str] = set()

        def put(param, value, name):
            self._assign(param, value, name)
            done.add(id(param))
            used.add(name)

        for name, value in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "model.embed_tokens.weight":
                put(self.embed.weight, value, name)
            elif name == "model.norm.weight":
                put(self.norm.weight, value, name)
            elif name == "lm_head.weight":
                if self.lm_head is not None:
                    put(self.lm_head.weight, np.asarray(value).T, name)
            else:
                m = _LAYER_RE.match(name)
                if m is None:
                    raise KeyError(f"unexpected weight {name!r}")
                i, rest = int(m.group(1)), m.group(2)
                self._load_layer(i, rest, value, name, pending, put)
        if pending:
            raise ValueError(f"incomplete fused weights: {sorted(k for k in pending)}")
        missing = [p for p, v in nnx.iter_graph(self) if isinstance(v, nnx.Param) and id(v) not in done]
        if missing:
            raise ValueError(f"weights not provided for {['.'.join(map(str, p)) for p in missing][:8]} ...")
        return used

    def _load_layer(self, i, rest, value, name, pending, put):
        layer = self.layers[i]
        attn = layer.attn
        direct = {
            "input_layernorm.weight": (layer.input_norm.weight, False),
            "post_attention_layernorm.weight": (layer.post_norm.weight, False),
            "self_attn.o_proj.weight": (attn.o_proj.weight, True),
            "mlp.down_proj.weight": (layer.mlp.down.weight, True),
        }
        if attn.o_proj.bias is not None:
            direct["self_attn.o_proj.bias"] = (attn.o_proj.bias, False)
        if attn.q_norm is not None:
            direct["self_attn.q_norm.weight"] = (attn.q_norm.weight, False)
            direct["self_attn.k_norm.weight"] = (attn.k_norm.weight, False)
        if rest in direct:
            param, transpose = direct[rest]
            put(param, np.asarray(value).T if transpose else value, name)
            return
        m = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if m:
            group = pending.setdefault((i, m.group(2)), {})
            group[m.group(1)] = np.asarray(value)
            if len(group) == 3:
                del pending[(i, m.group(2))]
                fused = fuse_qkv(group["q"], group["k"], group["v"], attn.head_dim, attn.attn_tp, attn.kv_repeat)
                if m.group(2) == "weight":
                    put(attn.qkv.weight, fused.T, name)
                else:
                    put(attn.qkv.bias, fused, name)
            return
        m = re.match(r"^mlp\.(gate|up)_proj\.weight$", rest)
        if m:
            group = pending.setdefault((i, "gate_up"), {})
            group[m.group(1)] = np.asarray(value)
            if len(group) == 2:
                del pending[(i, "gate_up")]
                put(layer.mlp.gate_up.weight, fuse_gate_up(group["gate"], group["up"], layer.mlp.m), name)
            return
        raise KeyError(f"unexpected weight {name!r}")


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window on every layer (HF Mistral: a row at p sees keys p-W+1..p)."""

    @classmethod
    def _sliding_window(cls, cfg, layer: int) -> Optional[int]:
        return getattr(cfg, "sliding_window", None)
