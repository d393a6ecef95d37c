"""Every supported architecture, once: its HF `architectures` name, model_type, llama.cpp (GGUF) arch name and
the spec function that describes it (models/spec.py). The loaders and the dummy-config path ask this module;
no other module lists architecture names. A family added elsewhere (a test) goes in with `register(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from aphrodite_jax.models.spec import DecoderSpec, base_spec, layer_windows


@dataclass(frozen=True)
class Architecture:
    hf_name: str  # HF config `architectures` entry, also the model class's name
    model_type: str  # HF config `model_type`
    spec: Callable[..., DecoderSpec]  # hf_config -> DecoderSpec
    gguf_arch: Optional[str] = None  # llama.cpp's `general.architecture` (None: no GGUF support)
    gguf_permute_qk: bool = False  # llama.cpp's converter reordered Q/K rows (see gguf_loader)
    # (file arch, name marker): a GGUF of that arch whose `general.name` holds the marker is this family
    # (HF reads llama-typed Mistral files as Mistral).
    gguf_name_alias: Optional[tuple[str, str]] = None
    _class: list = field(default_factory=list, init=False, compare=False, repr=False)

    @property
    def model_class(self) -> type:
        """The decoder subclass named `hf_name` whose spec is `spec` (made once; the decoder and Flax are
        imported only here, so the GGUF reader can ask the registry without them)."""
        if not self._class:
            from aphrodite_jax.models.decoder import DecoderForCausalLM

            self._class.append(type(self.hf_name, (DecoderForCausalLM,),
                                    {"build_spec": staticmethod(self.spec), "__module__": __name__}))
        return self._class[0]


# --- the families: each a small hf_config -> DecoderSpec ---

def llama_spec(cfg, **overrides) -> DecoderSpec:
    bias = bool(getattr(cfg, "attention_bias", False))
    return base_spec(cfg, **{"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
                             **overrides})


def mistral_spec(cfg) -> DecoderSpec:
    """Llama with a sliding window on every layer."""
    return llama_spec(cfg, windows=layer_windows(cfg, all_sliding=True))


def qwen2_spec(cfg) -> DecoderSpec:
    """Llama with bias on q/k/v (not o_proj); sliding window on the layers its config marks."""
    return base_spec(cfg, qkv_bias=True, o_bias=False)


def qwen3_spec(cfg) -> DecoderSpec:
    """Llama with per-head RMSNorm on q and k (before RoPE), optional attention bias, explicit head_dim."""
    return llama_spec(cfg, qk_norm=True)


_ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture; returns it."""
    _ARCHITECTURES[arch.hf_name] = arch
    return arch


for _arch in (Architecture("LlamaForCausalLM", "llama", llama_spec, gguf_arch="llama", gguf_permute_qk=True),
              Architecture("MistralForCausalLM", "mistral", mistral_spec, gguf_arch="mistral",
                           gguf_name_alias=("llama", "mistral")),
              Architecture("Qwen2ForCausalLM", "qwen2", qwen2_spec, gguf_arch="qwen2"),
              Architecture("Qwen3ForCausalLM", "qwen3", qwen3_spec, gguf_arch="qwen3")):
    register(_arch)


def default_model_type() -> str:
    """The model_type of a dummy model built from no config at all: the first family listed."""
    return next(iter(_ARCHITECTURES.values())).model_type


def unregister(hf_name: str) -> None:
    _ARCHITECTURES.pop(hf_name, None)


def architectures() -> list[Architecture]:
    return list(_ARCHITECTURES.values())


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def by_model_type(model_type: str) -> Optional[Architecture]:
    return next((a for a in _ARCHITECTURES.values() if a.model_type == model_type), None)


def by_gguf_arch(gguf_arch: str) -> Optional[Architecture]:
    return next((a for a in _ARCHITECTURES.values() if a.gguf_arch == gguf_arch), None)


def gguf_architectures() -> tuple[str, ...]:
    return tuple(a.gguf_arch for a in _ARCHITECTURES.values() if a.gguf_arch)


def get_model_class(hf_config_or_arch):
    """Class for an HF config (its first supported `architectures` entry) or an architecture name."""
    archs = [hf_config_or_arch] if isinstance(hf_config_or_arch, str) else \
        list(getattr(hf_config_or_arch, "architectures", None) or [])
    if not archs:  # e.g. configs built from GGUF metadata
        found = by_model_type(getattr(hf_config_or_arch, "model_type", None))
        archs = [found.hf_name] if found else []
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch].model_class
    raise ValueError(f"unsupported architecture(s) {archs}; supported: {supported_architectures()}")
