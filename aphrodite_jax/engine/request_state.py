"""Per-request output bookkeeping: seeds, detokenization, stop checks, logprobs, n/best_of selection.

Pure Python (no JAX). The engine owns one RequestState per live request; the scheduler never sees it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from aphrodite_jax.engine.detokenizer import IncrementalDetokenizer, finished_text, token_text
from aphrodite_jax.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from aphrodite_jax.engine.stop_checker import StopChecker, StopResult
from aphrodite_jax.outputs import CompletionOutput, Logprob, RequestOutput
from aphrodite_jax.sampling.filters_history import mirostat_update
from aphrodite_jax.sampling.metadata import SamplingRow
from aphrodite_jax.sampling_params import SamplingParams, sequence_seed

logger = logging.getLogger(__name__)


@dataclass
class SeqState:
    index: int  # position among the request's best_of sequences
    seed: int
    detok: Optional[IncrementalDetokenizer]
    text: str = ""
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    token_ids: list[int] = field(default_factory=list)
    mirostat_mu: Optional[float] = None  # Mirostat v2 state (None: not started, 2 * tau)
    guide: Any = None  # this sequence's GuideState when the request is guided


class RequestState:
    def __init__(self, *, group: SequenceGroup, params: SamplingParams, seed: int, prompt: Optional[str],
                 prompt_token_ids: list[int], tokenizer: Any, eos_token_ids: tuple[int, ...],
                 max_model_len: int, guide: Any = None):
        self.group = group
        self.guide = guide  # the request's CompiledGuide (aphrodite_jax/guided), or None
        self.params = params
        self.seed = seed
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.tokenizer = tokenizer
        self.stop_checker = StopChecker(max_model_len, eos_token_ids)
        self.best_of = params.best_of or params.n
        self.seqs: dict[int, SeqState] = {}
        self.beam: Optional[Any] = None  # a BeamGroup (engine/beam_search.py) for beam search requests
        # One entry per prompt token (None for the first, which nothing predicts).
        self.prompt_logprobs: Optional[list] = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None)

    # ------------------------------------------------------------------ sequences
    def init_seq(self, seq: Sequence, index: int, parent: Optional[Sequence] = None) -> None:
        detok = None
        if self.tokenizer is not None and self.params.detokenize:
            detok = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids,
                                           skip_special_tokens=self.params.skip_special_tokens,
                                           spaces_between_special_tokens=self.params.spaces_between_special_tokens)
        self.seqs[seq.seq_id] = SeqState(index=index, seed=sequence_seed(self.seed, index), detok=detok,
                                         logprobs=[] if self.params.logprobs is not None else None)
        if self.guide is not None:
            state = self.guide.new_state()
            for t in seq.output_token_ids:  # a fork resumes from the tokens it inherited
                state.accept(t)
            self.seqs[seq.seq_id].guide = state

    def guide_state(self, seq: Sequence) -> Any:
        return self.seqs[seq.seq_id].guide

    def num_draws(self, seq: Sequence) -> int:
        """best_of draws from the prompt's logits on the first sample (the siblings fork from it)."""
        if self.best_of > 1 and seq.get_output_len() == 0 and self.group.num_seqs() == 1 and not self.beam:
            return self.best_of
        return 1

    def sample_spec(self, seq: Sequence, fork: int) -> SamplingRow:
        st = self.seqs[seq.seq_id]
        seed = sequence_seed(self.seed, fork) if fork else st.seed
        params = self.beam.device_params if self.beam is not None else self.params
        return SamplingRow(params, seed, seq.get_output_len(), seq.prompt_token_ids,
                           seq.output_token_ids, st.mirostat_mu)

    def append(self, seq: Sequence, draw: Any) -> bool:
        """Append one sampled token; returns True when the sequence finished."""
        st = self.seqs[seq.seq_id]
        rejected = st.guide is not None and not st.guide.accept(draw.token_id)
        seq.append_token(draw.token_id, draw.logprob)
        st.token_ids.append(draw.token_id)
        if self.params.mirostat_mode == 2:
            p = self.params
            mu = 2.0 * p.mirostat_tau if st.mirostat_mu is None else st.mirostat_mu
            st.mirostat_mu = mirostat_update(mu, draw.logprob, p.mirostat_tau, p.mirostat_eta)
        if st.logprobs is not None:
            st.logprobs.append(self.logprob_entry(draw))
        delta = st.detok.add_token(draw.token_id) if st.detok is not None else ""
        st.text += delta
        res = self.stop_checker.check(self.params, token_id=draw.token_id, new_text=delta,
                                      output_text=st.text, num_output_tokens=seq.get_output_len(),
                                      num_prompt_tokens=len(self.prompt_token_ids))
        if rejected and not res.finished:
            # Only when samplers removed every token the guide allowed (e.g. min_tokens banning the
            # EOS a finished guide needs): end here rather than generate outside the guide.
            logger.warning("request %s: sampled token %d is outside its guide; finishing the sequence",
                           self.group.request_id, draw.token_id)
            res = StopResult("stop", None, len(st.text))
        if not res.finished:
            return False
        st.text = finished_text(st.text, st.detok, res.text_len)
        st.finish_reason, st.stop_reason = res.finish_reason, res.stop_reason
        seq.status = SequenceStatus.FINISHED_STOPPED if res.finish_reason == "stop" else SequenceStatus.FINISHED_LENGTH
        return True

    def logprob_entry(self, draw: Any) -> dict[int, Logprob]:
        """The logprobs entry of one draw: its token and the top `logprobs` (beam search reuses it)."""
        k = self.params.logprobs or 0
        entry = {draw.token_id: Logprob(draw.logprob, draw.rank, self._text(draw.token_id))}
        for r, (tid, lp) in enumerate(zip(draw.topk_ids[:k], draw.topk_logprobs[:k]), start=1):
            entry.setdefault(int(tid), Logprob(float(lp), r, self._text(int(tid))))
        return entry

    def set_prompt_logprobs(self, start: int, values: list[tuple]) -> None:
        """values[j] = (logprob, rank, topk ids, topk logprobs) of prompt token start + j + 1."""
        k = self.params.prompt_logprobs or 0
        for j, (lp, rank, top_ids, top_lps) in enumerate(values):
            tid = self.prompt_token_ids[start + j + 1]
            entry = {tid: Logprob(float(lp), int(rank), self._text(tid))}
            for r, (t, l) in enumerate(zip(top_ids[:k], top_lps[:k]), start=1):
                entry.setdefault(int(t), Logprob(float(l), r, self._text(int(t))))
            self.prompt_logprobs[start + j + 1] = entry

    def _text(self, token_id: int) -> Optional[str]:
        return token_text(self.tokenizer, token_id) if self.tokenizer is not None else None

    # ------------------------------------------------------------------ outputs
    def _completion(self, seq: Sequence, st: SeqState, finished: bool) -> CompletionOutput:
        text = st.text if finished or st.finish_reason else StopChecker.releasable_text(self.params, st.text)
        return CompletionOutput(index=st.index, text=text, token_ids=list(st.token_ids),
                                cumulative_logprob=seq.cumulative_logprob, logprobs=st.logprobs,
                                finish_reason=st.finish_reason, stop_reason=st.stop_reason)

    def to_output(self) -> RequestOutput:
        if self.beam is not None:
            return self.beam.to_output()
        finished = self.group.is_finished()
        pairs = [(seq, self.seqs[seq.seq_id]) for seq in self.group.get_seqs()]
        if finished and len(pairs) > self.params.n:
            pairs.sort(key=lambda p: p[0].cumulative_logprob, reverse=True)
            pairs = pairs[:self.params.n]
        outs = [self._completion(seq, st, finished) for seq, st in pairs]
        if finished:
            for i, o in enumerate(sorted(outs, key=lambda o: o.index)):
                o.index = i
            outs.sort(key=lambda o: o.index)
        return RequestOutput(request_id=self.group.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=outs, finished=finished,
                             prompt_logprobs=self.prompt_logprobs)

    def finish_ignored(self) -> RequestOutput:
        for seq in self.group.get_seqs():
            st = self.seqs[seq.seq_id]
            st.finish_reason = "length"
        return RequestOutput(request_id=self.group.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids,
                             outputs=[self._completion(s, self.seqs[s.seq_id], True) for s in self.group.get_seqs()],
                             finished=True)
