"""On-device sampling, and the research API over it.

    from aphrodite_jax.sampling import process_logits, register_sampler

`process_logits(logits, params, history)` runs a batch's whole chain (biases, bans, the registered
samplers in each row's order) over a [B, V] array: the code the engine runs, for tests and notebooks.
`register_sampler` adds a step (docs/samplers.md). Imports are lazy so that importing a submodule
(the host-side metadata) does not pull in more than it needs.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = ["process_logits", "register_sampler", "unregister_sampler", "registered_steps"]


def process_logits(logits: Any, params: Sequence[Any], history: Optional[Sequence[Any]] = None, *,
                   eos_token_ids: Sequence[int] = (), seeds: Optional[Sequence[int]] = None,
                   mirostat_mu: Optional[Sequence[Optional[float]]] = None) -> Any:
    """The processed logits f32[B, V] (removed tokens are -inf) of logits [B, V] under one
    SamplingParams per row.

    history[i] is row i's token ids: a list (taken as generated tokens, so every penalty sees them)
    or a (prompt_ids, output_ids) pair (repetition penalty, DRY and no-repeat-ngram read both;
    frequency/presence penalties only the output). XTC's coin uses seeds[i] (default: params.seed or
    0) and the output length; mirostat_mu[i] is a sequence's Mirostat state (default 2 * tau).
    """
    import jax.numpy as jnp

    from aphrodite_jax.sampling.metadata import SamplingRow, make_sampling_metadata
    from aphrodite_jax.sampling.registry import verify_params
    from aphrodite_jax.sampling.sampler import apply_chain_jit

    logits = jnp.asarray(logits, jnp.float32)
    b, v = logits.shape
    bucket = max(8, 1 << max(b - 1, 0).bit_length())  # padded so batches of similar size share a program
    if len(params) != b:
        raise ValueError(f"{len(params)} SamplingParams for {b} rows")
    rows = []
    for i, sp in enumerate(params):
        verify_params(sp)
        h = history[i] if history is not None else ()
        prompt, output = (h if isinstance(h, tuple) and len(h) == 2 and not isinstance(h[0], int)
                          else ((), h))
        seed = seeds[i] if seeds is not None else (sp.seed if sp.seed is not None else 0)
        mu = mirostat_mu[i] if mirostat_mu is not None else None
        rows.append(SamplingRow(sp, seed, len(output), list(prompt), list(output), mu))
    md = make_sampling_metadata(rows, bucket, v, eos_token_ids=eos_token_ids)
    padded = jnp.zeros((bucket, v), jnp.float32).at[:b].set(logits)
    return apply_chain_jit(padded, md)[:b]


def __getattr__(name: str) -> Any:
    if name in ("register_sampler", "unregister_sampler", "registered_steps"):
        from aphrodite_jax.sampling import registry

        return getattr(registry, name)
    raise AttributeError(name)
