"""A decoder-only model described by data: what the families differ in, read once from the HF config.

A family is a function hf_config -> DecoderSpec (see models/registry.py); `models/decoder.py` builds the model
from the spec alone. `base_spec` reads the fields every Llama-shaped HF config has; a family passes what it
changes as keyword overrides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from aphrodite_jax.layers.activation import activation_name
from aphrodite_jax.layers.rotary import RopeSpec, make_rope_spec


@dataclass(frozen=True)
class AttentionKind:
    """One layer's attention: global (window None) or sliding, with its own rotary embedding."""

    rope: RopeSpec
    sliding_window: Optional[int] = None  # a row at p sees keys p-W+1..p


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_attention: tuple[AttentionKind, ...]  # one per layer
    norm_eps: float
    norm_offset: bool = False  # RMSNorm weight applied as (1 + w) (Gemma)
    activation: str = "silu"  # layers/activation.py: silu | gelu | gelu_tanh
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sm_scale: Optional[float] = None  # None: head_dim ** -0.5
    attn_soft_cap: Optional[float] = None
    final_soft_cap: Optional[float] = None  # logits = cap * tanh(logits / cap)
    embed_multiplier: Optional[float] = None  # hidden = embed(ids) * m (Gemma: sqrt(hidden_size))
    sandwich_norms: bool = False  # a norm before and after both the attention and the MLP block
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x))
    layer_mlp: tuple[str, ...] = ()  # "dense" | "moe" per layer; () = all dense
    tie_word_embeddings: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_attention)

    def mlp_kind(self, layer: int) -> str:
        return self.layer_mlp[layer] if self.layer_mlp else "dense"


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_windows(cfg, *, all_sliding: bool = False) -> list[Optional[int]]:
    """The sliding window per layer: every layer (all_sliding, Mistral), else those `layer_types` marks."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    out = []
    for i in range(cfg.num_hidden_layers):
        sliding = all_sliding or bool(types and types[i] == "sliding_attention")
        out.append(window if sliding else None)
    return out


def base_spec(cfg, *, windows: Optional[list[Optional[int]]] = None, local_rope: Optional[RopeSpec] = None,
              **overrides: Any) -> DecoderSpec:
    """The spec of a Llama-shaped HF config; `overrides` set any DecoderSpec field. Sliding layers use
    `local_rope` when given (a family with its own base for local attention), else the global RoPE.
    `query_pre_attn_scalar` in `overrides` stands for sm_scale = query_pre_attn_scalar ** -0.5."""
    d = overrides.pop("head_dim", None) or head_dim_of(cfg)
    rope = make_rope_spec(cfg, d)
    windows = layer_windows(cfg) if windows is None else windows
    kinds = tuple(AttentionKind(local_rope if (w is not None and local_rope is not None) else rope, w)
                  for w in windows)
    scalar = overrides.pop("query_pre_attn_scalar", None)
    if scalar is not None:
        overrides["sm_scale"] = float(scalar) ** -0.5
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=d,
        layer_attention=kinds, norm_eps=float(cfg.rms_norm_eps),
        activation=activation_name(getattr(cfg, "hidden_act", "silu")),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))
    fields.update(overrides)
    return DecoderSpec(**fields)
