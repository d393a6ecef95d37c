"""The GGUF header cache: what a start reads back equals what parsing the file gives; stale or broken
entries are not used."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from aphrodite_jax.loaders import gguf_loader, gguf_snapshot
from aphrodite_jax.loaders.gguf_loader import GGUFModel
from aphrodite_jax.loaders.resolve import resolve_model


def _forget_process_caches():
    gguf_loader._PARSED.clear()
    gguf_loader._OPENED.clear()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default GGUF copied (so its mtime can change), parsed once with a snapshot written to `cache`."""
    tmp = tmp_path_factory.mktemp("snap")
    path, cache = str(tmp / "model.gguf"), str(tmp / "cc")
    shutil.copyfile(resolve_model(None).path, path)
    _forget_process_caches()
    g = GGUFModel(path, cache_dir=cache)
    cfg, tok = g.hf_config(), g.tokenizer()
    out = {"path": path, "cache": cache, "g": g, "cfg": cfg.to_dict(), "tok": tok,
           "weights": dict(g.iter_weights()), "folder": g.snapshot.folder,
           "names": g.tensor_names()}
    _forget_process_caches()
    yield out
    _forget_process_caches()


def test_snapshot_equals_parsing_the_file(built):
    parsed, cfg, tok, weights = built["g"], built["cfg"], built["tok"], built["weights"]
    keys = ("general.architecture", "llama.attention.head_count", "tokenizer.ggml.eos_token_id", "no.such.key")
    snap = GGUFModel(built["path"], cache_dir=built["cache"])
    assert snap.snapshot.fields is not None and snap.snapshot.tensors is not None
    assert snap.hf_config().to_dict() == cfg
    assert {k: snap.metadata(k) for k in keys} == {k: parsed.metadata(k) for k in keys}
    assert (snap.chat_template, snap.bos_token_id, snap.eos_token_id, snap.add_bos_token) == \
        (parsed.chat_template, parsed.bos_token_id, parsed.eos_token_id, parsed.add_bos_token)
    tok2 = snap.tokenizer()
    texts = ["Hello world!", "  two spaces\nnew line\ttab", "ünïcödé 日本語 🤖", "<|im_start|>user\nhi<|im_end|>", ""]
    assert [tok2.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert [tok2.decode(tok.encode(t)) for t in texts] == [tok.decode(tok.encode(t)) for t in texts]
    assert (len(tok2), tok2.bos_token_id, tok2.eos_token_id, tok2.all_special_tokens, tok2.chat_template) == \
        (len(tok), tok.bos_token_id, tok.eos_token_id, tok.all_special_tokens, tok.chat_template)
    chat = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    again = dict(snap.iter_weights())
    assert again.keys() == weights.keys()
    assert all(np.array_equal(again[k], weights[k]) for k in weights)
    assert snap._reader is None  # nothing above parsed the file's header
    _forget_process_caches()


def test_changed_file_is_not_served_from_the_old_snapshot(built, tmp_path):
    path = str(tmp_path / "model.gguf")
    shutil.copyfile(built["path"], path)
    cache = str(tmp_path / "cc")
    shutil.copytree(built["cache"], cache)
    os.utime(path, ns=(1, 1))  # same size, other mtime (copyfile keeps neither path nor mtime anyway)
    assert GGUFModel(path, cache_dir=cache).snapshot.fields is None
    assert GGUFModel(built["path"], cache_dir=cache).snapshot.fields is not None


@pytest.mark.parametrize("part", ["header.json", "config.json", "tokenizer"])
def test_broken_snapshot_part_falls_back_to_the_file(built, tmp_path, caplog, part):
    cache = str(tmp_path / "cc")
    shutil.copytree(built["cache"], cache)
    target = os.path.join(cache, "gguf", os.path.basename(built["folder"]), part)
    if part == "tokenizer":
        open(os.path.join(target, "tokenizer.json"), "w").write("{not json")
    else:
        open(target, "w").write('{"truncated": ')
    _forget_process_caches()
    with caplog.at_level(logging.WARNING, logger=gguf_snapshot.__name__):
        again = GGUFModel(built["path"], cache_dir=cache)
        assert again.hf_config().to_dict() == built["cfg"]
        assert again.tokenizer().encode("Hello world!") == built["tok"].encode("Hello world!")
        assert again.tensor_names() == built["names"]
    assert "parsing the file instead" in caplog.text and part.split(".")[0] in caplog.text
    _forget_process_caches()


def test_no_cache_dir_means_no_snapshot(built):
    assert GGUFModel(built["path"]).snapshot is None


def test_key_follows_file_identity_and_versions(built, tmp_path, monkeypatch):
    k1 = gguf_snapshot.snapshot_key(built["path"])
    assert gguf_snapshot.snapshot_key(built["path"]) == k1
    other = str(tmp_path / "other.gguf")
    shutil.copyfile(built["path"], other)
    assert gguf_snapshot.snapshot_key(other) != k1  # another path
    monkeypatch.setattr(gguf_snapshot, "_versions", lambda: {"transformers": "0.0"})
    assert gguf_snapshot.snapshot_key(built["path"]) != k1  # another transformers
