"""What completions and chat share: model-name checks, SamplingParams from a request, context-length
checks, usage and the merged engine streams that abort on client disconnect.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from aphrodite_jax.guided import BACKENDS, GuidedDecodingParams, GuideError
from aphrodite_jax.sampling_params import SamplingParams
from serving.config import ServingConfig
from serving.openai.errors import APIError, engine_error, param_of
from serving.openai.limits import check_limits
from serving.openai.logprobs import TokenRenderer
from serving.openai.protocol import GUIDED_FIELDS, SAMPLER_FIELDS, SamplingRequestBase

_PARAMS = set(SAMPLER_FIELDS) | {"max_tokens", "logprobs", "prompt_logprobs", "top_logprobs", "seed",
                                 "dry_sequence_breakers"}


def served_names(engine: Any, config: ServingConfig) -> list[str]:
    if config.served_model_name:
        return list(config.served_model_name)
    return [engine.model_name or "default"]


class OpenAIServing:
    def __init__(self, engine: Any, config: ServingConfig):
        self.engine = engine
        self.config = config
        self.names = served_names(engine, config)
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.max_logprobs: int = engine.max_logprobs
        self.render = TokenRenderer(self.tokenizer, config.return_tokens_as_token_ids)
        self.generation_config: dict = engine.generation_config or {}

    @property
    def model_name(self) -> str:
        return self.names[0]

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.names:
            raise APIError(f"The model `{name}` does not exist.", 404, "model", "NotFoundError")

    def check_request(self, req: SamplingRequestBase) -> None:
        """Checks that do not need the prompt: size limits, unsupported features and streaming rules."""
        self.check_model(req.model)
        check_limits(req, self.config)
        if req.priority != 0:
            raise APIError(f"Got priority {req.priority} but Priority scheduling is not enabled.", 400,
                           "priority")
        if req.stream_options is not None and not req.stream:
            raise APIError("`stream_options` can only be set when `stream` is true.", 400, "stream_options")
        best_of = req.best_of if req.best_of is not None else req.n
        if req.stream and best_of != req.n:
            raise APIError(f"best_of must equal n when streaming (got n={req.n}, best_of={best_of})", 400,
                           "best_of")
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            value = getattr(req, name, None)
            if isinstance(value, bool):
                continue
            if value is not None and value < 0:
                raise APIError(f"`{name}` must be a non-negative value, got {value}.", 400, name)
            if value is not None and value > self.max_logprobs:
                raise APIError(f"Cannot request more than {self.max_logprobs} logprobs (`{name}`={value}).",
                               400, name)

    def dry_breaker_ids(self, breakers: Any) -> Optional[list[int]]:
        if breakers is None:
            return None
        if isinstance(breakers, str):
            import json
            try:
                breakers = json.loads(breakers)
            except ValueError:
                breakers = None
            if not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers):
                raise APIError("dry_sequence_breakers must be a list of strings or a JSON string "
                               "representing a list of strings", 400, "dry_sequence_breakers")
        return [self.tokenizer.encode("a" + b, add_special_tokens=False)[-1] for b in breakers]

    async def guided_params(self, req: SamplingRequestBase, tool_schema: Optional[dict] = None
                            ) -> Optional[GuidedDecodingParams]:
        """The request's guide from guided_*, response_format or a tool schema, compiled (and cached) off
        the event loop so a bad schema, regex or grammar is a 400 naming its field before anything is
        queued; the engine thread then finds the guide in the cache. 400 too when several guides are set
        (one guide at most, docs/decisions.md D33)."""
        given: dict[str, Any] = {name: getattr(req, name) for name in GUIDED_FIELDS
                                 if getattr(req, name) is not None}
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise APIError("response_format of type json_schema needs `json_schema.schema`", 400,
                               "response_format")
            given["response_format"] = {"json": rf.json_schema.json_schema}
        if tool_schema is not None and given:
            raise APIError("Guided decoding cannot be combined with tool_choice \"required\" or a named "
                           f"tool (got {', '.join(given)})", 400, next(iter(given)))
        if len(given) > 1:
            raise APIError("You can only use one kind of guided decoding ('guided_json', 'guided_regex', "
                           f"'guided_choice', 'guided_grammar', 'response_format'); got {', '.join(given)}",
                           400, list(given)[1])
        if tool_schema is not None:
            given["tools"] = tool_schema
        if req.guided_decoding_backend is not None and req.guided_decoding_backend not in BACKENDS:
            raise APIError(f"Unknown guided decoding backend '{req.guided_decoding_backend}' "
                           f"(guided_decoding_backend). Must be one of "
                           f"{', '.join(repr(b) for b in BACKENDS)}", 400, "guided_decoding_backend")
        if not given:
            if req.guided_whitespace_pattern is not None:
                raise APIError("guided_whitespace_pattern needs a JSON guide (guided_json or response_format)",
                               400, "guided_whitespace_pattern")
            return None
        (name, value), = given.items()
        kw: dict[str, Any]
        if name == "response_format":
            kw = value
        elif name == "tools":
            kw = {"json": value}
        else:
            kw = {name[len("guided_"):]: value}
        try:
            backend = req.guided_decoding_backend or (
                None if req.guided_whitespace_pattern else self.config.guided_decoding_backend)
            guided = GuidedDecodingParams(**kw, backend=backend, whitespace_pattern=req.guided_whitespace_pattern)
            await asyncio.to_thread(self.engine.compile_guide, guided)
        except GuideError as exc:
            param = exc.param if name.startswith("guided_") or exc.param == "guided_whitespace_pattern" else name
            msg = str(exc) if param in str(exc) else f"{param}: {exc}"
            raise APIError(msg, 400, param) from None
        except ValueError as exc:
            raise APIError(str(exc), 400, name) from None
        return guided

    def sampling_params(self, req: SamplingRequestBase, *, max_tokens: int, defaults: dict,
                        logprobs: Optional[int], prompt_logprobs: Optional[int],
                        guided: Optional[GuidedDecodingParams] = None) -> SamplingParams:
        kw = {**defaults, **req.to_sampling_kwargs()}
        kw.update(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        if guided is not None:
            kw["guided_decoding"] = guided
        ids = self.dry_breaker_ids(req.dry_sequence_breakers)
        if ids is not None:
            kw["dry_sequence_breaker_ids"] = ids
        if kw.get("seed") == -1:
            kw["seed"] = None
        try:
            params = SamplingParams(**kw)
            self.engine.check_params(params)
        except (ValueError, TypeError) as exc:
            raise APIError(str(exc), 400, param_of(str(exc), _PARAMS)) from None
        return params

    def resolve_max_tokens(self, requested: Optional[int], prompt_len: int, what: str, param: str,
                           default: Optional[int]) -> int:
        """The effective max_tokens, or a 400 giving both lengths when the request cannot fit."""
        limit = self.max_model_len
        if requested is None and self.config.max_tokens_limit is not None:  # the server's cap
            default = min(default or limit, self.config.max_tokens_limit)
        if requested is None and default is not None:
            requested = min(default, max(limit - prompt_len, 1))
        if requested is None:
            if prompt_len >= limit:
                raise APIError(f"This model's maximum context length is {limit} tokens. However, you "
                               f"requested {prompt_len} tokens in the {what}, Please reduce the length of "
                               f"the {what}.", 400, param)
            return limit - prompt_len
        if requested < 0:
            raise APIError(f"max_tokens must be at least 1, got {requested}.", 400, "max_tokens")
        if prompt_len + requested > limit or prompt_len >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {prompt_len + requested} tokens ({prompt_len} in the {what}, "
                           f"{requested} in the completion). Please reduce the length of the {what} or "
                           f"completion. (`max_tokens` was {requested}.)", 400,
                           param if prompt_len >= limit else "max_tokens")
        return requested

    def truncate(self, ids: list[int], k: Optional[int]) -> list[int]:
        if k is not None:
            if k < 1:
                raise APIError(f"truncate_prompt_tokens must be >= 1, got {k}", 400, "truncate_prompt_tokens")
            return ids[-k:]
        return ids

    async def start(self, request_id: str, ids: list[int], params: SamplingParams):
        """Queue one engine request; its validation errors become 400s before any byte is sent."""
        try:
            queue_gen = self.engine.generate(None, params, request_id, prompt_token_ids=ids)
            first = await queue_gen.__anext__()
        except StopAsyncIteration:  # pragma: no cover - the engine always yields a final output
            raise APIError("the engine returned no output", 500) from None
        except ValueError as exc:
            raise APIError(str(exc), 400, param_of(str(exc), _PARAMS) or "prompt") from None
        except Exception as exc:
            api = engine_error(exc)
            if api is None:
                raise
            raise api from None
        return first, queue_gen


async def _watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merged_outputs(request: Request, firsts: list, gens: list) -> AsyncIterator[tuple[int, Any]]:
    """Yield (generator index, cumulative output) from every engine stream as results arrive.

    Returns early when the client disconnects; leaving (or closing) this generator cancels the pumps,
    which closes the engine generators and so aborts their requests and frees their pages.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except Exception as exc:  # engine failure: surface it to the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    for i, first in enumerate(firsts):
        queue.put_nowait((i, first))
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    watcher = asyncio.create_task(_watch_disconnect(request))
    remaining = len(gens)
    try:
        while remaining:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return  # the client went away
            i, item = getter.result()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise engine_error(item) or item
            else:
                yield i, item
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()
        for g in gens:
            try:
                await g.aclose()
            except Exception:  # pragma: no cover - closing an already finished generator
                pass
