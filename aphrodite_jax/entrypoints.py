"""`LLM`: offline batched generation, `LLM(model=None, **engine_args).generate(prompts, params)`."""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.outputs import RequestOutput
from aphrodite_jax.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: Optional[str] = None, **engine_args: Any):
        from aphrodite_jax.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[str, Sequence[str], None] = None,
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = len(prompts) if prompts is not None else len(prompt_token_ids or [])
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * n
        if len(params) != n:
            raise ValueError("sampling_params must be one object or one per prompt")
        order = []
        for i in range(n):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompts[i] if prompts is not None else None, params[i],
                                    prompt_token_ids=list(prompt_token_ids[i]) if prompt_token_ids else None)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=n, desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[rid] for rid in order]

    def chat(self, messages: list[dict], sampling_params: Optional[SamplingParams] = None,
             use_tqdm: bool = False) -> RequestOutput:
        """One chat turn rendered with the model's own chat template."""
        tok = self.get_tokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)  # the template already holds any BOS
        return self.generate(prompt_token_ids=[list(ids)], sampling_params=sampling_params,
                             use_tqdm=use_tqdm)[0]
