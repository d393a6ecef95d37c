"""End to end on the real server: 4xx in OpenAI's shape for bad requests (and
correct service afterwards), a disconnecting client's request aborted with its pages freed, and 64
concurrent streaming clients each getting exactly the text it gets alone."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
MSG = [{"role": "user", "content": "hi"}]


def _bad_requests(model: str, long_prompt: str):
    c, ch = "/v1/completions", "/v1/chat/completions"
    p = {"model": model, "prompt": PROMPT, "max_tokens": 2}
    m = {"model": model, "messages": MSG, "max_tokens": 2}
    return [
        (c, {**p, "model": "gpt-17"}, 404, "model"),
        (ch, {**m, "model": "gpt-17"}, 404, "model"),
        (c, {**p, "temperature": -1}, 400, "temperature"),
        (ch, {**m, "top_p": 0}, 400, "top_p"),
        (c, {**p, "n": 0}, 400, "n"),
        (c, {**p, "n": 3, "best_of": 2}, 400, "best_of"),
        (c, {**p, "best_of": 2, "stream": True}, 400, "best_of"),
        (ch, {**m, "n": 2, "best_of": 3, "stream": True}, 400, "best_of"),
        (c, {**p, "logprobs": 21}, 400, "logprobs"),
        (ch, {**m, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
        (c, {**p, "prompt": long_prompt}, 400, "prompt"),
        (ch, {**m, "messages": [{"role": "user", "content": long_prompt}]}, 400, "messages"),
        (c, {**p, "max_tokens": 10**6}, 400, "max_tokens"),
        (c, {**p, "temperature": "warm"}, 400, "temperature"),
        (c, {**p, "stop": 5}, 400, "stop"),
        (ch, {**m, "messages": []}, 400, "messages"),
        (ch, {**m, "messages": [{"role": "pirate", "content": "arr"}]}, 400, "messages"),
        (ch, {**m, "messages": [{"role": "user", "content": [{"type": "video", "text": "x"}]}]}, 400, "messages"),
        (c, {**p, "suffix": "the end"}, 400, "suffix"),
        (c, {**p, "seed": -7}, 400, "seed"),
        (c, {**p, "min_pp": 0.5}, 400, "min_pp"),
        (ch, {**m, "frequency_penalty": 3}, 400, "frequency_penalty"),
        (ch, {**m, "repetition_penalty": 0.5}, 400, "repetition_penalty"),
        (ch, {**m, "min_p": 2}, 400, "min_p"),
        (ch, {**m, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
        (ch, {**m, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        (c, {**p, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        (c, {**p, "logit_bias": {"abc": 5}}, 400, "logit_bias"),
        (c, {**p, "prompt": [[]]}, 400, "prompt"),
        (c, {**p, "prompt": [10**9]}, 400, "prompt"),
        (ch, {**m, "continue_final_message": True, "add_generation_prompt": True}, 400, None),
        ("/v1/detokenize", {"model": model, "tokens": [-1]}, 400, "tokens"),
    ]


def _check(resp, status, param):
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param in err["message"], err


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    oa = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    model = oa.models.list().data[0].id
    before = oa.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    cases = _bad_requests(model, "hello " * 2100)
    with httpx.Client(base_url=server.base_url, timeout=120) as h:
        for route, body, status, param in cases:
            _check(h.post(route, json=body), status, param)
        raw = [b'{"model": "x", "prompt": ', b'{"model": "\xff\xfe", "prompt": "a"}', b"[1, 2, 3]", b"null"]
        for body in raw:
            _check(h.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400, None)
        big = json.dumps({"model": model, "prompt": "a" * (10 * 2**20)})
        _check(h.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413, None)
    assert len(cases) + len(raw) + 1 >= 25
    # The openai client raises its typed errors for the same shape.
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gpt-17", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=model, messages=MSG, temperature=-1)
    after = oa.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert after == before
    assert server.wait_idle(60)


def test_disconnect_mid_stream_aborts_and_frees_pages(server):
    model = openai.OpenAI(base_url=server.v1, api_key="x").models.list().data[0].id
    total = server.total_blocks()
    stats = server.engine.engine.stats
    assert server.wait_idle(60)
    for route, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MSG})):
        body = {**body, "model": model, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=server.base_url, timeout=120) as h:
            with h.stream("POST", route, json=body) as resp:
                assert resp.status_code == 200
                lines = 0
                for line in resp.iter_lines():
                    lines += bool(line.startswith("data: "))
                    if lines >= 4:
                        break
                assert server.free_blocks() < total  # the request holds pages while it streams
                steps_at_disconnect = stats.steps
        # Closing the connection aborts the request: every page is back within a few engine steps,
        # long before its 1500 tokens could have been generated.
        assert server.wait_idle(120), (server.free_blocks(), total, list(server.engine.engine.requests))
        assert stats.steps - steps_at_disconnect < 20
    # A non-streaming client that gives up (read timeout closes its connection) is aborted too.
    steps_before = stats.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", timeout=httpx.Timeout(120, read=1.0),
                   json={"model": model, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True})
    assert server.wait_idle(120)
    assert stats.steps - steps_before < 1000


def test_64_concurrent_streams_match_solo_answers(server):
    model = openai.OpenAI(base_url=server.v1, api_key="x").models.list().data[0].id
    prompts = [f"Story {i}: the {['cat', 'dog', 'fox', 'owl'][i % 4]} went to" for i in range(64)]
    oa = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=600)

    async def solo(p):
        r = await oa.completions.create(model=model, prompt=p, max_tokens=16, temperature=0)
        return r.choices[0].text

    async def streamed(p):
        parts, finish = [], None
        async for c in await oa.completions.create(model=model, prompt=p, max_tokens=16, temperature=0, stream=True):
            parts.append(c.choices[0].text)
            finish = c.choices[0].finish_reason or finish
        assert finish in ("stop", "length")
        return "".join(parts)

    async def main():
        alone = [await solo(p) for p in prompts[:8]]  # a sample alone, one at a time
        together = await asyncio.gather(*(streamed(p) for p in prompts))
        alone += [await solo(p) for p in prompts[8:]]
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone
    assert server.wait_idle(60)
