"""The MLP activations by their HF `hidden_act` names, so a model spec names one and the MLP looks it up."""
from __future__ import annotations

from typing import Callable

import jax


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) with the error function (HF "gelu")."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU (HF "gelu_pytorch_tanh", Gemma's)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh}
# HF config spellings of the same functions.
_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def activation_name(hf_act: str) -> str:
    """Our name for an HF `hidden_act` value; raises for one we do not implement."""
    name = _ALIASES.get(hf_act, hf_act)
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"hidden_act {hf_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return name


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return ACTIVATIONS[activation_name(name)]
