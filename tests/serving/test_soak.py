"""The short soak (benchmarks/soak.py at 60 requests, 16 streams) on the real server: a mix of
completions and chat, streaming and not, random samplers; 10% aborted by the client, 10% dropping their
TCP connection mid-stream. Every uncut request ends right, greedy ones equal their solo answers, and
afterwards no KV page is held and the engine's queues are empty."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_short_soak_leaks_nothing(server):
    from benchmarks.soak import engine_state, soak

    report = asyncio.run(soak(server.base_url, requests=60, concurrency=16, seed=3, max_tokens=6))
    report.leaked_pages, report.queues = engine_state(server.engine.engine)
    print(report.summary())
    assert not report.errors, report.errors[:10]
    assert report.completed + report.aborted + report.dropped == 60
    assert report.aborted > 0 and report.dropped > 0 and report.greedy_checked > 0
    assert report.greedy_mismatch == 0
    assert report.leaked_pages == 0
    assert report.queues == {"waiting": 0, "running": 0, "swapped": 0, "requests": 0}
    assert report.ok(check_rss=False)
