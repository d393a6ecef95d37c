"""Beam search on the host (no JAX): HF transformers' algorithm, fed by the sampler's top-k logprobs.

`BeamSearch` is the pure algorithm, one object per request, on floats and token ids. Each step it gets,
per live beam, its cumulative logprob and the top (token id, logprob) pairs of its next-token
distribution (the device sampler's top `max_logprobs`, greedy rows, so the logprobs are the
log_softmax of the processed logits). As in `GenerationMixin._beam_search` (transformers 5.x):
- the candidates are the top K = max(2, 1 + number of stop ids) * width of (beam x token) by
  cumulative logprob;
- a candidate that ends its beam (EOS, a stop id or string, the length limit: the caller decides)
  and ranks within the top `width` becomes a finished hypothesis, scored
  cumulative logprob / generated_len ** length_penalty, where generated_len counts the new token;
  at most `width` hypotheses are kept, the best;
- the first `width` candidates that do not end their beam are the next beams;
- the search stops when `early_stopping` is True and `width` hypotheses are finished; or (True / False)
  when the best running beam's cumulative logprob / generated_len ** length_penalty cannot beat the
  worst of `width` hypotheses (HF's heuristic), or with "never" and length_penalty > 0 the same bound
  at max_new_tokens; or when every candidate ended its beam (the length limit).
Since the K candidates need at most K tokens per beam, the sampler's top list must hold K entries
(`check_beam_width`).

`BeamGroup` is the engine glue for one request: it collects each live beam's draw, runs a step when
every beam has one, forks a parent chosen c times c - 1 times (the children share its KV pages;
copy-on-write handles the partly filled last page), frees parents nobody chose, and keeps finished
hypotheses as token ids and text only (no pages). The request finishes when the search does; its
outputs are the n best hypotheses.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence as Seq

from aphrodite_jax.engine.detokenizer import finished_text
from aphrodite_jax.engine.sequence import Sequence, SequenceStatus
from aphrodite_jax.outputs import CompletionOutput, RequestOutput
from aphrodite_jax.sampling_params import SamplingParams

LOGPROB_FLOOR = -9999.0  # the sampler clamps impossible tokens (-inf) to this; they are never candidates


@dataclass
class Candidate:
    beam: int  # index of the parent among this step's beams
    token_id: int
    logprob: float  # of this token under the parent's distribution
    score: float  # the parent's cumulative logprob + logprob
    rank: int  # 1-based rank of the token in the parent's distribution
    stop: Any = None  # the caller's finish info when this token ends the beam, else None


@dataclass
class Hypothesis:
    score: float  # cumulative_logprob / generated_len ** length_penalty
    cumulative_logprob: float
    payload: Any  # whatever the caller keeps for the output (token ids, text, ...)


def num_candidates(width: int, num_stop_ids: int) -> int:
    """HF's K: enough candidates that `width` of them continue even if each beam's stop ids rank high."""
    return max(2, 1 + num_stop_ids) * width


def check_beam_width(params: SamplingParams, stop_ids: Iterable[int], max_logprobs: int) -> None:
    """ValueError (a 400) when the beam width needs more top tokens per beam than the sampler returns."""
    width = params.best_of
    k = num_candidates(width, len(set(stop_ids)))
    if k > max_logprobs:
        raise ValueError(
            f"best_of ({width}) is too large for beam search: each step needs the top {k} tokens of "
            f"every beam, and the engine returns at most max_logprobs={max_logprobs}; use best_of <= "
            f"{max_logprobs // max(2, 1 + len(set(stop_ids)))}.")


class BeamSearch:
    """The beam search state of one request (see the module docstring)."""

    def __init__(self, width: int, length_penalty: float = 1.0, early_stopping: Any = False,
                 max_new_tokens: Optional[int] = None, num_stop_ids: int = 1):
        if width < 1:
            raise ValueError(f"beam width must be at least 1, got {width}")
        self.width = width
        self.length_penalty = float(length_penalty)
        self.early_stopping = "never" if early_stopping == "never" else bool(early_stopping)
        self.max_new_tokens = max_new_tokens
        self.k = num_candidates(width, num_stop_ids)
        self.hypotheses: list[Hypothesis] = []  # best first, at most `width`
        self.num_generated = 0  # tokens each running beam holds
        self.improvable = True  # HF's is_early_stop_heuristic_unsatisfied (sticky once False)
        self.done = False

    def _full(self) -> bool:
        return len(self.hypotheses) >= self.width

    def step(self, beams: Seq[tuple[float, Iterable[tuple[int, float]]]],
             stop_fn: Callable[[Candidate], Any],
             payload_fn: Callable[[Candidate], Any] = lambda c: None) -> list[Candidate]:
        """One step. beams[i] = (cumulative logprob, top (token id, logprob) pairs, best first).

        stop_fn(candidate) -> None, or finish info when the token ends the beam; payload_fn(candidate)
        -> what a new hypothesis keeps. Returns the next beams (best first; [] once done).
        """
        if self.done:
            raise RuntimeError("beam search already finished")
        cands = [Candidate(i, int(t), float(lp), cum + float(lp), r)
                 for i, (cum, top) in enumerate(beams)
                 for r, (t, lp) in enumerate(top, start=1) if float(lp) > LOGPROB_FLOOR]
        cands.sort(key=lambda c: -c.score)  # stable: ties keep beam order, then rank order
        top = cands[:self.k]
        for c in top:
            c.stop = stop_fn(c)
        length = self.num_generated + 1  # generated length including the new token
        norm = length ** self.length_penalty
        if self.improvable and not (self.early_stopping is True and self._full()):
            for c in top[:self.width]:
                if c.stop is not None:
                    self.hypotheses.append(Hypothesis(c.score / norm, c.score, payload_fn(c)))
            self.hypotheses.sort(key=lambda h: -h.score)
            del self.hypotheses[self.width:]
        running = [c for c in top if c.stop is None][:self.width]
        self.num_generated = length
        if running and self._full():
            if self.early_stopping == "never" and self.length_penalty > 0.0 and self.max_new_tokens:
                best_len = self.max_new_tokens
            else:
                best_len = self.num_generated
            best_possible = running[0].score / best_len ** self.length_penalty
            self.improvable = self.improvable and best_possible > self.hypotheses[-1].score
        self.done = (not running or not self.improvable
                     or (self.early_stopping is True and self._full()))
        return [] if self.done else running

    def best(self, n: int) -> list[Hypothesis]:
        return self.hypotheses[:n]


# ---------------------------------------------------------------------------------- engine glue
def _copy_state(st: Any) -> Any:
    """A SeqState copy whose lists and detokenizer the copy may extend alone."""
    new = copy.copy(st)
    new.token_ids = list(st.token_ids)
    new.logprobs = list(st.logprobs) if st.logprobs is not None else None
    if st.detok is not None:
        new.detok = copy.copy(st.detok)
        new.detok.token_ids = list(st.detok.token_ids)
    return new


@dataclass
class _Final:
    """A finished hypothesis as the output shows it."""

    token_ids: list[int]
    text: str
    logprobs: Optional[list]
    finish_reason: str
    stop_reason: Any = None


class BeamGroup:
    """Beam search of one engine request (see the module docstring). `state` is its RequestState."""

    def __init__(self, state: Any, eos_token_ids: Iterable[int], max_logprobs: int):
        p: SamplingParams = state.params
        self.state = state
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        check_beam_width(p, stop_ids, max_logprobs)
        max_new = p.max_tokens if p.max_tokens is not None else (
            state.stop_checker.max_model_len - len(state.prompt_token_ids))
        self.search = BeamSearch(p.best_of, p.length_penalty, p.early_stopping, max_new, len(stop_ids))
        # What the device sees: a plain greedy row that returns the top max_logprobs tokens.
        self.device_params = dataclasses.replace(
            p, use_beam_search=False, early_stopping=False, length_penalty=1.0, n=1, best_of=1,
            logprobs=max_logprobs, prompt_logprobs=None)
        self.pending: dict[int, Any] = {}  # seq id -> this step's draw

    def add_draw(self, seq: Sequence, draw: Any) -> None:
        self.pending[seq.seq_id] = draw

    # -------------------------------------------------------------- candidates
    def _extend(self, seq: Sequence, draw: Any, c: Candidate, full: bool) -> tuple[Any, Any]:
        """(SeqState after appending c's token to seq, StopResult). Without `full` only the stop
        decision is computed (no text unless stop strings need it)."""
        state, p = self.state, self.state.params
        st = state.seqs[seq.seq_id]
        need_text = full or bool(p.stop)
        new = _copy_state(st) if need_text else st
        delta = ""
        if need_text:
            new.token_ids.append(c.token_id)
            if new.logprobs is not None:
                new.logprobs.append(state.logprob_entry(
                    draw._replace(token_id=c.token_id, logprob=c.logprob, rank=c.rank)))
            delta = new.detok.add_token(c.token_id) if new.detok is not None else ""
            new.text += delta
        res = state.stop_checker.check(p, token_id=c.token_id, new_text=delta, output_text=new.text,
                                       num_output_tokens=seq.get_output_len() + 1,
                                       num_prompt_tokens=len(state.prompt_token_ids))
        return new, res

    def _final(self, seq: Sequence, draw: Any, c: Candidate) -> _Final:
        new, res = self._extend(seq, draw, c, full=True)
        text = finished_text(new.text, new.detok, res.text_len)
        return _Final(new.token_ids, text, new.logprobs, c.stop[0], c.stop[1])

    # -------------------------------------------------------------- the step
    def ready(self) -> bool:
        live = self.state.group.get_unfinished_seqs()
        return bool(live) and all(s.seq_id in self.pending for s in live)

    def step(self, scheduler: Any, new_seq_id: Callable[[], int]) -> bool:
        """Runs one beam step once every live beam has its draw; returns True when the request is done."""
        if not self.ready():
            return False
        group = self.state.group
        beams = group.get_unfinished_seqs()
        draws = [self.pending.pop(s.seq_id) for s in beams]

        def stop_fn(c: Candidate):
            res = self._extend(beams[c.beam], draws[c.beam], c, full=False)[1]
            return (res.finish_reason, res.stop_reason) if res.finished else None

        def payload_fn(c: Candidate) -> _Final:
            return self._final(beams[c.beam], draws[c.beam], c)

        tops = [(s.cumulative_logprob, zip(d.topk_ids.tolist(), d.topk_logprobs.tolist()))
                for s, d in zip(beams, draws)]
        running = self.search.step(tops, stop_fn, payload_fn)
        if self.search.done:  # the hypotheses hold the results; every beam's pages go
            for seq in beams:
                seq.status = SequenceStatus.FINISHED_STOPPED
                scheduler.free_seq(seq)
            return True
        chosen: dict[int, list[Candidate]] = {}
        for c in running:
            chosen.setdefault(c.beam, []).append(c)
        for i, seq in enumerate(beams):
            if i not in chosen:
                self._drop(seq, scheduler)
        for i, cs in chosen.items():
            parent = beams[i]
            targets = []
            for _ in cs[1:]:  # the extra children share the parent's pages
                child = scheduler.fork_seq(group, parent, new_seq_id())
                self.state.seqs[child.seq_id] = _copy_state(self.state.seqs[parent.seq_id])
                targets.append(child)
            targets.insert(0, parent)
            for seq, c in zip(targets, cs):
                self.state.append(seq, draws[i]._replace(token_id=c.token_id, logprob=c.logprob, rank=c.rank))
        return False

    def _drop(self, seq: Sequence, scheduler: Any) -> None:
        """A beam nobody continues: out of the group, its pages released at the end of the step."""
        seq.status = SequenceStatus.FINISHED_ABORTED
        group = self.state.group
        group.seqs = [s for s in group.seqs if s is not seq]
        self.state.seqs.pop(seq.seq_id, None)
        scheduler.free_seq(seq)

    # -------------------------------------------------------------- output
    def to_output(self) -> RequestOutput:
        st = self.state
        outs = []
        if self.search.done:
            for i, h in enumerate(self.search.best(st.params.n)):
                f: _Final = h.payload
                outs.append(CompletionOutput(index=i, text=f.text, token_ids=list(f.token_ids),
                                             cumulative_logprob=h.cumulative_logprob, logprobs=f.logprobs,
                                             finish_reason=f.finish_reason, stop_reason=f.stop_reason))
        return RequestOutput(request_id=st.group.request_id, prompt=st.prompt,
                             prompt_token_ids=st.prompt_token_ids, outputs=outs,
                             finished=self.search.done, prompt_logprobs=st.prompt_logprobs)
