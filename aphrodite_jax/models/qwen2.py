"""Qwen2: Llama with bias on q/k/v (not o_proj); sliding window on the layers its config marks."""
from __future__ import annotations

from aphrodite_jax.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def _qkv_bias(cls, cfg) -> bool:
        return True

    @classmethod
    def _o_bias(cls, cfg) -> bool:
        return False
