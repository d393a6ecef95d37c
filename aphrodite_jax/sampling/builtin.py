"""The built-in sampler steps, listed once, in their default order (docs/decisions.md D27).

The registry (registry.py) is built from `BUILTIN_STEPS`; nothing registers itself on import. The
order here is Aphrodite's SamplerID order for the reorderable chain, then the TAIL steps, which
always run last: Mirostat v2 on the chain's output, then skew (post-softmax).
"""
from __future__ import annotations

from aphrodite_jax.sampling import filters, filters_extra, filters_history
from aphrodite_jax.sampling.step import SamplerStep

BUILTIN_STEPS: tuple[SamplerStep, ...] = (
    filters_history.dry,
    filters.penalties,
    filters_history.no_repeat_ngram,
    filters_extra.temperature,
    filters_extra.top_nsigma,
    filters.top_p_top_k,
    filters_extra.top_a,
    filters.min_p,
    filters_extra.tfs,
    filters_extra.eta_cutoff,
    filters_extra.epsilon_cutoff,
    filters_extra.typical_p,
    filters_extra.quadratic,
    filters_extra.xtc,
    filters_history.mirostat,  # TAIL
    filters_extra.skew,  # TAIL
)
TAIL: tuple[str, ...] = ("mirostat", "skew")
