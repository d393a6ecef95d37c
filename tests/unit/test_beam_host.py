"""Beam search host logic (aphrodite_jax/engine/beam_search.py), no JAX and no real model.

- `BeamSearch` against HF transformers' own `generate(num_beams=...)` on a tiny random Llama, for
  every early_stopping mode and several length penalties: the same hypotheses, in the same order,
  with the same scores.
- `BeamGroup` driven through the real Scheduler / BlockManager by a fake engine loop: the same result
  as the bare algorithm, beams share pages (and copy-on-write happens), and every page comes back at
  the end and on abort.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from aphrodite_jax.config import CacheConfig, SchedulerConfig
from aphrodite_jax.engine.beam_search import BeamGroup, BeamSearch, check_beam_width
from aphrodite_jax.engine.request_state import RequestState
from aphrodite_jax.engine.scheduler import Scheduler
from aphrodite_jax.engine.sequence import Sequence, SequenceGroup
from aphrodite_jax.sampling_params import SamplingParams

EOS = 0
TOPK = 20


class Draw(NamedTuple):  # the fields of runner/device_sampler.Draw
    token_id: int
    logprob: float
    rank: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def toy_logprobs(tokens: list[int], vocab: int = 30) -> np.ndarray:
    """A deterministic, peaky next-token distribution of the whole history; EOS is likely enough."""
    rng = np.random.default_rng(hash(tuple(tokens)) % (2**32))
    logits = rng.normal(0.0, 3.0, vocab)
    logits[EOS] += 0.5 * len(tokens) - 4.0  # EOS grows likelier with length
    return logits - np.logaddexp.reduce(logits)  # f64[V]


def toy_draw(tokens: list[int]) -> Draw:
    lp = toy_logprobs(tokens)
    top = np.argsort(-lp, kind="stable")[:TOPK]
    return Draw(int(top[0]), float(lp[top[0]]), 1, top.astype(np.int32), lp[top].astype(np.float32))


def run_bare(prompt: list[int], width: int, max_new: int, **kw) -> list[tuple[list[int], float]]:
    """The algorithm alone on the toy model: (tokens, score) of every hypothesis, best first."""
    bs = BeamSearch(width, max_new_tokens=max_new, num_stop_ids=1, **kw)
    beams = [([], 0.0)]
    while not bs.done:
        tops = []
        for toks, cum in beams:
            d = toy_draw(prompt + toks)
            tops.append((cum, zip(d.topk_ids.tolist(), d.topk_logprobs.tolist())))

        def stop(c, beams=beams):
            n = len(beams[c.beam][0]) + 1
            return ("stop", None) if c.token_id == EOS else (("length", None) if n >= max_new else None)

        nxt = bs.step(tops, stop, lambda c, beams=beams: beams[c.beam][0] + [c.token_id])
        beams = [(beams[c.beam][0] + [c.token_id], c.score) for c in nxt]
    return [(h.payload, h.score) for h in bs.hypotheses]


# ------------------------------------------------------------------------------- HF parity
@pytest.fixture(scope="module")
def tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, initializer_range=0.8)
    torch.manual_seed(1)  # a seed whose beams often end in EOS, so the early_stopping modes differ
    torch.set_num_threads(1)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.7])
def test_same_hypotheses_as_hf_generate(tiny_llama, early_stopping, length_penalty):
    import torch

    width, max_new = 4, 12
    model = tiny_llama
    for prompt in ([1, 5, 9], [1, 7], [1, 3, 3, 8, 2]):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 num_beams=width, num_return_sequences=width, do_sample=False,
                                 max_new_tokens=max_new, early_stopping=early_stopping,
                                 length_penalty=length_penalty, output_scores=True,
                                 return_dict_in_generate=True)

        def logprobs(tokens):
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1].float()
            return torch.log_softmax(logits, -1).numpy()

        bs = BeamSearch(width, length_penalty, early_stopping, max_new, num_stop_ids=1)
        beams = [([], 0.0)]
        while not bs.done:
            tops = []
            for toks, cum in beams:
                lp = logprobs(prompt + toks)
                top = np.argsort(-lp, kind="stable")[:TOPK]
                tops.append((cum, zip(top.tolist(), lp[top].tolist())))

            def stop(c, beams=beams):
                n = len(beams[c.beam][0]) + 1
                return "eos" if c.token_id == EOS else ("length" if n >= max_new else None)

            nxt = bs.step(tops, stop, lambda c, beams=beams: beams[c.beam][0] + [c.token_id])
            beams = [(beams[c.beam][0] + [c.token_id], c.score) for c in nxt]
        assert len(bs.hypotheses) == width
        for k, h in enumerate(bs.hypotheses):
            want = ref.sequences[k, len(prompt):].tolist()
            assert want[:len(h.payload)] == h.payload, (prompt, k)
            assert all(t == EOS for t in want[len(h.payload):])  # HF pads shorter ones with EOS
            assert abs(float(ref.sequences_scores[k]) - h.score) < 1e-4 * max(1.0, abs(h.score))


def test_early_stopping_modes_search_longer_in_order():
    """True stops once `width` hypotheses are done, False when the heuristic says the running beams
    cannot win, "never" only at the exact bound: each later stop can only swap in better hypotheses."""
    got = {m: run_bare([3, 1, 4], 3, 16, early_stopping=m) for m in (True, False, "never")}
    assert all(len(v) == 3 for v in got.values())
    worst = [got[m][-1][1] for m in (True, False, "never")]
    assert worst[0] < worst[1] < worst[2]  # this toy prompt tells all three apart
    assert got[True][:2] == got[False][:2] == got["never"][:2]


def test_beam_width_check():
    params = SamplingParams(use_beam_search=True, best_of=10, temperature=0.0)
    check_beam_width(params, [EOS], 20)
    with pytest.raises(ValueError, match=r"^best_of \(11\) is too large for beam search"):
        check_beam_width(SamplingParams(use_beam_search=True, best_of=11, temperature=0.0), [EOS], 20)
    with pytest.raises(ValueError, match="best_of <= 6"):  # two stop ids: K = 3 * width
        check_beam_width(SamplingParams(use_beam_search=True, best_of=7, temperature=0.0), [EOS, 7], 20)


# ------------------------------------------------------------------------------- engine glue
BS = 8


def make_request(prompt, width, max_new, n=None, **kw):
    sched = Scheduler(SchedulerConfig(max_num_seqs=16), CacheConfig(block_size=BS), 64, 0, 256)
    params = SamplingParams(use_beam_search=True, best_of=width, n=n or width, temperature=0.0,
                            max_tokens=max_new, **kw)
    seq = Sequence(0, list(prompt))
    group = SequenceGroup("r", [seq], 0.0, params)
    state = RequestState(group=group, params=params, seed=0, prompt=None, prompt_token_ids=list(prompt),
                         tokenizer=None, eos_token_ids=(EOS,), max_model_len=256)
    state.init_seq(seq, index=0)
    state.beam = BeamGroup(state, (EOS,), TOPK)
    sched.add_seq_group(group)
    return sched, state


def engine_loop(sched, state, max_steps=100, abort_after=None):
    """schedule -> on_step_done -> draws -> beam step -> free, as LLMEngine.step does."""
    ids = iter(range(1, 10_000))
    stats = {"copies": 0, "shared": False}
    for n in range(max_steps):
        out = sched.schedule()
        stats["copies"] += len(out.blocks_to_copy)
        sched.on_step_done(out)
        for r in out.scheduled:
            if r.do_sample:
                state.beam.add_draw(r.seq, toy_draw(r.seq.token_ids))
        done = state.beam.step(sched, lambda: next(ids))
        bm = sched.block_manager
        tables = [bm.get_block_table(s) for s in state.group.get_unfinished_seqs() if bm.has_gpu_blocks(s)]
        used = {b for t in tables for b in t}
        stats["shared"] |= len(used) < sum(len(t) for t in tables)
        sched.free_finished_seq_groups()
        if done:
            return stats
        if abort_after is not None and n == abort_after:
            sched.abort_seq_group("r")
            sched.schedule()
            return stats
    raise AssertionError("beam search did not finish")


@pytest.mark.parametrize("width,n", [(4, 4), (3, 1), (2, 2)])
def test_group_matches_bare_search_and_frees_every_page(width, n):
    prompt, max_new = [5, 6, 7, 8, 9], 14
    sched, state = make_request(prompt, width, max_new, n=n)
    stats = engine_loop(sched, state)
    want = run_bare(prompt, width, max_new)
    out = state.to_output()
    assert out.finished and len(out.outputs) == n
    assert [o.token_ids for o in out.outputs] == [w[0] for w in want[:n]]
    for o in out.outputs:
        assert o.finish_reason == ("stop" if o.token_ids[-1] == EOS else "length")
        assert abs(o.cumulative_logprob - sum(toy_logprobs(prompt + o.token_ids[:j])[t]
                                              for j, t in enumerate(o.token_ids))) < 1e-3
    assert stats["shared"] and stats["copies"] > 0  # forks share pages; copy-on-write splits them
    bm = sched.block_manager
    assert bm.num_free_gpu_blocks == bm.num_gpu_blocks and not sched.running
    assert state.group.is_finished()


def test_abort_mid_search_frees_every_page():
    sched, state = make_request([5, 6, 7, 8, 9], 4, 14)
    engine_loop(sched, state, abort_after=3)
    bm = sched.block_manager
    assert bm.num_free_gpu_blocks == bm.num_gpu_blocks
    assert not sched.running and not sched.waiting and not sched.has_unfinished_seqs()


def test_unfinished_request_reports_nothing_and_waits_for_every_beam():
    sched, state = make_request([5, 6, 7, 8, 9], 3, 14)
    ids = iter(range(1, 100))
    for _ in range(2):  # prefill, then a step with 3 beams
        out = sched.schedule()
        sched.on_step_done(out)
        for r in out.scheduled:
            state.beam.add_draw(r.seq, toy_draw(r.seq.token_ids))
        assert not state.beam.step(sched, lambda: next(ids))
        sched.free_finished_seq_groups()
    live = state.group.get_unfinished_seqs()
    assert len(live) == 3 and not state.to_output().outputs and not state.to_output().finished
    state.beam.add_draw(live[0], toy_draw(live[0].token_ids))  # one beam of three: no step yet
    assert not state.beam.ready() and not state.beam.step(sched, lambda: next(ids))
    assert [s.get_output_len() for s in state.group.get_unfinished_seqs()] == [2, 2, 2]
    for s in live[1:]:
        state.beam.add_draw(s, toy_draw(s.token_ids))
    assert state.beam.ready()
    state.beam.step(sched, lambda: next(ids))
    assert {s.get_output_len() for s in state.group.get_unfinished_seqs()} == {3}


@pytest.mark.parametrize("num_cpu", [0, 64])  # preempted by recompute, or by swap
def test_preempted_beam_requests_give_the_same_beams(num_cpu):
    """Three 4-beam requests in a cache too small for all: preemption (every beam re-prefilled and
    sampled again, or swapped out and back) does not change any request's beams."""
    prompts = [[5, 6, 7, 8, 9], [2, 4, 6, 8, 10, 12], [11, 3, 7]]
    sched = Scheduler(SchedulerConfig(max_num_seqs=16), CacheConfig(block_size=BS), 14, num_cpu, 256)
    states = {}
    for i, p in enumerate(prompts):
        params = SamplingParams(use_beam_search=True, best_of=4, n=4, temperature=0.0, max_tokens=14,
                                early_stopping="never")
        seq = Sequence(i * 1000, list(p))
        group = SequenceGroup(str(i), [seq], float(i), params)
        st = RequestState(group=group, params=params, seed=0, prompt=None, prompt_token_ids=list(p),
                          tokenizer=None, eos_token_ids=(EOS,), max_model_len=256)
        st.init_seq(seq, index=0)
        st.beam = BeamGroup(st, (EOS,), TOPK)
        states[str(i)] = st
        sched.add_seq_group(group)
    ids = iter(range(1, 10_000))
    for _ in range(400):
        if not sched.has_unfinished_seqs():
            break
        out = sched.schedule()
        sched.on_step_done(out)
        for r in out.scheduled:
            if r.do_sample:
                states[r.group.request_id].beam.add_draw(r.seq, toy_draw(r.seq.token_ids))
        for st in states.values():
            if not st.group.is_finished():
                st.beam.step(sched, lambda: next(ids))
        sched.free_finished_seq_groups()
    assert sched.num_preemptions > 0 and not sched.has_unfinished_seqs()
    for i, p in enumerate(prompts):
        want = run_bare(p, 4, 14, early_stopping="never")
        assert [o.token_ids for o in states[str(i)].to_output().outputs] == [w[0] for w in want]
    bm = sched.block_manager
    assert bm.num_free_gpu_blocks == bm.num_gpu_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks
