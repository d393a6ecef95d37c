"""Beam search end to end: the real server on the default model through the official openai client
(`use_beam_search`, `best_of`, `length_penalty`, `early_stopping` via extra_body)."""
from __future__ import annotations

import math

import openai
import pytest

from aphrodite_jax import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
BEAM = {"use_beam_search": True, "best_of": 4}


def engine_beams(server, ids, **kw):
    """The engine's own beam search for prompt ids (ground truth for the HTTP answers)."""
    async def go():
        last = None
        params = SamplingParams(use_beam_search=True, best_of=4, temperature=0.0, **kw)
        async for out in server.engine.generate(None, params, f"beam-ref-{id(kw)}", prompt_token_ids=ids):
            last = out
        return last
    return server.run(go())


def test_completions_n_best_beams_in_score_order(server, client, model):
    ids = server.engine.tokenizer.encode(PROMPT)
    ref = engine_beams(server, ids, n=4, max_tokens=10)
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, n=4,
                                     logprobs=1, extra_body=BEAM)
    assert [c.text for c in full.choices] == [o.text for o in ref.outputs]
    assert [c.finish_reason for c in full.choices] == [o.finish_reason for o in ref.outputs]
    assert len({c.text for c in full.choices}) == 4 and [c.index for c in full.choices] == [0, 1, 2, 3]
    # Score order: cumulative logprob / generated length, from the returned token logprobs.
    scores = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in full.choices]
    assert scores == sorted(scores, reverse=True)
    for k, o in enumerate(ref.outputs):
        assert math.isclose(sum(full.choices[k].logprobs.token_logprobs), o.cumulative_logprob, abs_tol=1e-3)
    assert full.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    for n in (1, 2, 3):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, n=n,
                                      extra_body=BEAM)
        assert [c.text for c in r.choices] == [c.text for c in full.choices[:n]]


def test_chat_and_streaming(server, client, model):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    body = {**BEAM, "length_penalty": 0.5, "early_stopping": "never"}
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, n=2,
                                       extra_body=body)
    assert len(r.choices) == 2 and r.choices[0].message.content != r.choices[1].message.content
    # stream with best_of == n: the finished beams arrive as one chunk each, then [DONE].
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                 n=4, stream=True, extra_body=body))
    text = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, n=4,
                                          extra_body=body)
    assert [text[i] for i in range(4)] == [c.message.content for c in full.choices]
    assert [c.message.content for c in full.choices[:2]] == [c.message.content for c in r.choices]
    # stream with best_of != n is refused before anything streams (docs/decisions.md D14).
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, n=1, stream=True,
                                  extra_body=BEAM)
    assert e.value.body["param"] == "best_of"


@pytest.mark.parametrize("extra,param,message", [
    ({"use_beam_search": True, "best_of": 1}, "best_of", "best_of must be greater than 1 when using beam search"),
    ({"use_beam_search": True, "best_of": 11}, "best_of", "best_of (11) is too large for beam search"),
    ({**BEAM, "temperature": 0.7}, "temperature", "temperature must be 0 when using beam search"),
    ({**BEAM, "top_k": 5}, "top_k", "top_k must be -1 when using beam search"),
    ({**BEAM, "early_stopping": "sometimes"}, "early_stopping", "early_stopping must be True, False, or 'never'"),
    ({"early_stopping": True}, "early_stopping", "early_stopping is not effective"),
])
def test_bad_beam_requests_are_400(server, client, model, extra, param, message):
    body = {"temperature": 0, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, extra_body=body)
    assert message in e.value.body["message"] and e.value.body["param"] == param
    assert server.wait_idle()
