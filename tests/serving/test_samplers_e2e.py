"""End to end: every sampler parameter through the official openai client's
`extra_body`, on the real server and the default model, is accepted and changes the output where it
should; repetition_penalty lowers repetition; top_k=1 equals greedy; a registered research sampler is
reachable through extra_body."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

pytestmark = pytest.mark.slow

REPEAT = "one two three, one two three, one two three, one two"
STORY = "Once upon a time, in a small village by the sea, there lived"

# (name, extra_body that turns the sampler on, extra_body of the baseline it must differ from).
# Every case draws one token at temperature 1 with top-20 logprobs: the returned logprobs are those
# of the processed distribution, so a sampler that acts shows up in them.
CASES = [
    ("temperature", {"temperature": 0.5}, {}),
    ("dynatemp", {"dynatemp_min": 0.2, "dynatemp_max": 0.6}, {}),
    ("top_p", {"top_p": 0.5}, {}),
    ("top_k", {"top_k": 3}, {}),
    ("top_a", {"top_a": 0.5}, {}),
    ("min_p", {"min_p": 0.1}, {}),
    ("tfs", {"tfs": 0.5}, {}),
    ("eta_cutoff", {"eta_cutoff": 30.0}, {}),
    ("epsilon_cutoff", {"epsilon_cutoff": 50.0}, {}),
    ("typical_p", {"typical_p": 0.3}, {}),
    ("smoothing", {"smoothing_factor": 0.5, "smoothing_curve": 1.5}, {}),
    ("nsigma", {"nsigma": 0.5}, {}),
    ("xtc", {"xtc_threshold": 0.02, "xtc_probability": 1.0}, {}),
    ("skew", {"skew": 1.0}, {}),
    ("repetition_penalty", {"repetition_penalty": 1.5}, {}),
    ("frequency_penalty", {"frequency_penalty": 1.5}, {}),
    ("presence_penalty", {"presence_penalty": 1.5}, {}),
    ("no_repeat_ngram_size", {"no_repeat_ngram_size": 2}, {}),
    ("dry", {"dry_multiplier": 2.0, "dry_base": 2.0, "dry_allowed_length": 2,
             "dry_sequence_breakers": ["\n"], "dry_range": 0}, {}),
    ("logit_bias", {"logit_bias": {"1": 20.0}}, {}),
    ("allowed_token_ids", {"allowed_token_ids": [1, 2, 3, 4, 5]}, {}),
    ("custom_token_bans", {"custom_token_bans": "TOP"}, {}),
    ("token_ban_ranges", {"token_ban_ranges": "TOP"}, {}),
    ("mirostat", {"mirostat_mode": 2, "mirostat_tau": 1.0, "mirostat_eta": 0.1}, {}),
    # temperature 3 flattens before min-p in the default order (more survive); min-p first cuts more
    ("temperature_last", {"temperature": 3.0, "min_p": 0.1, "temperature_last": True},
     {"temperature": 3.0, "min_p": 0.1}),
    ("sampler_priority", {"temperature": 3.0, "min_p": 0.1,
                          "sampler_priority": [2, 5, 0, 1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13]},
     {"temperature": 3.0, "min_p": 0.1}),
]


def _first_step(client, model, prompt, body):
    """[{token: logprob}] of the first two generated tokens' top 20 (the processed distribution;
    the second step shows the penalties that only count generated tokens)."""
    body = {"temperature": 1.0, **body}
    temperature = body.pop("temperature")
    r = client.completions.create(model=model, prompt=prompt, max_tokens=2, logprobs=20, seed=7,
                                  temperature=temperature, extra_body={"ignore_eos": True, **body})
    return r.choices[0].logprobs.top_logprobs


def _differs(a: list, b: list) -> bool:
    for x, y in zip(a, b):
        if set(x) != set(y) or any(abs(x[k] - y[k]) > 1e-3 for k in x):
            return True
    return False


def test_every_sampler_parameter_is_accepted_and_acts(server, client, model):
    tok = server.engine.tokenizer
    top_id = None
    base = _first_step(client, model, REPEAT, {})[0]
    top_text = max(base, key=base.get)
    top_id = tok.convert_tokens_to_ids(tok.tokenize(top_text))[0] if tok.tokenize(top_text) else 0
    jobs = []
    for name, on, off in CASES:
        on = dict(on)
        if on.get("custom_token_bans") == "TOP":
            on["custom_token_bans"] = [top_id]
        if on.get("token_ban_ranges") == "TOP":
            on["token_ban_ranges"] = [[[top_id], 0, 1]]
        jobs.append((name, on, off))
    with ThreadPoolExecutor(16) as pool:  # concurrently: the engine batches them
        got = list(pool.map(lambda j: (_first_step(client, model, STORY if j[2] else REPEAT, j[1]),
                                       _first_step(client, model, STORY if j[2] else REPEAT, j[2])), jobs))
    unchanged = [name for (name, _, _), (on, off) in zip(jobs, got) if not _differs(on, off)]
    assert unchanged == [], [(n, o[0]) for (n, _, _), o in zip(jobs, got) if n in unchanged]


def test_mixed_samplers_on_chat_and_completions(client, model):
    """Both routes take the whole set at once, streaming and not."""
    extra = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "dry_multiplier": 0.8,
             "no_repeat_ngram_size": 4, "xtc_probability": 0.3, "mirostat_mode": 2, "mirostat_tau": 5.0,
             "mirostat_eta": 0.1, "temperature_last": True, "token_ban_ranges": [[[0], 0, 3]], "skew": 0.1}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=8, seed=1, extra_body=extra)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=model, prompt=STORY, max_tokens=8, seed=1, stream=True,
                                            extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=STORY, max_tokens=2, extra_body={"sampler_priority": [0, 1]})
    assert e.value.body["param"] == "sampler_priority" if isinstance(e.value.body, dict) else True


def _repeat_rate(tokens):
    return 1.0 - len(set(tokens)) / len(tokens)


def test_repetition_penalty_lowers_repetition_and_top_k_1_is_greedy(server, client, model):
    tok = server.engine.tokenizer

    def gen(**kw):
        r = client.completions.create(model=model, prompt=STORY, max_tokens=160, temperature=0,
                                      extra_body={"ignore_eos": True, **kw})
        return tok.encode(r.choices[0].text, add_special_tokens=False)

    plain, penalised = gen(), gen(repetition_penalty=1.3)
    assert _repeat_rate(penalised) < _repeat_rate(plain)
    greedy = client.completions.create(model=model, prompt=STORY, max_tokens=32, temperature=0).choices[0].text
    top1 = client.completions.create(model=model, prompt=STORY, max_tokens=32, temperature=1.0, top_p=1.0,
                                     seed=5, extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy


def test_research_sampler_through_extra_body(server, client, model):
    import jax.numpy as jnp

    from aphrodite_jax.sampling.registry import register_sampler, unregister_sampler

    @register_sampler("force_token", fields={"force_token_id": (-1, np.int32)},
                      active=lambda p: p["force_token_id"] >= 0)
    def force_token(logits, p, md):
        ids = jnp.arange(logits.shape[-1])[None, :]
        return jnp.where(ids == p["force_token_id"][:, None], logits, -jnp.inf)

    try:
        r = client.completions.create(model=model, prompt=STORY, max_tokens=3, temperature=1.0,
                                      extra_body={"force_token_id": 28})
        assert r.usage.completion_tokens == 3
        assert r.choices[0].text == server.engine.tokenizer.decode([28] * 3)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt=STORY, max_tokens=1,
                                      extra_body={"extra_args": {"no_such_field": 1}})
        # The Kobold API takes the same top-level field.
        import httpx

        k = httpx.post(server.base_url + "/api/v1/generate", timeout=120,
                       json={"prompt": STORY, "max_length": 3, "max_context_length": 2048, "temperature": 1.0,
                             "rep_pen": 1.0, "force_token_id": 28})
        assert k.status_code == 200, k.text
        assert k.json()["results"][0]["text"] == server.engine.tokenizer.decode([28] * 3)
    finally:
        unregister_sampler("force_token")

