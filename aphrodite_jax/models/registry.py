"""HF `architectures` name -> model class (imported lazily so one broken family doesn't break the rest)."""
from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("aphrodite_jax.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("aphrodite_jax.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("aphrodite_jax.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("aphrodite_jax.models.qwen3", "Qwen3ForCausalLM"),
}

_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config_or_arch):
    """Class for an HF config (its first supported `architectures` entry) or an architecture name."""
    archs = [hf_config_or_arch] if isinstance(hf_config_or_arch, str) else \
        list(getattr(hf_config_or_arch, "architectures", None) or [])
    if not archs and getattr(hf_config_or_arch, "model_type", None) in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[hf_config_or_arch.model_type]]  # e.g. configs built from GGUF metadata
    for arch in archs:
        if arch in _MODELS:
            module, cls = _MODELS[arch]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(f"unsupported architecture(s) {archs}; supported: {supported_architectures()}")
