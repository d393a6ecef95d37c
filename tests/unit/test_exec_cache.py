"""The executable cache: keys, invalidation and fallback (tiny jitted functions; nothing is timed)."""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aphrodite_jax.runner import exec_cache
from aphrodite_jax.runner.exec_cache import CompileJob, ExecutableCache, source_digest, variant_signature
from aphrodite_jax.runner.compile_guard import COUNTER


@jax.jit
def _affine(x, w):  # x [N, 4], w [4, 4]
    return {"y": jnp.tanh(x @ w), "n": [x.sum()]}


_donating = jax.jit(lambda c, i: c.at[i].set(0.0), donate_argnums=(0,))


def _args(n=8):
    return (jnp.arange(n * 4, dtype=jnp.float32).reshape(n, 4) / 10, jnp.eye(4, dtype=jnp.float32))


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a process that has loaded nothing (a load or a JAX-cache hit stops storing).

    JAX's persistent cache is switched off for the test: earlier tests in the same process may have turned it
    on, and a hit there (these tiny functions are compiled again and again) would taint the process mid-test."""
    import jax.experimental.compilation_cache.compilation_cache as jcc

    monkeypatch.setitem(exec_cache._state, "tainted", False)
    prev = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jcc.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", prev)
    jcc.reset_cache()


@pytest.fixture()
def src(tmp_path):
    """A stand-in source tree, so tests can 'edit the code'."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    return [str(root)]


def _cache(tmp_path, src, context=None):
    return ExecutableCache(str(tmp_path / "cc"), context or {"model": "m"}, roots=src)


def test_hit_after_store_gives_the_same_results(tmp_path, src):
    args = _args()
    c1 = _cache(tmp_path, src)
    f1 = c1.compile(_affine, "affine", args)
    assert (c1.hits, c1.misses) == (0, 1)
    c2 = _cache(tmp_path, src)
    traces, compiles = COUNTER.traces, COUNTER.compiles
    f2 = c2.compile(_affine, "affine", args)
    assert (c2.hits, c2.misses) == (1, 0)
    assert exec_cache._state["tainted"]  # it loaded: later compiles of this process are not stored
    assert (COUNTER.traces, COUNTER.compiles) == (traces, compiles)  # loaded: neither traced nor compiled
    a, b = f1(*args), f2(*args)
    np.testing.assert_array_equal(np.asarray(a["y"]), np.asarray(b["y"]))
    np.testing.assert_array_equal(np.asarray(a["n"][0]), np.asarray(b["n"][0]))


def test_donation_survives_the_round_trip(tmp_path, src):
    args = (jnp.ones((4, 3)), jnp.int32(2))
    _cache(tmp_path, src).compile(_donating, "donate", args)
    fn = _cache(tmp_path, src).compile(_donating, "donate", args)
    c = jnp.ones((4, 3))
    out = fn(c, jnp.int32(2))
    assert c.is_deleted()
    np.testing.assert_array_equal(np.asarray(out)[2], np.zeros(3))


def test_new_shape_or_static_is_another_entry(tmp_path, src):
    c = _cache(tmp_path, src)
    c.compile(_affine, "affine", _args(8))
    c.compile(_affine, "affine", _args(16))
    assert c.misses == 2
    assert variant_signature("f", _args(8), {}) != variant_signature("f", _args(16), {})
    assert variant_signature("f", _args(8), {"k": 1}) != variant_signature("f", _args(8), {"k": 2})
    assert variant_signature("f", _args(8), {}) != variant_signature("g", _args(8), {})
    bf16 = (_args(8)[0].astype(jnp.bfloat16), _args(8)[1])
    assert variant_signature("f", _args(8), {}) != variant_signature("f", bf16, {})
    sds = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    plain = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    assert variant_signature("f", (sds,), {}) == variant_signature("f", (plain,), {})


def test_source_edit_context_or_environment_invalidates(tmp_path, src, monkeypatch):
    base = _cache(tmp_path, src)
    base.compile(_affine, "affine", _args())
    assert _cache(tmp_path, src, {"model": "other"}).dir != base.dir  # another engine/model config
    with open(os.path.join(src[0], "pkg", "a.py"), "a") as f:
        f.write("y = 2\n")
    edited = _cache(tmp_path, src)
    assert edited.dir != base.dir
    edited.compile(_affine, "affine", _args())
    assert (edited.hits, edited.misses) == (0, 1)
    open(os.path.join(src[0], "pkg", "b.py"), "w").write("")  # a new file counts too
    assert _cache(tmp_path, src).dir not in (base.dir, edited.dir)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")
    assert _cache(tmp_path, src).fingerprint != edited.fingerprint
    monkeypatch.delenv("XLA_FLAGS")
    from pallas_kernels.native import build

    # A C++ kernel that built here and not there (or the reverse) gives other executables.
    targets, now = build.REGISTERED_TARGETS, _cache(tmp_path, src).fingerprint
    monkeypatch.setattr(build, "REGISTERED_TARGETS", targets ^ {"aphrodite_test_kernel"})
    assert _cache(tmp_path, src).fingerprint != now
    monkeypatch.setattr(build, "REGISTERED_TARGETS", targets)
    assert _cache(tmp_path, src).fingerprint == now
    monkeypatch.setattr(exec_cache, "environment", lambda: {"jax": "0.0.0"})
    assert _cache(tmp_path, src).fingerprint != edited.fingerprint


def test_source_digest_covers_the_package_and_kernels():
    roots = exec_cache.source_roots()
    assert os.path.basename(roots[0]) == "aphrodite_jax"
    assert any(os.path.basename(r) == "pallas_kernels" for r in roots)
    assert source_digest(roots) == source_digest(roots)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_entry_falls_back_to_compiling(tmp_path, src, caplog, damage):
    args = _args()
    c = _cache(tmp_path, src)
    c.compile(_affine, "affine", args)
    path = c.path_for("affine", args, {})
    blob = open(path, "rb").read()
    bad = {"truncate": blob[:len(blob) // 2], "flip": blob[:-10] + bytes(b ^ 0xFF for b in blob[-10:]),
           "garbage": b"not an executable", "empty": b""}[damage]
    open(path, "wb").write(bad)
    c2 = _cache(tmp_path, src)
    with caplog.at_level(logging.WARNING, logger=exec_cache.__name__):
        fn = c2.compile(_affine, "affine", args)
    assert (c2.hits, c2.misses) == (0, 1)
    assert "compiling it again" in caplog.text
    np.testing.assert_allclose(np.asarray(fn(*args)["y"]), np.tanh(np.asarray(args[0]) @ np.eye(4)), rtol=1e-6)
    assert open(path, "rb").read().startswith(exec_cache.MAGIC)  # rewritten whole


def test_unloadable_entry_falls_back(tmp_path, src, caplog, monkeypatch):
    args = _args()
    c = _cache(tmp_path, src)
    c.compile(_affine, "affine", args)
    import jax.experimental.serialize_executable as se

    def broken(*a, **k):
        raise RuntimeError("incompatible executable")

    monkeypatch.setattr(se, "deserialize_and_load", broken)
    c2 = _cache(tmp_path, src)
    with caplog.at_level(logging.WARNING, logger=exec_cache.__name__):
        c2.compile(_affine, "affine", args)
    assert c2.misses == 1 and "incompatible executable" in caplog.text


def test_disabled_cache_compiles_and_writes_nothing(tmp_path):
    c = ExecutableCache(None, {})
    assert c.dir is None and c.path_for("affine", _args(), {}) is None
    fn = c.compile(_affine, "affine", _args())
    assert fn(*_args())["y"].shape == (8, 4)


def test_compile_all_fills_sinks_and_reuses(tmp_path, src):
    def jobs(sink):
        return [CompileJob(sink, ("affine", n), "affine", _affine, _args(n)) for n in (8, 16, 32)]

    first: dict = {}
    c1 = _cache(tmp_path, src)
    c1.compile_all(jobs(first), progress=False)
    assert set(first) == {("affine", 8), ("affine", 16), ("affine", 32)} and c1.misses == 3
    second: dict = {}
    c2 = _cache(tmp_path, src)
    c2.compile_all(jobs(second), progress=False)
    assert (c2.hits, c2.misses) == (3, 0)
    for key, fn in second.items():
        np.testing.assert_array_equal(np.asarray(fn(*_args(key[1]))["y"]),
                                      np.asarray(first[key](*_args(key[1]))["y"]))


def test_old_generations_are_pruned(tmp_path, src, monkeypatch):
    monkeypatch.setattr(exec_cache, "KEEP_GENERATIONS", 2)
    dirs = []
    for i in range(4):
        dirs.append(_cache(tmp_path, src, {"model": i}).dir)
        os.utime(dirs[-1], (1000 + i, 1000 + i))  # strictly increasing use times
    _cache(tmp_path, src, {"model": 3})
    left = set(os.listdir(os.path.dirname(dirs[0])))
    assert os.path.basename(dirs[3]) in left and os.path.basename(dirs[0]) not in left and len(left) == 2


def test_sharded_executable_round_trip(tmp_path, src):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 2:
        pytest.skip("needs several host devices (tests/conftest.py forces 4)")
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    split = NamedSharding(mesh, P(None, "model"))
    f = jax.jit(lambda x, w: x @ w, out_shardings=split)
    x = jax.device_put(np.ones((4, 6), np.float32), NamedSharding(mesh, P()))
    w = jax.device_put(np.arange(36, dtype=np.float32).reshape(6, 6), split)
    _cache(tmp_path, src).compile(f, "mm", (x, w))
    c = _cache(tmp_path, src)
    out = c.compile(f, "mm", (x, w))(x, w)
    assert c.hits == 1 and out.sharding == split
    np.testing.assert_array_equal(np.asarray(out), np.ones((4, 6)) @ np.arange(36).reshape(6, 6))


def test_executable_from_jax_persistent_cache_is_not_stored(tmp_path, src):
    """XLA:CPU re-serializes an executable JAX loaded from its own cache without its kernels: a process that
    loaded one stores nothing more."""
    import jax.experimental.compilation_cache.compilation_cache as jcc

    f = jax.jit(lambda x: jnp.sort(jnp.tanh(x) + jax.lax.iota(jnp.float32, 64)))
    args = (jnp.ones((4, 64)),)
    prev = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jaxcache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_enable_compilation_cache", True)  # the fixture turned it off
    try:
        jcc.reset_cache()
        f.lower(*args).compile()  # fills JAX's own cache
        jax.clear_caches()
        c = _cache(tmp_path, src)
        fn = c.compile(f, "sorted", args)  # answered by JAX's cache
        assert c.misses == 1 and not os.path.exists(c.path_for("sorted", args, {}))
        c.compile(_affine, "affine", _args())  # a fresh compile, but in a process that loaded: not stored
        assert not os.path.exists(c.path_for("affine", _args(), {}))
        np.testing.assert_allclose(np.asarray(fn(*args)), np.sort(np.tanh(1.0) + np.arange(64.0), axis=-1)[None]
                                   .repeat(4, 0), rtol=1e-6)
    finally:
        jax.config.update("jax_compilation_cache_dir", prev[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", prev[1])
        jcc.reset_cache()
