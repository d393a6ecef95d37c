"""What a GGUF file's header gives us, kept on disk so a later start skips parsing it.

Parsing a GGUF header in Python (`gguf.GGUFReader`) and letting transformers build the HF config and the
fast tokenizer from it take ~10 s for SmolLM2 (three parses of the 49k-token vocabulary). The results
depend only on the file and on the library versions, so they are stored under
`<cache_dir>/gguf/<key>/`, the key being the file's absolute path, size and mtime plus the transformers,
tokenizers and gguf versions:
- `header.json`: the scalar metadata fields (long arrays, i.e. the vocabulary, are left out and read from
  the file if ever asked for) and every tensor's name, type, shape, byte offset and size;
- `config.json`: the HF config (`to_dict()`, rebuilt with `AutoConfig.for_model`);
- `tokenizer/`: the tokenizer as `save_pretrained` writes it (tokenizer.json: loads in a fraction of a second).
Any part that is missing or unreadable is rebuilt from the file (and logged); a changed file has a new key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

logger = logging.getLogger(__name__)

FORMAT = 1
MAX_ARRAY = 64  # metadata arrays longer than this (vocabulary, merges, scores) stay in the file


def _versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "tokenizers", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def snapshot_key(path: str) -> str:
    st = os.stat(path)
    ident = {"format": FORMAT, "path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "versions": _versions()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:40]


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _write_json(path: str, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class HeaderSnapshot:
    """The cached header parts of one GGUF file version (each part loaded on first use)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fields: Optional[dict[str, Any]] = None
        self.skipped: set[str] = set()
        self.tensors: Optional[list[dict[str, Any]]] = None
        self._read_header()

    @classmethod
    def open(cls, gguf_path: str, cache_dir: str) -> Optional["HeaderSnapshot"]:
        try:
            folder = os.path.join(os.path.expanduser(cache_dir), "gguf", snapshot_key(gguf_path))
            os.makedirs(folder, exist_ok=True)
            return cls(folder)
        except OSError as exc:
            logger.warning("GGUF header cache disabled (%s): parsing the file instead", exc)
            return None

    def _warn(self, part: str, exc: Exception) -> None:
        logger.warning("GGUF header cache: cannot read %s in %s (%s); parsing the file instead",
                       part, self.folder, exc)

    # ------------------------------------------------------------------ metadata + tensor index
    def _read_header(self) -> None:
        path = os.path.join(self.folder, "header.json")
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                data = json.load(f)
            fields, skipped, tensors = data["fields"], set(data["skipped"]), data["tensors"]
            if not isinstance(fields, dict) or not all(
                    {"name", "type", "ne", "offset", "nbytes"} <= set(t) for t in tensors):
                raise ValueError("unexpected layout")
            self.fields, self.skipped, self.tensors = fields, skipped, tensors
        except Exception as exc:  # noqa: BLE001 - a bad entry only costs a parse
            self._warn("header.json", exc)

    def has_field(self, key: str) -> bool:
        """True when this snapshot can answer for `key` (present, or known to be absent)."""
        return self.fields is not None and key not in self.skipped

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def save_header(self, reader: Any, tensors: list[dict[str, Any]]) -> None:
        fields, skipped = {}, []
        for key, field in reader.fields.items():
            if len(field.data) > MAX_ARRAY:
                skipped.append(key)
                continue
            try:
                fields[key] = _json_value(field.contents())
            except Exception:  # noqa: BLE001 - an odd field is simply read from the file when asked for
                skipped.append(key)
        try:
            _write_json(os.path.join(self.folder, "header.json"),
                        {"fields": fields, "skipped": skipped, "tensors": tensors})
        except OSError as exc:
            logger.warning("GGUF header cache: cannot write %s (%s)", self.folder, exc)

    # ------------------------------------------------------------------ HF config
    def hf_config(self) -> Any:
        path = os.path.join(self.folder, "config.json")
        if not os.path.exists(path):
            return None
        try:
            from transformers import AutoConfig

            with open(path) as f:
                data = json.load(f)
            return AutoConfig.for_model(**data)
        except Exception as exc:  # noqa: BLE001
            self._warn("config.json", exc)
            return None

    def save_hf_config(self, cfg: Any) -> None:
        try:
            _write_json(os.path.join(self.folder, "config.json"), cfg.to_dict())
        except (OSError, TypeError, ValueError) as exc:
            logger.warning("GGUF header cache: cannot write the config to %s (%s)", self.folder, exc)

    # ------------------------------------------------------------------ tokenizer
    def tokenizer(self) -> Any:
        path = os.path.join(self.folder, "tokenizer")
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            return None
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001
            self._warn("tokenizer/", exc)
            return None

    def save_tokenizer(self, tok: Any) -> None:
        final = os.path.join(self.folder, "tokenizer")
        try:
            tmp = tempfile.mkdtemp(dir=self.folder, prefix=".tokenizer-")
            tok.save_pretrained(tmp)
            if os.path.exists(final):
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as exc:
            logger.warning("GGUF header cache: cannot write the tokenizer to %s (%s)", self.folder, exc)
