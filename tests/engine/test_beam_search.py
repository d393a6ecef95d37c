"""Beam search on the real default model (SmolLM2-135M GGUF) against HF transformers.

HF's reference model is built from the same GGUF in fp32 (tests/models/test_smollm2_parity.py) and
runs `generate(num_beams=4, do_sample=False)`. Also: no compiles, batch invariance, and an aborted
beam request gives back every page.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from aphrodite_jax import SamplingParams  # noqa: E402
from aphrodite_jax.runner.compile_guard import COUNTER, forbid_compiles  # noqa: E402
from engine_utils import assert_all_pages_free, random_prompt  # noqa: E402
from test_smollm2_parity import MESSAGES, hf_model  # noqa: E402,F401  (the module fixture)

pytestmark = pytest.mark.slow

WIDTH, NEW_TOKENS = 4, 24


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.get_tokenizer()
    return [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False) for m in MESSAGES]


def beam_params(n=WIDTH, **kw):
    return SamplingParams(use_beam_search=True, best_of=WIDTH, n=n, temperature=0.0,
                          max_tokens=NEW_TOKENS, **kw)


@pytest.fixture(scope="module")
def ours(llm, prompts):
    """The 3 prompts' beam searches in one batch, with no compile allowed."""
    before = COUNTER.compiles
    with forbid_compiles():
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=beam_params(), use_tqdm=False)
    assert COUNTER.compiles == before
    assert_all_pages_free(llm)
    return outs


def test_best_beams_match_hf_generate(hf_model, llm, prompts, ours):  # noqa: F811 (the imported fixture)
    eos = llm.engine.eos_token_ids
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # HF's 4-beam decode is ~10x faster single-threaded on a busy 2-core box
    try:
        for p, out in zip(prompts, ours):
            with torch.no_grad():
                ref = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                        num_beams=WIDTH, num_return_sequences=WIDTH, do_sample=False,
                                        max_new_tokens=NEW_TOKENS, output_scores=True,
                                        return_dict_in_generate=True)
            assert out.finished and len(out.outputs) == WIDTH
            for k, o in enumerate(out.outputs):
                want = ref.sequences[k, len(p):].tolist()
                got = o.token_ids
                if k == 0:
                    assert got == want[:len(got)], "the best beam differs from HF's"
                assert got == want[:len(got)] and all(t in eos for t in want[len(got):]), k
                # HF's sequence score: cumulative logprob / generated length (EOS included).
                assert abs(o.cumulative_logprob / len(got) - float(ref.sequences_scores[k])) < 2e-3
                assert o.finish_reason == ("stop" if got[-1] in eos else "length")
                assert (o.finish_reason == "length") == (len(got) == NEW_TOKENS)
    finally:
        torch.set_num_threads(threads)
    # The prompts cover both ends: a search that ends on EOS and one cut at max_tokens.
    reasons = {o.finish_reason for out in ours for o in out.outputs}
    assert reasons == {"stop", "length"}


def test_n_returns_the_best_beams_in_score_order(llm, prompts, ours):
    outs = llm.generate(prompt_token_ids=prompts[:1] * 2, sampling_params=[beam_params(n=1), beam_params(n=2)],
                        use_tqdm=False)
    full = ours[0].outputs
    scores = [o.cumulative_logprob / len(o.token_ids) for o in full]
    assert scores == sorted(scores, reverse=True)
    for out, n in zip(outs, (1, 2)):
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in full[:n]]
        assert [o.index for o in out.outputs] == list(range(n))
        assert out.outputs[0].text == full[0].text and full[0].text


def test_beam_request_in_a_busy_batch_matches_alone(llm, prompts, ours):
    rng = random.Random(5)
    others = [random_prompt(rng, rng.choice([3, 30, 200])) for _ in range(6)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=rng.randint(4, 30),
                             ignore_eos=True) for i in range(6)]
    # Two beam requests among 6 others, one of them joining while the rest are decoding.
    outs = llm.generate(prompt_token_ids=others[:3] + [prompts[2]] + others[3:] + [prompts[0]],
                        sampling_params=params[:3] + [beam_params()] + params[3:] + [beam_params()],
                        use_tqdm=False)
    for got, want in ((outs[3], ours[2]), (outs[-1], ours[0])):
        assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
        assert [o.text for o in got.outputs] == [o.text for o in want.outputs]
    assert_all_pages_free(llm)


def test_abort_frees_every_page(llm, prompts):
    eng = llm.engine
    eng.add_request("beam-abort", None, beam_params(), prompt_token_ids=prompts[2])
    bm = eng.scheduler.block_manager
    shared = False
    for _ in range(6):
        assert not [o for o in eng.step() if o.request_id == "beam-abort"]  # no partial outputs
        seqs = eng.requests["beam-abort"].group.get_unfinished_seqs()
        tables = [bm.get_block_table(s) for s in seqs]
        shared |= len({b for t in tables for b in t}) < sum(len(t) for t in tables)
    assert len(seqs) == WIDTH and shared  # 4 live beams sharing their prompt pages
    eng.abort_request("beam-abort")
    assert_all_pages_free(llm)


def test_stop_strings_end_beams(llm, prompts, ours):
    """A stop string ends a beam like EOS: cut from the text, finish "stop", stop_reason the string."""
    assert any("," in o.text for o in ours[2].outputs)  # without the stop string the beams go past it
    out = llm.generate(prompt_token_ids=[prompts[2]], sampling_params=beam_params(stop=[","]),
                       use_tqdm=False)[0]
    assert len(out.outputs) == WIDTH
    for o in out.outputs:
        assert "," not in o.text
        assert (o.finish_reason, o.stop_reason) in {("stop", ","), ("stop", None), ("length", None)}
    assert any(o.stop_reason == "," for o in out.outputs)
    scores = [o.cumulative_logprob / len(o.token_ids) for o in out.outputs]
    assert scores == sorted(scores, reverse=True)
    assert_all_pages_free(llm)
