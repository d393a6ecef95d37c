"""Compile a C++ XLA FFI kernel at first use into a cache folder keyed by its source and flags.

Why at first use: pip installs stay pure Python, and the flags can target the CPU we run on. The shared
object is named by a hash of (source, the headers beside it, compiler, flags, XLA FFI headers), so an edit or
a jaxlib upgrade builds a fresh one and a stale one is never loaded. The build writes to a temporary name and
renames, so two processes building at once both end with a whole file.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

CACHE_ENV_DEFAULT = "~/.cache/aphrodite_jax/kernels"
REGISTERED_TARGETS: set[str] = set()  # FFI targets this process registered: part of the executable cache's key


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why and what to install."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base, "aphrodite_jax", "kernels") if base else Path(CACHE_ENV_DEFAULT).expanduser()


def find_compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_shared(source: Path, flags: Sequence[str]) -> Path:
    """The path of the compiled shared object for `source`, building it if the cache lacks it."""
    import jax

    cxx = find_compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++) to build " + source.name)
    include = jax.ffi.include_dir()
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", *flags, f"-I{include}", f"-I{source.parent}"]
    h = hashlib.sha256()
    h.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # the kernels' shared headers (spin_wait.h)
        h.update(header.name.encode() + b"\0" + header.read_bytes())
    h.update(" ".join(cmd).encode())
    h.update(Path(include, "xla", "ffi", "api", "c_api.h").read_bytes())
    out = cache_dir() / f"{source.stem}-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    full = [*cmd, str(source), "-o", tmp]
    logger.info("Building the %s kernel: %s", source.name, " ".join(full))
    try:
        res = subprocess.run(full, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed ({' '.join(full)}):\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_shared(path: Path) -> ctypes.CDLL:
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise KernelBuildError(f"loading {path} failed: {e}") from e


def build_and_register(source: Path, flags: Sequence[str], required_cpu_flags: Sequence[str], symbol: str,
                       target: str) -> tuple[bool, str]:
    """(available, why not): checks the CPU, builds `source`, and registers its handler `symbol` with XLA
    as the CPU FFI target `target`. Each kernel module calls this once (behind an lru_cache)."""
    import jax

    missing = [f for f in required_cpu_flags if f not in cpu_flags()]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    try:
        lib = load_shared(build_shared(source, flags))
    except KernelBuildError as e:
        return False, str(e)
    try:
        handler = getattr(lib, symbol)
    except AttributeError as e:
        return False, f"the built kernel lacks its handler symbol: {e}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    REGISTERED_TARGETS.add(target)
    return True, ""
