"""Size limits on what one request may ask for (ServingConfig's max_* fields), each a 400 naming the field.

The body limit (413) bounds the bytes; these bound the work a valid-looking body can cause: choices
per prompt, output length, stop strings scanned on every token, logit_bias entries, and guides (a
huge JSON schema or grammar compiles slowly whatever the guided-decoding backend). The check reads
fields by name, so it applies to any request model that has them.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from serving.config import ServingConfig
from serving.openai.errors import APIError

GUIDE_FIELDS = ("guided_json", "guided_regex", "guided_grammar", "guided_choice",
                "guided_whitespace_pattern", "response_format", "tools")
# The same limits on the Kobold API's field names (serving/kobold/protocol.py).
KOBOLD_NAMES = {"max_tokens": "max_length", "stop": "stop_sequence", "guides": ("grammar",)}


def _size(value: Any) -> int:
    """Bytes of a guide as the server would hold it (JSON for structured values)."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))


INT32 = (-2**31, 2**31 - 1)


def _ints(value: Any):
    """Every int inside a field value (lists of ids, ranges), bools excluded."""
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _ints(v)


def check_int_ranges(req: Any) -> None:
    """Integer fields reach the device as int32 sampler parameters: a larger value is a 400 here,
    not an OverflowError inside an engine step (found by fuzzing). Seeds are hashed, so any int64 goes."""
    for name, value in vars(req).items():
        if "seed" in name:
            continue
        for v in _ints(value):
            if not INT32[0] <= v <= INT32[1]:
                raise APIError(f"`{name}` is out of range: {v} does not fit a 32-bit signed integer.", 400, name)


def check_limits(req: Any, config: ServingConfig, names: Optional[dict] = None) -> None:
    """Raise a 400 naming the first field over its limit. `names` renames fields (KOBOLD_NAMES)."""
    names = names or {}
    check_int_ranges(req)
    max_tokens_name, stop_name = names.get("max_tokens", "max_tokens"), names.get("stop", "stop")
    for name in ("n", "best_of"):
        value = getattr(req, name, None)
        if isinstance(value, int) and value > config.max_n:
            raise APIError(f"`{name}` must be at most {config.max_n} on this server, got {value}.", 400, name)
    max_tokens = getattr(req, max_tokens_name, None)
    if isinstance(max_tokens, int) and config.max_tokens_limit is not None \
            and max_tokens > config.max_tokens_limit:
        raise APIError(f"`{max_tokens_name}` must be at most {config.max_tokens_limit} on this server, got "
                       f"{max_tokens}.", 400, max_tokens_name)
    stop = getattr(req, stop_name, None)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > config.max_stop_strings:
        raise APIError(f"`{stop_name}` may hold at most {config.max_stop_strings} strings, got {len(stops)}.",
                       400, stop_name)
    longest = max((len(s) for s in stops), default=0)
    if longest > config.max_stop_string_chars:
        raise APIError(f"`{stop_name}` strings may be at most {config.max_stop_string_chars} characters "
                       f"long, got one of {longest}.", 400, stop_name)
    bias = getattr(req, "logit_bias", None)
    if bias is not None and len(bias) > config.max_logit_bias:
        raise APIError(f"`logit_bias` may hold at most {config.max_logit_bias} entries, got {len(bias)}.",
                       400, "logit_bias")
    for name in names.get("guides", GUIDE_FIELDS):
        size = _size(getattr(req, name, None))
        if size > config.max_guide_bytes:
            raise APIError(f"`{name}` is {size} bytes; this server accepts guides of at most "
                           f"{config.max_guide_bytes} bytes.", 400, name)
