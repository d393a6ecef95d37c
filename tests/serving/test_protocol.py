"""Schema-level tests of the OpenAI app with a fake engine (no model): errors, routes and shapes.

The fake engine only answers "generate" with a fixed two-token output; everything about generation
itself is covered end to end in test_openai_e2e.py on the real model.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from aphrodite_jax.outputs import CompletionOutput, Logprob, RequestOutput
from serving.config import ServingConfig
from serving.openai.api_server import build_app

WORDS = ["<s>", "</s>", "hello", "world", "the", "cat", "sat", "user", "assistant", ":", "\n", "[UNK]"]
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"


def make_tokenizer(template=TEMPLATE):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    hf.chat_template = template
    return hf


class FakeEngine:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.is_running = True
        self.engine = SimpleNamespace(max_model_len=64, config=SimpleNamespace(
            max_logprobs=5, model=SimpleNamespace(model="fake-model")),
            runner=SimpleNamespace(vocab_size=len(WORDS)), generation_config={})
        self.seen = []

    # AsyncLLMEngine's public face, read from the namespace above (tests change it there)
    model_name = property(lambda self: self.engine.config.model.model)
    max_model_len = property(lambda self: self.engine.max_model_len)
    max_logprobs = property(lambda self: self.engine.config.max_logprobs)
    vocab_size = property(lambda self: self.engine.runner.vocab_size)
    generation_config = property(lambda self: self.engine.generation_config)

    def check_params(self, params):
        params.verify_vocab(self.vocab_size)

    async def generate(self, prompt, params, request_id, prompt_token_ids=None, add_special_tokens=True):
        self.seen.append((params, prompt_token_ids))
        lps = [{5: Logprob(-0.5, 1, "cat")}, {6: Logprob(float("-inf"), 2, "sat")}]
        yield RequestOutput(request_id, prompt, prompt_token_ids,
                            [CompletionOutput(i, "cat sat", [5, 6], -1.0, lps, "length")
                             for i in range(params.n)], True)


@pytest.fixture(scope="module")
def fake():
    return FakeEngine(make_tokenizer())


@pytest.fixture(scope="module")
def client(fake):
    config = ServingConfig(served_model_name=["m1", "m2"], max_request_body_bytes=1 << 20)
    with TestClient(build_app(fake, config)) as c:
        yield c


def check_error(resp, status, param=None, text=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
        assert param.split(".")[0] in err["message"], err
    if text is not None:
        assert text in err["message"], err
    return err


def test_completion_shape_and_clamped_logprobs(client, fake):
    r = client.post("/v1/completions", json={"model": "m2", "prompt": "hello world", "max_tokens": 2,
                                             "logprobs": 1, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "m1" and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["cat", "sat"] and lp["token_logprobs"] == [-0.5, -9999.0]
    assert lp["text_offset"] == [0, 3]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_max_completion_tokens_alias_and_extra_samplers(client, fake):
    r = client.post("/v1/chat/completions", json={"model": "m1", "messages": [{"role": "user", "content": "hello"}],
                                                  "max_completion_tokens": 3, "min_p": 0.2, "top_k": 4})
    assert r.status_code == 200, r.text
    params, ids = fake.seen[-1]
    assert params.max_tokens == 3 and params.min_p == pytest.approx(0.2) and params.top_k == 4
    assert params.temperature == 1.0  # docs/decisions.md D20 without a generation_config
    assert ids == make_tokenizer().encode("user: hello\nassistant:", add_special_tokens=False)
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "cat sat", "tool_calls": []}


BAD = [
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "m1", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "m1", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "m1", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "m1", "prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of"),
    ({"model": "m1", "prompt": "hi", "n": 1, "best_of": 2, "stream": True}, 400, "best_of"),
    ({"model": "m1", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ({"model": "m1", "prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "m1", "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ({"model": "m1", "prompt": "hi", "seed": -5}, 400, "seed"),
    ({"model": "m1", "prompt": "hi", "min_pp": 0.1}, 400, "min_pp"),
    ({"model": "m1", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "m1", "prompt": "hi", "dry_multiplier": 0.8, "dry_base": 0.5}, 400, "dry_base"),
    ({"model": "m1", "prompt": "hi", "sampler_priority": [0, 1]}, 400, "sampler_priority"),
    ({"model": "m1", "prompt": "hi", "sampler_priority": [0, 99]}, 400, "sampler_priority"),
    ({"model": "m1", "prompt": "hi", "mirostat_mode": 1}, 400, "mirostat_mode"),
    ({"model": "m1", "prompt": "hi", "token_ban_ranges": [[1, 2]]}, 400, "token_ban_ranges"),
    ({"model": "m1", "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "m1", "prompt": "hi", "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"model": "m1", "prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, 400, "guided_choice"),
    ({"model": "m1", "prompt": "hi", "guided_regex": "a", "guided_decoding_backend": "x"}, 400,
     "guided_decoding_backend"),
    ({"model": "m1"}, 400, "prompt"),
    ({"model": "m1", "messages": []}, 400, "messages"),
    ({"model": "m1", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"model": "m1", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ({"model": "m1", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),  # "auto" needs flags
    ({"model": "m1", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "m1", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}, 400,
     "logit_bias"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_name_the_field(client, body, status, param):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    check_error(client.post(route, json=body), status, param)


def test_malformed_bodies(client):
    check_error(client.post("/v1/completions", content=b'{"model": "m1", "prompt": ',
                            headers={"content-type": "application/json"}), 400, text="JSON")
    check_error(client.post("/v1/completions", content=b'{"model": "m1", "prompt": "\xff\xfe"}',
                            headers={"content-type": "application/json"}), 400)
    check_error(client.post("/v1/completions", content=b"x" * ((1 << 20) + 10),
                            headers={"content-type": "application/json"}), 413, text="too large")
    check_error(client.post("/v1/completions", json=[1, 2]), 400)
    # The app still answers normally afterwards.
    assert client.post("/v1/completions", json={"model": "m1", "prompt": "hi"}).status_code == 200


def test_models_tokenize_health_version(client, fake):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["m1", "m2"] and models["data"][0]["max_model_len"] == 64
    t = client.post("/v1/tokenize", json={"model": "m1", "prompt": "hello world"}).json()
    assert t == {"tokens": [2, 3], "count": 2, "max_model_len": 64}
    chat = client.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "hello"}]}).json()
    assert chat["count"] == len(make_tokenizer().encode("user: hello\nassistant:"))
    assert client.post("/v1/detokenize", json={"tokens": [2, 3]}).json() == {"prompt": "hello world"}
    check_error(client.post("/v1/detokenize", json={"tokens": [999]}), 400, "tokens")
    assert client.get("/version").json()["version"]
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
    fake.is_running = False
    try:
        assert client.get("/health").status_code == 503
    finally:
        fake.is_running = True


def test_chat_without_template_is_a_clear_400_but_completions_work():
    engine = FakeEngine(make_tokenizer(template=None))
    with TestClient(build_app(engine, ServingConfig())) as c:
        err = check_error(c.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}), 400, "chat_template")
        assert "chat template" in err["message"]
        assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi"}).status_code == 200
        # --chat-template given inline makes chat work.
    with TestClient(build_app(engine, ServingConfig(chat_template=TEMPLATE))) as c:
        assert c.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_generation_config_sets_chat_defaults_and_token_ids_rendering():
    engine = FakeEngine(make_tokenizer())
    engine.engine.generation_config = {"temperature": 0.6, "top_p": 0.9}
    config = ServingConfig(return_tokens_as_token_ids=True)
    with TestClient(build_app(engine, config)) as c:
        r = c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                                                 "logprobs": True, "top_logprobs": 1})
        assert r.status_code == 200, r.text
        params, _ = engine.seen[-1]
        assert params.temperature == pytest.approx(0.6) and params.top_p == pytest.approx(0.9)
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert [x["token"] for x in content] == ["token_id:5", "token_id:6"]
        assert content[1]["logprob"] == -9999.0 and content[0]["top_logprobs"][0]["token"] == "token_id:5"
        r = c.post("/v1/chat/completions", json={"model": "fake-model", "temperature": 0.2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert engine.seen[-1][0].temperature == pytest.approx(0.2)
        c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi"})
        assert engine.seen[-1][0].temperature == 1.0 and engine.seen[-1][0].max_tokens == 16
