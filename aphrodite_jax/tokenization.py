"""Tokenizer, EOS ids and generation defaults for a loaded model (transformers does the real work)."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)


def load_tokenizer(source: Optional[str], gguf_file: Optional[str] = None, cache_dir: Optional[str] = None) -> Any:
    """An HF tokenizer from a folder / cached hub id, or from the metadata of a GGUF file; None for none.
    cache_dir: where the tokenizer built from a GGUF file is kept between starts (gguf_snapshot.py)."""
    if source is None:
        return None
    if not gguf_file and source.endswith(".gguf") and os.path.isfile(source):  # --tokenizer FILE.gguf
        source, gguf_file = os.path.split(source)
    if gguf_file:
        from aphrodite_jax.loaders.gguf_loader import GGUFModel

        return GGUFModel(os.path.join(source, gguf_file), cache_dir=cache_dir).tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def generation_defaults(source: Optional[str]) -> dict:
    """generation_config.json of an HF folder as a dict ({} when absent)."""
    if not source or not os.path.isfile(os.path.join(source, "generation_config.json")):
        return {}
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as exc:  # a broken file should not stop serving
        logger.warning("ignoring unreadable generation_config.json in %s: %s", source, exc)
        return {}


def eos_token_ids(hf_config: Any, tokenizer: Any, generation_config: dict) -> tuple[int, ...]:
    """Every id that ends a sequence: the config's, generation_config's and the tokenizer's EOS."""
    ids = _ids(getattr(hf_config, "eos_token_id", None)) + _ids(generation_config.get("eos_token_id"))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))
