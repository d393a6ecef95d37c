"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers loading the same GGUF.

For 3 chat prompts rendered with the model's own template: 64 greedy tokens from our engine equal
HF's greedy tokens, and our logits through the paged cache over prompt + those tokens match HF's
fp32 forward within 1e-3.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aphrodite_jax import SamplingParams  # noqa: E402
from aphrodite_jax.loaders.resolve import resolve_model  # noqa: E402
from model_test_utils import RunnerDriver  # noqa: E402

pytestmark = pytest.mark.slow

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    r = resolve_model(None)
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(r.folder, gguf_file=r.filename, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding without stopping at EOS, with HF's KV cache."""
    out, past = [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


def test_greedy_tokens_and_logits_match_hf(hf_model, llm):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for m in MESSAGES]
    assert all(p[0] == tok.convert_tokens_to_ids("<|im_start|>") for p in prompts)
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in
            llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)]
    for p, got in zip(prompts, ours):
        assert got == _hf_greedy(hf_model, p, NEW_TOKENS)

    # Logits over prompt + generated tokens: ours through the engine's runner and paged cache (prefill then
    # decode steps), on pages no request holds (every request above has finished).
    runner = llm.engine.runner
    for p, gen in zip(prompts, ours):
        full = p + gen
        with torch.no_grad():
            want = hf_model(input_ids=torch.tensor([full])).logits[0].numpy()  # [L, V]
        pool = RunnerDriver(runner, seed=len(p))
        got = [pool.step({0: p})]
        for t in gen[:-1][:8]:  # 8 decode steps through the cache
            got.append(pool.step({0: [t]}))
        got = np.concatenate(got)  # [len(p) + 8, V]
        np.testing.assert_allclose(got, want[:len(got)], atol=1e-3, rtol=0)


def test_prompt_and_sample_logprobs_match_hf(hf_model, llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("The capital of France is Paris. The capital of Germany is")
    sp = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=3, logprobs=2, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[ids], sampling_params=sp, use_tqdm=False)[0]
    full = ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(input_ids=torch.tensor([full])).logits[0], -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[ids[i]].logprob - ref[i - 1, ids[i]]) < 1e-3
        top = np.argsort(-ref[i - 1])[:3]
        assert [t for t, lp in entry.items() if lp.rank <= 3 and t in top] or entry[ids[i]].rank > 3
        assert entry[ids[i]].rank == 1 + int((ref[i - 1] > ref[i - 1, ids[i]] + 1e-4).sum())
    for j, (tid, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert entry[tid].rank == 1  # greedy picks the top token
        assert abs(entry[tid].logprob - ref[len(ids) + j - 1, tid]) < 1e-3
        assert len(entry) == 2 or (len(entry) == 1)  # the sampled token is one of the top 2
