"""/metrics parses with prometheus-client's parser and its counters move by
exactly the amounts a known set of requests implies (tokens, finish reasons, histogram counts)."""
from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def scrape(server) -> dict[tuple[str, tuple], float]:
    r = httpx.get(server.base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_count(server):
    model = server.app.state.served_model_names[0]
    lab = (("model_name", model),)
    before = scrape(server)
    for name in ("running", "waiting", "swapped"):
        assert (f"aphrodite:num_requests_{name}", lab) in before
    assert 0.0 <= before[("aphrodite:gpu_cache_usage_perc", lab)] <= 1.0
    from aphrodite_jax.runner.compile_guard import COUNTER
    assert before[("aphrodite:compiles_total", lab)] == COUNTER.compiles

    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    tok = server.engine.tokenizer
    prompts = ["The capital of France is", "One, two, three,"]
    gen = prompt = 0
    for p in prompts:  # 2 x 5 tokens, finish "length"
        r = client.completions.create(model=model, prompt=p, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        gen += r.usage.completion_tokens
        prompt += r.usage.prompt_tokens
        assert r.usage.completion_tokens == 5
    # A stop string ends one request with finish "stop".
    full = client.completions.create(model=model, prompt=prompts[0], max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full.split()[1]
    r = client.completions.create(model=model, prompt=prompts[0], max_tokens=8, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    gen += 8 + r.usage.completion_tokens
    stop_tokens = r.usage.completion_tokens
    prompt += 2 * r.usage.prompt_tokens
    # A streamed chat and a Kobold generate count as well.
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    gen += chunks[-1].usage.completion_tokens
    prompt += chunks[-1].usage.prompt_tokens
    k = httpx.post(server.base_url + "/api/v1/generate",
                   json={"prompt": "Hello", "max_length": 3, "max_context_length": 512, "temperature": 0,
                         "bypass_eos": True}).json()
    assert k["results"][0]["finish_reason"] == "length"
    gen += 3
    prompt += len(tok.encode("Hello"))

    after = scrape(server)
    def delta(name, labels=lab):
        labels = tuple(sorted(labels))
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("aphrodite:prompt_tokens_total") == prompt
    assert delta("aphrodite:generation_tokens_total") == gen
    assert delta("aphrodite:request_success_total", lab + (("finished_reason", "length"),)) == 5
    assert delta("aphrodite:request_success_total", lab + (("finished_reason", "stop"),)) == 1
    assert delta("aphrodite:e2e_request_latency_seconds_count") == 6
    assert delta("aphrodite:time_to_first_token_seconds_count") == 6
    # Time per output token needs two tokens: every request but maybe the stopped one.
    assert delta("aphrodite:time_per_output_token_seconds_count") == 5 + (stop_tokens > 1)
    assert delta("aphrodite:e2e_request_latency_seconds_sum") > 0
    assert after[("aphrodite:num_requests_running", lab)] == 0
    # Histogram buckets are cumulative and end at +Inf == count.
    inf = after[("aphrodite:e2e_request_latency_seconds_bucket", tuple(sorted(lab + (("le", "+Inf"),))))]
    assert inf == after[("aphrodite:e2e_request_latency_seconds_count", lab)]


def test_each_app_has_its_own_registry(server, default_llm):
    """A second app over the same engine starts from zero (tests build many apps in one process)."""
    from serving.config import ServingConfig
    from serving.openai.api_server import build_app

    other = build_app(server.engine, ServingConfig(served_model_name=["other-name"]))
    from fastapi.testclient import TestClient

    text = TestClient(other).get("/metrics").text
    samples = {(s.name, s.labels.get("model_name")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("aphrodite:generation_tokens_total", "other-name")] == 0
