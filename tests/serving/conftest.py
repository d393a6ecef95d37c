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


@pytest.fixture(scope="module")
def client(server):
    """The official openai client on the module's server."""
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
