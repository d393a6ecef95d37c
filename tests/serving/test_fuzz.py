"""A bounded, derandomized schemathesis run against the server's own /openapi.json on the real model:
every operation, valid and invalid bodies (benchmarks/fuzz.py keeps max_tokens at 1..4). No 5xx, no
in-band 500 in a stream, and every 4xx in OpenAI's error shape. Longer runs: `python benchmarks/fuzz.py`."""
from __future__ import annotations

import os
import sys

import pytest

from server_utils import start_server

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

EXAMPLES = 400  # about a minute on the shared 2-core machine under load
SEED = 8


def test_schemathesis_finds_no_5xx_and_only_openai_shaped_4xx(default_llm):
    pytest.importorskip("schemathesis")
    from benchmarks.fuzz import run_fuzz
    from serving.config import ServingConfig

    srv = start_server(default_llm.engine, serving_config=ServingConfig(max_tokens_limit=4))
    try:
        ops = srv.app.openapi()["paths"]
        report = run_fuzz(srv.base_url, EXAMPLES, SEED)
        assert srv.wait_idle(120)  # nothing the fuzzer sent left a request or a page behind
    finally:
        srv.stop()
    print(f"fuzz over {len(ops)} paths: {report.line()}")
    assert not report.failures, "\n".join(f"{r}\n  {c}\n  {t[:300]}" for r, c, t in report.failures[:10])
    assert report.requests >= EXAMPLES * 0.9
    assert report.by_status[200] > 0 and sum(v for k, v in report.by_status.items()
                                             if isinstance(k, int) and 400 <= k < 500) > 0
