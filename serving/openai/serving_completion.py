"""POST /v1/completions: one engine request per prompt, merged into one response or one SSE stream.

Choice index = prompt_index * n + output.index. Deltas are computed here from the engine's cumulative
outputs. Usage sums every prompt and every returned choice.
"""
from __future__ import annotations

import json
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from serving.openai.errors import APIError, error_body
from serving.openai.logprobs import completion_logprobs, prompt_logprobs_json
from serving.openai.protocol import (CompletionRequest, CompletionResponse, CompletionResponseChoice,
                                     CompletionStreamChoice, CompletionStreamResponse, UsageInfo)
from serving.openai.serving_engine import OpenAIServing, merged_outputs


def sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n"


class OpenAIServingCompletion(OpenAIServing):
    def _prompts(self, req: CompletionRequest) -> list[tuple[Optional[str], list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise APIError("prompt must not be empty", 400, "prompt")
        elif all(isinstance(x, int) for x in p):
            items = [p]
        else:
            items = list(p)
        out = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)
                out.append((item, list(ids)))
            else:
                if not item:
                    raise APIError("prompt token lists must not be empty", 400, "prompt")
                out.append((None, list(item)))
        return out

    async def create(self, req: CompletionRequest, request: Request):
        self.check_request(req)
        if req.suffix is not None:
            raise APIError("suffix is not currently supported", 400, "suffix")
        guided = await self.guided_params(req)
        prompts = self._prompts(req)
        echo_only = req.echo and req.max_tokens == 0
        logprobs = req.logprobs
        prompt_lp = req.prompt_logprobs
        if req.echo and logprobs is not None and prompt_lp is None:
            prompt_lp = logprobs
        rid = f"cmpl-{uuid.uuid4().hex}"
        firsts, gens, metas = [], [], []
        try:
            for i, (text, ids) in enumerate(prompts):
                ids = self.truncate(ids, req.truncate_prompt_tokens)
                max_tokens = 1 if echo_only else self.resolve_max_tokens(
                    req.max_tokens, len(ids), "prompt", "prompt", default=16)
                params = self.sampling_params(req, max_tokens=max_tokens, defaults={}, logprobs=logprobs,
                                              prompt_logprobs=prompt_lp, guided=guided)
                first, gen = await self.start(f"{rid}-{i}", ids, params)
                firsts.append(first)
                gens.append(gen)
                metas.append((text if text is not None else self.tokenizer.decode(ids), ids))
        except BaseException:
            for g in gens:
                await g.aclose()
            raise
        n = req.n
        if req.stream:
            return self._stream(req, request, rid, firsts, gens, metas, n, echo_only)
        finals: dict[int, Any] = {}
        async for i, out in merged_outputs(request, firsts, gens):
            if out.finished:
                finals[i] = out
        if len(finals) < len(gens):
            return None  # the client disconnected; nothing to send
        choices, usage = [], UsageInfo()
        for i in range(len(gens)):
            out = finals[i]
            prompt_text, prompt_ids = metas[i]
            usage.prompt_tokens += len(out.prompt_token_ids)
            for o in sorted(out.outputs, key=lambda o: o.index):
                choices.append(self._choice(i * n + o.index, req, out, o, prompt_text, echo_only))
                if not echo_only:
                    usage.completion_tokens += len(o.token_ids)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage)

    def _choice(self, index: int, req: CompletionRequest, out, o, prompt_text: str,
                echo_only: bool) -> CompletionResponseChoice:
        text = (prompt_text if req.echo else "") + ("" if echo_only else o.text)
        lp = None
        if req.logprobs is not None:
            ids, entries = [], []
            if req.echo:
                ids += list(out.prompt_token_ids)
                entries += list(out.prompt_logprobs or [None] * len(out.prompt_token_ids))
            if not echo_only:
                ids += list(o.token_ids)
                entries += list(o.logprobs or [])
            lp = completion_logprobs(ids, entries, self.render)
        return CompletionResponseChoice(
            index=index, text=text, logprobs=lp, finish_reason="length" if echo_only else o.finish_reason,
            stop_reason=None if echo_only else o.stop_reason,
            prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs) if req.prompt_logprobs is not None
            else None)

    async def _stream(self, req: CompletionRequest, request: Request, rid: str, firsts, gens, metas,
                      n: int, echo_only: bool) -> AsyncIterator[str]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        finished: set[int] = set()
        prompt_tokens = sum(len(m[1]) for m in metas)
        completion_tokens: dict[int, int] = {}

        def usage() -> dict:
            c = sum(completion_tokens.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}

        try:
            async with aclosing(merged_outputs(request, firsts, gens)) as stream:
                async for i, out in stream:
                    for o in out.outputs:
                        idx = i * n + o.index
                        if idx in finished:
                            continue
                        prefix, lp_ids, lp_entries = "", [], []
                        if req.echo and idx not in echoed:
                            echoed.add(idx)
                            prefix = metas[i][0]
                            if req.logprobs is not None:
                                lp_ids = list(out.prompt_token_ids)
                                lp_entries = list(out.prompt_logprobs or [None] * len(lp_ids))
                        if echo_only:
                            delta, new_ids, new_entries = "", [], []
                        else:
                            delta = o.text[sent_text.get(idx, 0):]
                            start = sent_tokens.get(idx, 0)
                            new_ids = list(o.token_ids[start:])
                            new_entries = list((o.logprobs or [])[start:len(o.token_ids)])
                            sent_text[idx] = len(o.text)
                            sent_tokens[idx] = len(o.token_ids)
                            completion_tokens[idx] = len(o.token_ids)
                        done = o.finish_reason is not None
                        text = prefix + delta
                        if not text and not done and not new_ids:
                            continue
                        lp = None
                        if req.logprobs is not None:
                            lp = completion_logprobs(lp_ids + new_ids, lp_entries + new_entries, self.render,
                                                     offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + len(text)
                        if done:
                            finished.add(idx)
                        chunk = CompletionStreamResponse(
                            id=rid, model=self.model_name,
                            choices=[CompletionStreamChoice(
                                index=idx, text=text, logprobs=lp,
                                finish_reason=("length" if echo_only else o.finish_reason) if done else None,
                                stop_reason=None if echo_only else o.stop_reason)],
                            usage=UsageInfo(**usage()) if continuous else None)
                        yield sse(chunk.model_dump_json())
                if include_usage:
                    yield sse(CompletionStreamResponse(id=rid, model=self.model_name, choices=[],
                                                       usage=UsageInfo(**usage())).model_dump_json())
        except APIError as exc:
            yield sse(error_body(exc.message, exc.status, exc.param))
        except Exception as exc:  # the 200 is already sent: report in-band (docs/decisions.md D25)
            yield sse(error_body(f"{type(exc).__name__}: {exc}", 500))
        yield "data: [DONE]\n\n"
