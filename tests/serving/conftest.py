"""Serving tests reuse the suite's shared engine (tests/conftest.py `default_llm`) behind a fresh
AsyncLLMEngine + uvicorn per module, so no test module pays for a second model load and warm-up."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def server(default_llm):
    from server_utils import start_server

    handle = start_server(default_llm.engine)
    yield handle
    handle.stop()
