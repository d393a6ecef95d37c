"""POST /v1/chat/completions: render the conversation with the chat template, then one engine request.

Defaults follow docs/decisions.md D20: temperature/top_p from the model's generation_config when present
(else 1.0), max_tokens = the rest of the context.

Tools (serving/openai/tool_parsers): a named or "required" tool_choice guides decoding with the tools'
argument schemas and returns the output as tool calls; "auto" parses the calls the model wrote with the
server's --tool-call-parser. Streams send each call's id and name once, then argument fragments.
"""
from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from serving.openai.chat_utils import load_chat_template, message_text, render_chat
from serving.openai.errors import APIError, error_body
from serving.openai.logprobs import chat_logprobs, prompt_logprobs_json
from serving.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                     ChatCompletionResponseChoice, ChatCompletionStreamChoice,
                                     ChatCompletionStreamResponse, ChatResponseMessage, DeltaFunctionCall,
                                     DeltaMessage, DeltaToolCall, FunctionCall, ToolCall, UsageInfo)
from serving.openai.serving_completion import sse
from serving.openai.serving_engine import OpenAIServing, merged_outputs
from serving.openai.tool_parsers import PARSERS
from serving.openai.tool_parsers.tool_choice import ToolPlan, calls_from_required, plan_tools, stream_required


class ToolStream:
    """One streamed choice under tools: turns the growing output text into OpenAI deltas (content, then
    each call's id/type/name once followed by argument fragments)."""

    def __init__(self, plan: ToolPlan, parser, prefix: str):
        self.plan, self.parser, self.prefix = plan, parser, prefix
        self.content_sent = 0
        self.ids: list[str] = []  # one per call already announced
        self.args_sent: list[int] = []

    def _call_deltas(self, calls: list[tuple[str, str]]) -> list[DeltaToolCall]:
        out = []
        for k, (name, args) in enumerate(calls):
            if k == len(self.ids):
                self.ids.append(f"chatcmpl-tool-{uuid.uuid4().hex}")
                self.args_sent.append(len(args))
                out.append(DeltaToolCall(index=k, id=self.ids[k], type="function",
                                         function=DeltaFunctionCall(name=name, arguments=args)))
            elif len(args) > self.args_sent[k]:
                out.append(DeltaToolCall(index=k, function=DeltaFunctionCall(arguments=args[self.args_sent[k]:])))
                self.args_sent[k] = len(args)
        return out

    def update(self, text: str, finish: Optional[str]) -> tuple[DeltaMessage, Optional[str]]:
        mode, content = self.plan.mode, None
        if mode == "named":
            calls = [(self.plan.name, text)] if text else []
        elif mode == "required":
            calls = [(name, args) for name, args, _ in stream_required(text)]
        else:
            full = self.prefix + text
            end = len(full) if finish is not None and not self.parser.calls(full, True) else \
                self.parser.content_end(full)
            if end > self.content_sent:
                content = full[self.content_sent:end]
                self.content_sent = end
            calls = [(c.name, c.arguments) for c in self.parser.calls(full, finish is not None)]
        deltas = self._call_deltas(calls)
        if finish == "stop" and self.ids:
            finish = "tool_calls"
        return DeltaMessage(content=content, tool_calls=deltas or None), finish


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: Any, config):
        super().__init__(engine, config)
        self.server_template: Optional[str] = load_chat_template(config.chat_template)

    def defaults(self) -> dict:
        """docs/decisions.md D20: temperature and top_p from generation_config.json when present, else 1.0."""
        gen = self.generation_config
        return {key: float(gen[key]) if gen.get(key) is not None else 1.0 for key in ("temperature", "top_p")}

    def render_prompt(self, req, tools: Optional[list[dict]] = None) -> tuple[str, list[int]]:
        return render_chat(self.tokenizer, req.messages, server_template=self.server_template,
                           request_template=req.chat_template,
                           add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                           continue_final_message=req.continue_final_message,
                           documents=getattr(req, "documents", None),
                           template_kwargs=req.chat_template_kwargs,
                           add_special_tokens=req.add_special_tokens, tools=tools)

    def _role(self, req: ChatCompletionRequest) -> str:
        if req.add_generation_prompt and not req.continue_final_message:
            return self.config.response_role
        return req.messages[-1].role

    def _echo_prefix(self, req: ChatCompletionRequest, role: str) -> str:
        last = req.messages[-1]
        if (req.echo or req.continue_final_message) and last.role == role:
            return message_text(last.content)
        return ""

    async def create(self, req: ChatCompletionRequest, request: Request):
        self.check_request(req)
        auto_ok = self.config.enable_auto_tool_choice and self.config.tool_call_parser is not None
        plan = plan_tools(req.tools, req.tool_choice, auto_enabled=auto_ok, parallel=req.parallel_tool_calls)
        guided = await self.guided_params(req, tool_schema=plan.schema)
        if req.top_logprobs is not None and not req.logprobs and req.top_logprobs > 0:
            raise APIError("when using `top_logprobs`, `logprobs` must be set to true.", 400, "top_logprobs")
        _, ids = self.render_prompt(req, tools=plan.tools or None)
        ids = self.truncate(ids, req.truncate_prompt_tokens)
        max_tokens = self.resolve_max_tokens(req.max_tokens, len(ids), "messages", "messages", default=None)
        top_k = req.top_logprobs or 0
        prompt_lp = req.prompt_logprobs
        if req.echo and prompt_lp is None and req.logprobs:
            prompt_lp = top_k
        params = self.sampling_params(req, max_tokens=max_tokens, defaults=self.defaults(),
                                      logprobs=top_k if req.logprobs else None, prompt_logprobs=prompt_lp,
                                      guided=guided)
        rid = f"chat-{uuid.uuid4().hex}"
        first, gen = await self.start(rid, ids, params)
        role = self._role(req)
        prefix = self._echo_prefix(req, role)
        if req.stream:
            return self._stream(req, request, rid, first, gen, role, prefix, top_k, len(ids), plan)
        final = None
        async for _, out in merged_outputs(request, [first], [gen]):
            if out.finished:
                final = out
        if final is None:
            return None
        choices, completion_tokens = [], 0
        for o in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            lp = chat_logprobs(o.token_ids, o.logprobs or [], top_k, self.render) if req.logprobs else None
            content, calls, finish = self._tool_result(plan, prefix, o.text, o.finish_reason or "stop")
            choices.append(ChatCompletionResponseChoice(
                index=o.index, message=ChatResponseMessage(role=role, content=content, tool_calls=calls),
                logprobs=lp, finish_reason=finish, stop_reason=o.stop_reason))
        usage = UsageInfo(prompt_tokens=len(final.prompt_token_ids), completion_tokens=completion_tokens,
                          total_tokens=len(final.prompt_token_ids) + completion_tokens)
        return ChatCompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage,
                                      prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs)
                                      if prompt_lp is not None else None)

    def _parser(self):
        return PARSERS[self.config.tool_call_parser]()

    def _tool_result(self, plan: ToolPlan, prefix: str, text: str, finish: str
                     ) -> tuple[Optional[str], list[ToolCall], str]:
        """(content, tool calls, finish_reason) of one finished choice."""
        def as_calls(parsed) -> list[ToolCall]:
            return [ToolCall(function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed]

        done = "tool_calls" if finish == "stop" else finish
        if plan.mode == "named":
            return "", [ToolCall(function=FunctionCall(name=plan.name, arguments=text))], done
        if plan.mode == "required":
            parsed = calls_from_required(text)
            return ("", as_calls(parsed), done) if parsed else (prefix + text, [], finish)
        if plan.mode == "auto":
            content, parsed = self._parser().extract(prefix + text)
            return (content, as_calls(parsed), done) if parsed else (prefix + text, [], finish)
        return prefix + text, [], finish

    async def _stream(self, req: ChatCompletionRequest, request: Request, rid: str, first, gen, role: str,
                      prefix: str, top_k: int, prompt_tokens: int, plan: ToolPlan) -> AsyncIterator[str]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finished: set[int] = set()

        def usage() -> dict:
            c = sum(sent_tokens.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}

        def chunk(index: int, delta: DeltaMessage, **kw) -> str:
            body = ChatCompletionStreamResponse(
                id=rid, model=self.model_name,
                choices=[ChatCompletionStreamChoice(index=index, delta=delta, **kw)],
                usage=UsageInfo(**usage()) if continuous else None)
            return sse(body.model_dump_json(exclude_none=True))

        tools = {i: ToolStream(plan, self._parser() if plan.mode == "auto" else None, prefix)
                 for i in range(req.n)} if plan.mode != "none" else {}
        try:
            for i in range(req.n):
                yield chunk(i, DeltaMessage(role=role, content=""))
                if prefix and not tools:
                    yield chunk(i, DeltaMessage(content=prefix))
            async with aclosing(merged_outputs(request, [first], [gen])) as stream:
                async for _, out in stream:
                    for o in out.outputs:
                        i = o.index
                        if i in finished:
                            continue
                        delta = o.text[sent_text.get(i, 0):]
                        start = sent_tokens.get(i, 0)
                        new_ids = list(o.token_ids[start:])
                        new_entries = list((o.logprobs or [])[start:len(o.token_ids)])
                        sent_text[i], sent_tokens[i] = len(o.text), len(o.token_ids)
                        done = o.finish_reason is not None
                        if not delta and not done and not new_ids:
                            continue
                        kw: dict[str, Any] = {}
                        if req.logprobs:
                            kw["logprobs"] = chat_logprobs(new_ids, new_entries, top_k, self.render)
                        message = DeltaMessage(content=delta)
                        finish = o.finish_reason
                        if i in tools:
                            message, finish = tools[i].update(o.text, finish)
                        if done:
                            finished.add(i)
                            kw.update(finish_reason=finish, stop_reason=o.stop_reason)
                        elif message.content is None and message.tool_calls is None and not kw.get("logprobs"):
                            continue
                        yield chunk(i, message, **kw)
            if include_usage:
                body = ChatCompletionStreamResponse(id=rid, model=self.model_name, choices=[],
                                                    usage=UsageInfo(**usage()))
                yield sse(body.model_dump_json())
        except APIError as exc:
            yield sse(error_body(exc.message, exc.status, exc.param))
        except Exception as exc:  # the 200 is already sent: report in-band (docs/decisions.md D25)
            yield sse(error_body(f"{type(exc).__name__}: {exc}", 500))
        yield "data: [DONE]\n\n"
