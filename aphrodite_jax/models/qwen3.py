"""Qwen3: Llama with per-head RMSNorm on q and k (before RoPE), optional attention bias, explicit head_dim."""
from __future__ import annotations

from aphrodite_jax.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    _qk_norm = True
