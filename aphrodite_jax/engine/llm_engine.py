"""LLMEngine: the spine. `step()` = schedule -> run one jitted step -> process the outputs.

Everything a newcomer needs to follow a request is here:
- `add_request` tokenizes, validates and queues a SequenceGroup;
- `step` asks the Scheduler what to run, moves pages (swap/copy-on-write), runs the model and the
  sampler on device through the ModelRunner, then appends tokens, detokenizes, checks stops and frees
  finished sequences;
- `abort_request` frees a request's pages wherever it is.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.engine.beam_search import BeamGroup
from aphrodite_jax.engine.request_state import RequestState
from aphrodite_jax.engine.scheduler import Scheduler, SchedulerOutput
from aphrodite_jax.engine.sequence import Sequence, SequenceGroup
from aphrodite_jax.engine.snapshot import EngineSnapshot
from aphrodite_jax.outputs import RequestOutput
from aphrodite_jax.runner.compile_guard import forbid_compiles
from aphrodite_jax.runner.step_io import StepInput
from aphrodite_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# benchmarks/serve.py --startup-runs parses this line: keep the wording in step with its regex.
READY_LOG = "Engine ready in %.1f s (load %.1f s, compile %.1f s over %d variants)"


class PromptTooLongError(ValueError):
    pass


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        """`config` is the user's; the engine keeps its resolved, frozen value as `self.config`."""
        from aphrodite_jax.engine.model_setup import build_model_stack  # JAX lives behind this import

        t0 = time.perf_counter()
        stack = build_model_stack(config)
        t_loaded = time.perf_counter()
        self.config = config = stack.config
        self.runner = stack.runner
        self.tokenizer = stack.tokenizer
        self.hf_config = stack.hf_config
        self.max_model_len = stack.max_model_len
        self.eos_token_ids = stack.eos_token_ids
        # generation_config.json defaults ({} if none): the server's chat defaults (docs/decisions.md D20)
        self.generation_config = stack.generation_config
        self.sampler = stack.sampler
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_gpu_blocks,
                                   self.runner.num_cpu_blocks, self.max_model_len,
                                   token_buckets=self.runner.token_buckets, tuning=self.runner.tuning)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.model.seed)
        self.stats = EngineStats()
        # The requests the current (or last) step touched: if the step raises, these are the ones
        # to fail (AsyncLLMEngine); everything else is still consistent and carries on.
        self.step_request_ids: list[str] = []
        stack.warmup()
        from aphrodite_jax.guided.manager import GuidedDecoding

        self.guided = GuidedDecoding(self.tokenizer, self.runner.vocab_size, self.eos_token_ids)
        self.guided.warmup(self.runner.sample_buckets, self.runner.device_put)
        t_ready = time.perf_counter()
        variants = self.runner.num_variants + self.sampler.num_variants
        self.startup_times = {"ready_s": t_ready - t0, "load_s": t_loaded - t0, "compile_s": t_ready - t_loaded,
                              "variants": variants}  # load: weights, tokenizer, KV cache; compile: warm-up
        logger.info(READY_LOG, t_ready - t0, t_loaded - t0, t_ready - t_loaded, variants)

    # ------------------------------------------------------------------ what the server reads
    @property
    def model_name(self) -> Optional[str]:
        """The model path or hub id as given (None: the bundled default)."""
        return self.config.model.model

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def max_logprobs(self) -> int:
        return self.config.max_logprobs

    def check_params(self, params: SamplingParams) -> None:
        """The checks of sampling params that need this engine's vocabulary (token ids in logit_bias,
        allowed_token_ids, custom_token_bans). add_request runs them; the server may run them first, off
        the engine thread, so the error names its field. Raises ValueError."""
        params.verify_vocab(self.vocab_size)

    def compile_guide(self, guided: Any) -> Any:
        """Compile (and cache) a request's guided-decoding guide; raises GuideError or ValueError. Safe off
        the engine thread: the engine's add_request then finds the guide in the cache."""
        return self.guided.compile(guided)

    def snapshot(self) -> EngineSnapshot:
        """A copy of the queues, KV usage and counters (not thread-safe itself: AsyncLLMEngine.snapshot)."""
        return EngineSnapshot.capture(self.stats, self.scheduler, self.runner.num_gpu_blocks,
                                      self.runner.num_cpu_blocks)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: Optional[str], sampling_params: SamplingParams,
                    prompt_token_ids: Optional[list[int]] = None, arrival_time: Optional[float] = None,
                    add_special_tokens: bool = True) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        params = sampling_params
        params.verify_max_logprobs(self.config.max_logprobs)
        self.check_params(params)
        self.sampler.verify(params)
        width = max(params.n, params.best_of or params.n)
        if width > self.config.scheduler.max_num_seqs:
            raise ValueError(f"n/best_of ({width}) cannot exceed max_num_seqs "
                             f"({self.config.scheduler.max_num_seqs})")
        if params.truncate_prompt_tokens:
            prompt_token_ids = prompt_token_ids[-params.truncate_prompt_tokens:]
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {len(prompt_token_ids)} tokens, which leaves no room for output.")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary")
        guide = self.guided.compile(params.guided_decoding) if params.guided_decoding else None
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        seq = Sequence(next(self._seq_ids), prompt_token_ids)
        group = SequenceGroup(request_id, [seq], arrival_time or time.time(), params)
        state = RequestState(group=group, params=params, seed=seed, prompt=prompt,
                             prompt_token_ids=prompt_token_ids, tokenizer=self.tokenizer,
                             eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                             guide=guide)
        state.init_seq(seq, index=0)
        if params.use_beam_search:
            state.beam = BeamGroup(state, self.eos_token_ids, self.config.max_logprobs)
        self.requests[request_id] = state
        self.scheduler.add_seq_group(group)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self.requests.pop(rid, None)
            if state is not None:
                self.scheduler.abort_seq_group(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_seqs()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_seq_groups()

    # ------------------------------------------------------------------ the spine
    def step(self) -> list[RequestOutput]:
        if self.config.forbid_compile_after_warmup:
            with forbid_compiles():
                return self._step()
        return self._step()

    def is_healthy(self) -> bool:
        """False once the device state is gone (a step that failed after donating the KV cache)."""
        caches = getattr(self.runner, "kv_caches", None) or []
        return not any(getattr(c, "is_deleted", lambda: False)() for c in caches)

    def _step(self) -> list[RequestOutput]:
        self.step_request_ids = []
        out: SchedulerOutput = self.scheduler.schedule()
        self.step_request_ids = list(dict.fromkeys(
            [g.request_id for g in out.ignored] + [g.request_id for g in out.preempted]
            + [s.group.request_id for s in out.scheduled]))
        outputs: list[RequestOutput] = []
        for group in out.ignored:
            state = self.requests.pop(group.request_id, None)
            if state is not None:
                outputs.append(state.finish_ignored())
        if out.is_empty:
            return outputs
        self._move_pages(out)
        samples = self._execute(out)
        self.scheduler.on_step_done(out)
        outputs.extend(self._process(out, samples))
        self.scheduler.free_finished_seq_groups()
        self.stats.steps += 1
        self.stats.prompt_tokens = self.scheduler.num_prefill_tokens_computed
        return outputs

    def _move_pages(self, out: SchedulerOutput) -> None:
        if out.blocks_to_swap_out:
            self.runner.swap_out(out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            self.runner.swap_in(out.blocks_to_swap_in)
        if out.blocks_to_copy:
            self.runner.copy_pages(out.blocks_to_copy)

    def _execute(self, out: SchedulerOutput) -> list[tuple[int, Sequence, int, Any]]:
        """Run the model and sampler. Returns (scheduled row, seq, fork index, sample) per drawn token."""
        rows, sample_rows, draws, plp = [], [], [], []
        offset = 0
        for i, s in enumerate(out.scheduled):
            start = s.seq.num_computed_tokens
            rows.append((s.seq.token_ids[start:start + s.num_new_tokens], start, s.block_table))
            state = self.requests[s.group.request_id]
            if state.prompt_logprobs is not None and start < s.seq.prompt_len - 1:
                # Row pos predicts prompt token pos + 1; the last prompt token predicts the output.
                end = min(start + s.num_new_tokens, s.seq.prompt_len - 1)
                plp.append((state, start, end, offset))
            offset += s.num_new_tokens
            if s.do_sample:
                for fork in range(state.num_draws(s.seq)):
                    sample_rows.append(i)
                    draws.append((i, s.seq, fork, state))
        specs = [state.sample_spec(seq, fork) for _, seq, fork, state in draws]
        step = StepInput(rows, sample_rows, logprobs=any(r.params.logprobs for r in specs),
                         prompt_logprobs=bool(plp))
        if specs:
            bucket = self.runner.buckets_for(step.num_tokens, len(specs), logprobs=step.logprobs,
                                             prompt_logprobs=step.prompt_logprobs)[1]
            step = step._replace(sampling=self.sampler.metadata(specs, bucket))
        result = self.runner.run_model(step)
        logits = result.logits
        if sample_rows:  # guided rows: the host fills masks while the device runs the model
            mask = self.guided.bitmask([state.guide_state(seq) for _, seq, _, state in draws], logits.shape[0])
            if mask is not None:
                logits = self.guided.apply(logits, self.runner.device_put(mask))
        if plp:
            idx = [off + p - start for state, start, end, off in plp for p in range(start, end)]
            nxt = [state.prompt_token_ids[p + 1] for state, start, end, _ in plp for p in range(start, end)]
            arrays = self.runner.prompt_logprobs(result, idx, nxt)
            k = 0
            for state, start, end, _ in plp:
                state.set_prompt_logprobs(start, [tuple(a[k + j] for a in arrays) for j in range(end - start)])
                k += end - start
        if not sample_rows:
            return []
        sample = self.sampler(logits, result.sampling, specs)
        return [(i, seq, fork, sample.row(k)) for k, (i, seq, fork, _) in enumerate(draws)]

    def _process(self, out: SchedulerOutput, samples) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        beams: dict[str, RequestState] = {}
        for i, seq, fork, sample in samples:
            state = self.requests.get(seq_group_id := out.scheduled[i].group.request_id)
            if state is None:
                continue
            if state.beam is not None:  # beam search steps once every beam has its draw
                state.beam.add_draw(seq, sample)
                beams[seq_group_id] = state
                self.stats.generation_tokens += 1
                continue
            target = seq
            if fork > 0:
                target = self.scheduler.fork_seq(state.group, seq, next(self._seq_ids))
                state.init_seq(target, index=fork, parent=seq)
            finished = state.append(target, sample)
            self.stats.generation_tokens += 1
            if finished:
                self.scheduler.free_seq(target)
            touched[seq_group_id] = state
        for rid, state in beams.items():  # a beam request reports only its final output
            if state.beam.step(self.scheduler, lambda: next(self._seq_ids)):
                touched[rid] = state
        outputs = []
        for rid, state in touched.items():
            output = state.to_output()
            outputs.append(output)
            if output.finished:
                self.requests.pop(rid, None)
                for c in output.outputs:
                    self.stats.finished[c.finish_reason] = self.stats.finished.get(c.finish_reason, 0) + 1
        return outputs
