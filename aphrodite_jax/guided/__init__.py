"""Guided decoding: constrain a request's output to a JSON schema, regex, choice list or grammar.

`GuidedDecodingParams` (on SamplingParams.guided_decoding) says what; `GuidedDecoding` (one per engine)
compiles guides with a backend (xgrammar, outlines-core) and masks the logits on device each step.
"""
from aphrodite_jax.guided.base import GuideError
from aphrodite_jax.guided.params import BACKENDS, GuidedDecodingParams

__all__ = ["BACKENDS", "GuideError", "GuidedDecodingParams"]
