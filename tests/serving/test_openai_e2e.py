"""End to end: the real server on the default model, driven by the official
`openai` client (completions and chat, streaming and not, n/best_of, echo, logprobs, stops, seeds,
extra samplers, usage, equality with the engine, models/tokenize/health/version, chat templates)."""
from __future__ import annotations

import httpx
import openai
import pytest

from aphrodite_jax import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MSGS = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return openai.OpenAI(base_url=server.v1, api_key="x").models.list().data[0].id


@pytest.fixture(scope="module")
def tok(server):
    return server.engine.tokenizer


def engine_text(server, ids, **kw):
    """The engine's own greedy output for prompt ids (ground truth for the HTTP answers)."""
    async def go():
        last = None
        async for out in server.engine.generate(None, SamplingParams(temperature=0.0, **kw), f"ref-{id(kw)}",
                                                prompt_token_ids=ids):
            last = out
        return last
    return server.run(go())


def test_completion_greedy_equals_engine_and_usage(server, client, model, tok):
    ids = tok.encode(PROMPT)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    ref = engine_text(server, ids, max_tokens=8)
    assert r.choices[0].text == ref.outputs[0].text and r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Streaming yields the same text, and the usage chunk has the same counts.
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_and_not(server, client, model, tok):
    ids = tok.encode(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=10, temperature=0)
    ref = engine_text(server, list(ids), max_tokens=10)
    assert r.choices[0].message.content == ref.outputs[0].text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(model=model, messages=MSGS, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # continuous_usage_stats: every chunk carries usage.
    cont = list(client.chat.completions.create(model=model, messages=MSGS, max_tokens=3, temperature=0, stream=True,
                                               stream_options={"include_usage": True,
                                                               "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in cont)


def test_n_and_best_of(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == sum(4 if c.finish_reason == "length" else 0 for c in r.choices) or \
        r.usage.completion_tokens <= 8
    s = list(client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, n=2, stream=True))
    assert {c.choices[0].index for c in s if c.choices} == {0, 1}
    assert sum(1 for c in s if c.choices and c.choices[0].finish_reason) == 2
    b = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=1, extra_body={"best_of": 3},
                                  temperature=1.0)
    assert len(b.choices) == 1 and b.choices[0].index == 0


def test_prompt_list_usage_sums_prompts_and_choices(client, model, tok):
    prompts = [PROMPT, "Two plus two is"]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=2, n=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 8
    s = list(client.completions.create(model=model, prompt=prompts, max_tokens=2, n=2, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert {c.choices[0].index for c in s if c.choices} == {0, 1, 2, 3}
    assert s[-1].usage.completion_tokens == 8 and s[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_echo_with_logprobs(client, model, tok):
    ids = tok.encode(PROMPT)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens) == c.text
    # echo without generation: only the prompt comes back.
    e = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True)
    assert e.choices[0].text == PROMPT and e.usage.completion_tokens == 0


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the most likely token
        assert item.bytes == list(item.token.encode())
    s = list(client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=1, stream=True))
    streamed = [x.token for c in s if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert streamed == [x.token for x in content]


def test_stop_strings(server, client, model, tok):
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = base.strip().split()[1] if len(base.split()) > 1 else base.strip()[:3]
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].stop_reason == stop
    assert stop not in cut.choices[0].text and base.startswith(cut.choices[0].text)
    kept = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut.choices[0].text + stop
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop],
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seed_and_extra_samplers(client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    texts = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(4)}
    assert len(texts) > 1
    extra = {"min_p": 0.1, "top_k": 5, "repetition_penalty": 1.2}
    x = client.chat.completions.create(model=model, messages=MSGS, max_tokens=6, seed=7, extra_body=extra)
    y = client.chat.completions.create(model=model, messages=MSGS, max_tokens=6, seed=7, extra_body=extra)
    assert x.choices[0].message.content == y.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=2, extra_body={"min_pp": 0.1})
    assert "min_pp" in str(exc.value)


def test_models_tokenize_health_version(server, client, model, tok):
    assert [m.id for m in client.models.list().data] == [model]
    base = server.base_url
    t = httpx.post(f"{base}/v1/tokenize", json={"model": model, "prompt": PROMPT}).json()
    assert t["tokens"] == tok.encode(PROMPT) and t["count"] == len(t["tokens"]) and t["max_model_len"] == 2048
    d = httpx.post(f"{base}/v1/detokenize", json={"model": model, "tokens": t["tokens"]}).json()
    assert d["prompt"] == PROMPT
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/version").json()["version"]


TEMPLATE = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<<assistant>>{% endif %}"


def _tokenize_chat(server, model, **kw):
    return httpx.post(f"{server.base_url}/v1/tokenize", json={"model": model, "messages": MSGS, **kw}).json()["tokens"]


def test_chat_templates(server, client, model, tok, tmp_path):
    own = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert _tokenize_chat(server, model) == tok.encode(own, add_special_tokens=False)
    no_gen = tok.apply_chat_template(MSGS, add_generation_prompt=False, tokenize=False)
    assert _tokenize_chat(server, model, add_generation_prompt=False) == tok.encode(no_gen, add_special_tokens=False)
    custom = tok.encode("<<user>>Name three colors.\n<<assistant>>", add_special_tokens=False)
    assert _tokenize_chat(server, model, chat_template=TEMPLATE) == custom
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=2, temperature=0,
                                       extra_body={"chat_template": TEMPLATE})
    assert r.usage.prompt_tokens == len(custom)
    # continue_final_message: the assistant turn is continued, and its text is prepended to the reply.
    conv = MSGS + [{"role": "assistant", "content": "Red, green and"}]
    c = client.chat.completions.create(model=model, messages=conv, max_tokens=3, temperature=0,
                                       extra_body={"continue_final_message": True})
    assert c.choices[0].message.content.startswith("Red, green and")
    # --chat-template as a file and inline, on servers of their own (sharing the same engine).
    from server_utils import start_server
    from serving.config import ServingConfig

    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    for value in (str(path), TEMPLATE.replace("\n", "\\n")):
        config = ServingConfig(chat_template=value, served_model_name=["t"], response_role="bot")
        other = start_server(async_engine=server.engine, serving_config=config)
        try:
            assert _tokenize_chat(other, "t") == custom
            r = openai.OpenAI(base_url=other.v1, api_key="x").chat.completions.create(
                model="t", messages=MSGS, max_tokens=2, temperature=0)
            assert r.choices[0].message.role == "bot" and r.usage.prompt_tokens == len(custom)
        finally:
            other.stop()
