"""`GET /metrics`: Prometheus exposition with Aphrodite's metric names (docs/decisions.md D32), one registry per app.

Why per app: tests build several apps in one process over one shared engine, and the global registry
would refuse the second set of metrics. Two sources feed it:
- the engine's snapshot at scrape time (requests running/waiting/swapped, KV usage) and the compile
  count, which are state, not events;
- per-request events seen by this app, from `InstrumentedEngine`, a thin proxy over the AsyncLLMEngine
  that every route of the app uses: token totals, TTFT / time per output token / end-to-end latency
  histograms and finished requests by finish reason. So the counters count exactly what this app served.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Buckets follow Aphrodite/vLLM's metrics.py, so dashboards built for them read ours.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 300.0)


class _EngineState:
    """A custom collector: values read from the engine at scrape time."""

    def __init__(self, engine: Any, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        snap = self.engine.snapshot()  # waits for a running step: render() runs off the event loop
        labels = ["model_name"]
        for name, doc, value in (
                ("aphrodite:num_requests_running", "Requests running on the device.", snap.num_running),
                ("aphrodite:num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting),
                ("aphrodite:num_requests_swapped", "Requests swapped out to host memory.", snap.num_swapped),
                ("aphrodite:gpu_cache_usage_perc", "Fraction of device KV pages in use (0..1).",
                 snap.gpu_cache_usage),
                ("aphrodite:cpu_cache_usage_perc", "Fraction of host swap KV pages in use (0..1).",
                 snap.cpu_cache_usage)):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], float(value))
            yield g
        from aphrodite_jax.runner.compile_guard import COUNTER  # imports JAX: the engine already did

        c = CounterMetricFamily("aphrodite:compiles", "XLA compiles in this process (should stop "
                                "growing after warm-up).", labels=labels)
        c.add_metric([self.model_name], float(COUNTER.compiles))
        yield c


class ServerMetrics:
    def __init__(self, engine: Any, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter("aphrodite:prompt_tokens", "Prompt tokens of finished requests.",
                                     lab, registry=r).labels(model_name)
        self.generation_tokens = Counter("aphrodite:generation_tokens", "Generated tokens returned.",
                                         lab, registry=r).labels(model_name)
        self.success = Counter("aphrodite:request_success", "Finished sequences by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("aphrodite:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("aphrodite:time_per_output_token_seconds", "Time between output tokens.",
                              lab, buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("aphrodite:e2e_request_latency_seconds", "Request latency, arrival to end.",
                             lab, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        r.register(_EngineState(engine, model_name))

    def observe_finished(self, start: float, first: Optional[float], end: float, out: Any) -> None:
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        gen = sum(len(o.token_ids) for o in out.outputs)
        self.generation_tokens.inc(gen)
        for o in out.outputs:
            self.success.labels(self.model_name, o.finish_reason or "abort").inc()
        self.e2e.observe(end - start)
        if first is not None:
            longest = max((len(o.token_ids) for o in out.outputs), default=0)
            if longest > 1:
                self.tpot.observe((end - first) / (longest - 1))

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class InstrumentedEngine:
    """Forwards everything to the AsyncLLMEngine; `generate` also records this app's metrics."""

    def __init__(self, engine: Any, metrics: ServerMetrics):
        self._engine = engine
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        m = self.metrics
        start, first, last = time.monotonic(), None, None
        agen = self._engine.generate(*args, **kwargs)
        try:
            async for out in agen:
                if first is None and any(o.token_ids for o in out.outputs):
                    first = time.monotonic()
                    m.ttft.observe(first - start)
                last = out
                yield out
        finally:
            await agen.aclose()
            if last is not None and last.finished:
                m.observe_finished(start, first, time.monotonic(), last)
            elif last is not None:  # aborted (client left or Kobold abort): count what it produced
                m.prompt_tokens.inc(len(last.prompt_token_ids))
                m.generation_tokens.inc(sum(len(o.token_ids) for o in last.outputs))
                m.success.labels(m.model_name, "abort").inc(max(len(last.outputs), 1))


def install_metrics(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> Response:
        return await asyncio.to_thread(metrics.render)  # the engine snapshot may wait for a step
