"""Compiled step executables kept on disk, so a warm start neither traces nor compiles.

JAX's persistent compilation cache skips XLA's compile but still traces and lowers every variant (seconds
each on the 2-core CPU). This cache stores the executables themselves (`jax.experimental.serialize_executable`)
under a key made of everything that decides what tracing would produce:
- the environment: jax/jaxlib/flax/numpy versions, backend, platform version, devices, XLA flags, JAX options;
- the engine: its config, the model config and the weight file's identity (the caller's `context`);
- the code: a hash of every source file (Python, C/C++) under aphrodite_jax/ and pallas_kernels/, so an edit
  anywhere invalidates every entry (a stale executable must never run);
- the variant: its name, static arguments and the shape/dtype/sharding of every argument leaf.
A miss compiles as before (through JAX's persistent cache); an entry that fails to read or load is logged,
deleted and compiled again. Nothing here changes what runs: only whether it was traced in this process.
Only compiles of a process that has loaded no executable are stored (see `_compile`): a cold start fills the
cache; after a code edit whose lowered steps did not change, starts trace and load from JAX's cache as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np

import pallas_kernels

logger = logging.getLogger(__name__)

MAGIC = b"APHJAXEXE2\n"
SUBDIR = "executables"
KEEP_GENERATIONS = 8  # fingerprint folders kept (other source versions, other engines); older ones pruned
_SOURCE_SUFFIXES = (".py", ".cc", ".cpp", ".c", ".h", ".hpp")  # C++ kernels too (XLA FFI)
_ENV_PREFIXES = ("XLA_", "JAX_", "TPU_", "LIBTPU_", "APHRODITE_")


def source_roots() -> list[str]:
    """The folders whose code can change a traced step: the package and the kernels package."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../aphrodite_jax
    return [pkg, pallas_kernels.source_root()]


def source_digest(roots: Iterable[str]) -> str:
    """sha256 over the relative path and bytes of every source file under `roots` (sorted, so stable)."""
    h = hashlib.sha256()
    for root in roots:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith(_SOURCE_SUFFIXES)]
        h.update(os.path.basename(root).encode() + b"\0")
        for path in sorted(files):
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                data = f.read()
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


_OWN_SOURCE: list[str] = []


def _own_source() -> str:
    """The package's source digest, taken once per process (by the first engine, after its imports): a file
    edited while the process runs must not give its in-memory code a new file's key."""
    if not _OWN_SOURCE:
        _OWN_SOURCE.append(source_digest(source_roots()))
    return _OWN_SOURCE[0]


def environment() -> dict[str, Any]:
    """What outside the engine's own config decides the compiled code."""
    import jaxlib

    try:
        import flax
        flax_version = flax.__version__
    except ImportError:  # pragma: no cover
        flax_version = None
    devices = jax.devices()
    client = devices[0].client
    options = {k: repr(v) for k, v in sorted(jax.config.values.items()) if "cache" not in k}
    return {
        "python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "flax": flax_version, "numpy": np.__version__,
        "backend": jax.default_backend(), "platform_version": getattr(client, "platform_version", ""),
        "devices": [(d.id, d.device_kind, d.process_index) for d in devices],
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
        "jax_options": options,
        # An executable compiled with a C++ kernel calls it by name: where the kernel did not build (no
        # compiler, another CPU), the pure-JAX fallback's executables must be a different entry.
        "ffi_targets": pallas_kernels.registered_ffi_targets(),
    }


_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_state = {"tainted": False}  # this process has loaded an executable (ours or JAX's cache): store nothing more


def _on_event(event: str, **_: Any) -> None:
    if event == _HIT_EVENT:
        _state["tainted"] = True


jax.monitoring.register_event_listener(_on_event)


def _compile(lowered: Any) -> tuple[Any, bool]:
    """lowered.compile(), and whether the result may be stored.

    Only compiles made in a process that has not loaded any executable are stored. XLA:CPU (jaxlib 0.10.2)
    re-serializes an executable that JAX loaded from its own cache without its kernels, and kernels of an
    executable compiled after such loads may be missing too: a later process then fails at the first call with
    "Function ... not found". A fresh process (a cold start) stores everything; a process that loads (a warm
    start, or one helped by JAX's cache) compiles as before and stores nothing.
    """
    clean = not _state["tainted"]
    fn = lowered.compile()
    return fn, clean and not _state["tainted"]


def _leaf_sig(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        sharding = getattr(x, "sharding", None)
        return f"{tuple(x.shape)}:{np.dtype(x.dtype).name}:{bool(getattr(x, 'weak_type', False))}:{sharding!r}"
    return f"{type(x).__name__}:{x!r}"


def variant_signature(name: str, args: tuple, static: dict) -> str:
    """One variant as text: the function's name, its static arguments, the argument tree and every leaf."""
    leaves, treedef = jax.tree.flatten(args)
    return "\n".join([name, repr(sorted(static.items())), str(treedef)] + [_leaf_sig(x) for x in leaves])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CompileJob:
    """One variant to have compiled: `jitted.lower(*args, **static).compile()`, stored as `sink[key]`."""

    sink: dict
    key: Any
    name: str
    jitted: Any
    args: tuple
    static: dict = field(default_factory=dict)


class ExecutableCache:
    """Serialized executables under `<root>/executables/<fingerprint>/<variant>.bin`.

    `root` None disables it (every call compiles). `context` is the caller's part of the key: the engine and
    model config, anything else its traced functions close over. Safe under concurrent processes: entries are
    written to a temporary file and renamed into place.
    """

    def __init__(self, root: Optional[str], context: dict[str, Any], *, roots: Optional[list[str]] = None):
        self.hits = 0
        self.misses = 0
        self.dir: Optional[str] = None
        if not root:
            return
        self.fingerprint = _digest(json.dumps({"format": MAGIC.decode().strip(), "env": environment(),
                                               "source": source_digest(roots) if roots else _own_source(),
                                               "context": context}, sort_keys=True, default=repr))
        base = os.path.join(os.path.expanduser(root), SUBDIR)
        self.dir = os.path.join(base, self.fingerprint[:40])
        try:
            os.makedirs(self.dir, exist_ok=True)
            os.utime(self.dir)  # most recently used: kept by the pruning below
            _prune(base, keep=KEEP_GENERATIONS)
        except OSError as exc:
            logger.warning("executable cache disabled: cannot use %s (%s)", self.dir, exc)
            self.dir = None

    # ------------------------------------------------------------------ one entry
    def path_for(self, name: str, args: tuple, static: dict) -> Optional[str]:
        if self.dir is None:
            return None
        return os.path.join(self.dir, f"{name}-{_digest(variant_signature(name, args, static))[:40]}.bin")

    def load(self, path: Optional[str]) -> Any:
        """The executable stored at `path`, or None (absent, or unreadable: then it is logged and removed)."""
        if path is None or not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as f:
                blob = f.read()
            if not blob.startswith(MAGIC):
                raise ValueError("not an executable-cache entry of this format")
            digest, body = blob[len(MAGIC):len(MAGIC) + 32], blob[len(MAGIC) + 32:]
            if hashlib.sha256(body).digest() != digest:
                raise ValueError("checksum mismatch (truncated or corrupt)")
            payload, in_tree, out_tree, device_ids = pickle.loads(body)
            from jax.experimental.serialize_executable import deserialize_and_load

            by_id = {d.id: d for d in jax.devices()}
            devices = [by_id[i] for i in device_ids]  # KeyError: compiled for devices this process lacks
            _state["tainted"] = True
            return deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
        except Exception as exc:  # noqa: BLE001 - any bad entry falls back to compiling
            logger.warning("ignoring executable-cache entry %s: %s; compiling it again", os.path.basename(path),
                           exc)
            try:
                os.remove(path)
            except OSError:
                pass
            return None

    def store(self, path: Optional[str], compiled: Any) -> None:
        if path is None:
            return
        try:
            from jax.experimental.serialize_executable import serialize

            # The devices it runs on: by default the loader would assume all of them. JAX's Compiled has
            # no public accessor for its executable's devices; this is the one place that reaches in.
            device_ids = [d.id for d in compiled._executable.xla_executable.local_devices()]
            body = pickle.dumps((*serialize(compiled), device_ids), protocol=pickle.HIGHEST_PROTOCOL)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(body).digest() + body)
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: never fail a start over it
            logger.warning("could not store %s in the executable cache: %s", os.path.basename(path), exc)

    def compile(self, jitted: Any, name: str, args: tuple, static: Optional[dict] = None) -> Any:
        """Load the variant, or lower + compile it and store it."""
        static = static or {}
        path = self.path_for(name, args, static)
        fn = self.load(path)
        if fn is not None:
            self.hits += 1
            return fn
        self.misses += 1
        return self._compile_and_store(jitted.lower(*args, **static), path)

    def _compile_and_store(self, lowered: Any, path: Optional[str]) -> Any:
        fn, storable = _compile(lowered)
        if storable:
            self.store(path, fn)
        return fn

    # ------------------------------------------------------------------ many at once
    def compile_all(self, jobs: list[CompileJob], *, progress: bool = True, desc: str = "Compiling",
                    workers: Optional[int] = None) -> None:
        """Fill every job's sink: cached entries load first; the rest are lowered in order on this thread
        (tracing needs the GIL) and compiled on a small pool (XLA's compile mostly does not)."""
        from tqdm.auto import tqdm

        workers = workers or max(1, min(4, os.cpu_count() or 1))
        with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
            todo = []
            paths = [self.path_for(job.name, job.args, job.static) for job in jobs]
            # Loading waits mostly on XLA's side (linking the executable), so a pool overlaps the loads.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                loaded = pool.map(self.load, paths)
                for job, path, fn in zip(jobs, paths, loaded):
                    if fn is None:
                        todo.append((job, path))
                        continue
                    self.hits += 1
                    job.sink[job.key] = fn
                    bar.update(1)
            if not todo:
                return
            self.misses += len(todo)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures: dict[Any, CompileJob] = {}
                for job, path in todo:
                    lowered = job.jitted.lower(*job.args, **job.static)
                    futures[pool.submit(self._compile_and_store, lowered, path)] = job
                for fut in as_completed(futures):
                    job = futures[fut]
                    job.sink[job.key] = fut.result()
                    bar.update(1)


def _prune(base: str, keep: int) -> None:
    """Remove all but the `keep` most recently used fingerprint folders."""
    entries = []
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if os.path.isdir(path):
            entries.append((os.path.getmtime(path), path))
    for _, path in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


NO_CACHE = ExecutableCache(None, {})


def compile_one(cache: Optional[ExecutableCache], jitted: Any, name: str, args: tuple,
                static: Optional[dict] = None) -> Callable:
    return (cache or NO_CACHE).compile(jitted, name, args, static)
