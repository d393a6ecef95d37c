"""The Kobold API on the OpenAI app (docs/decisions.md D17, D24).

`/api/v1` (and its alias `/api/latest`): generate, model, info/version, config/*. `/api/extra`:
generate/stream (SSE `{"token": ...}` events), generate/check, abort, tokencount, version,
true_max_context_length. A generation's genkey is its engine request id; `abort` cancels the task
that consumes the engine stream, which aborts the engine request and frees its pages, and the
aborted `generate` call still answers with the text produced so far (what KoboldAI Lite expects).
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from aphrodite_jax.guided import GuidedDecodingParams, GuideError
from aphrodite_jax.sampling_params import SamplingParams
from serving.config import ServingConfig
from serving.kobold.protocol import (PARAM_TO_KAI, KAIGenerationInput, KoboldRequestError, dry_breakers,
                                     to_sampling_kwargs)
from serving.openai.errors import APIError, param_of
from serving.openai.limits import KOBOLD_NAMES, check_limits
from serving.openai.serving_engine import OpenAIServing, merged_outputs

logger = logging.getLogger("aphrodite_jax.serving.kobold")

KAI_VERSION = "1.2.4"  # the KoboldAI United version Aphrodite reports
KCPP_VERSION = "1.63"  # the KoboldCpp version Aphrodite reports


class GenKey(BaseModel):
    model_config = ConfigDict(extra="ignore")
    genkey: Optional[str] = None


class TokenCountRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients may add `model`; it is not needed
    prompt: str


@dataclass
class _Job:
    """One running Kobold generation: its latest text and the task that pumps its engine stream."""
    text: str = ""
    last: Any = None
    task: Optional[asyncio.Task] = None
    aborted: bool = False
    queue: Optional[asyncio.Queue] = None  # outputs for the SSE route, then None at the end


class KoboldServing:
    def __init__(self, engine: Any, config: ServingConfig):
        self.base = OpenAIServing(engine, config)
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        self.jobs: dict[str, _Job] = {}
        self._badwords: Optional[list[int]] = None

    # ------------------------------------------------------------------ helpers
    def badwords(self) -> list[int]:
        """The model config's bad_words_ids, else every vocab token with '[' or ']' (not pad) + EOS."""
        if self._badwords is None:
            cfg = self.engine.hf_config
            ids = getattr(cfg, "bad_words_ids", None) if cfg is not None else None
            if ids:
                flat = [t for group in ids for t in (group if isinstance(group, list) else [group])]
            else:
                pad = getattr(self.tokenizer, "pad_token_id", None)
                flat = [i for tok, i in self.tokenizer.get_vocab().items()
                        if ("[" in tok or "]" in tok) and i != pad]
            flat += list(self.engine.eos_token_ids)
            vocab = self.engine.vocab_size
            self._badwords = sorted({t for t in flat if 0 <= t < vocab})
        return self._badwords

    def prompt_ids(self, req: KAIGenerationInput) -> list[int]:
        """memory + prompt, the prompt left-truncated so prompt + max_length fits the context."""
        limit = self.base.max_model_len
        if req.max_length > req.max_context_length:
            raise APIError("max_length must not be larger than max_context_length", 400, "max_length")
        if req.max_length >= limit:
            raise APIError(f"max_length ({req.max_length}) must be below the model's context length "
                           f"({limit})", 400, "max_length")
        budget = max(1, min(req.max_context_length, limit) - req.max_length)
        if req.memory:
            mem = list(self.tokenizer.encode(req.memory))
            body = list(self.tokenizer.encode(req.prompt, add_special_tokens=False))
            if len(mem) >= budget:
                raise APIError(f"memory is {len(mem)} tokens, which leaves no room for the prompt in "
                               f"{budget} tokens", 400, "memory")
            return mem + body[len(body) - (budget - len(mem)):] if len(mem) + len(body) > budget else mem + body
        ids = list(self.tokenizer.encode(req.prompt))
        return ids[-budget:]

    async def guide(self, req: KAIGenerationInput) -> Optional[GuidedDecodingParams]:
        """`grammar` (GBNF or Lark) as a guided-decoding grammar, compiled now so a bad one is a 400."""
        if not req.grammar:
            return None
        try:
            guided = GuidedDecodingParams(grammar=req.grammar, backend=self.config.guided_decoding_backend)
            await asyncio.to_thread(self.engine.compile_guide, guided)
        except (GuideError, ValueError) as exc:
            msg = str(exc)
            raise APIError(msg if "grammar" in msg else f"grammar: {msg}", 400, "grammar") from None
        return guided

    def params(self, req: KAIGenerationInput, prompt_len: int,
               guided: Optional[GuidedDecodingParams] = None) -> SamplingParams:
        try:
            kw = to_sampling_kwargs(req, prompt_len=prompt_len, badwords=self.badwords,
                                    token_ids_of=lambda s: self.tokenizer.encode(s, add_special_tokens=False))
            breakers = dry_breakers(req.dry_sequence_breakers)
            if breakers is not None:
                kw["dry_sequence_breaker_ids"] = self.base.dry_breaker_ids(breakers)
            if guided is not None:
                kw["guided_decoding"] = guided
            params = SamplingParams(**kw)
            self.engine.check_params(params)
        except KoboldRequestError as exc:
            raise APIError(str(exc), 400, exc.field) from None
        except (ValueError, TypeError) as exc:
            name = param_of(str(exc), set(PARAM_TO_KAI) | set(KAIGenerationInput.model_fields))
            raise APIError(str(exc), 400, PARAM_TO_KAI.get(name, name)) from None
        return params

    def log(self, route: str, req: KAIGenerationInput, genkey: str) -> None:
        if self.config.disable_log_requests or req.quiet or not logger.isEnabledFor(logging.INFO):
            return
        text = req.prompt[:self.config.max_log_len] if self.config.max_log_len else req.prompt
        logger.info("kobold %s %s: max_length=%d prompt=%r", route, genkey, req.max_length, text)

    async def start(self, req: KAIGenerationInput, route: str):
        genkey = req.genkey or f"kai-{uuid.uuid4().hex}"
        if genkey in self.jobs:
            raise APIError(f"genkey {genkey!r} is already generating", 400, "genkey")
        check_limits(req, self.config, KOBOLD_NAMES)
        ids = self.prompt_ids(req)
        params = self.params(req, len(ids), await self.guide(req))
        self.log(route, req, genkey)
        first, gen = await self.base.start(genkey, ids, params)
        return genkey, first, gen

    # ------------------------------------------------------------------ routes
    def _launch(self, genkey: str, request: Request, first: Any, gen: Any) -> _Job:
        job = self.jobs[genkey] = _Job(queue=asyncio.Queue())

        async def pump() -> None:
            try:
                async for _, out in merged_outputs(request, [first], [gen]):
                    job.text = out.outputs[0].text if out.outputs else ""
                    job.last = out
                    job.queue.put_nowait(out)
            finally:
                self.jobs.pop(genkey, None)
                job.queue.put_nowait(None)

        job.task = asyncio.create_task(pump())
        return job

    async def generate(self, req: KAIGenerationInput, request: Request) -> Optional[dict]:
        genkey, first, gen = await self.start(req, "generate")
        job = self._launch(genkey, request, first, gen)
        try:
            await asyncio.wait({job.task})
        finally:
            if not job.task.done():  # this handler itself was cancelled
                job.task.cancel()
        if not job.task.cancelled() and job.task.exception() is not None:
            raise job.task.exception()
        out = job.last
        if job.aborted:
            return {"results": [{"text": job.text, "finish_reason": "abort"}]}
        if out is None or not out.finished:
            return None  # the client disconnected
        return {"results": [{"text": o.text, "finish_reason": o.finish_reason} for o in out.outputs]}

    async def stream(self, req: KAIGenerationInput, request: Request) -> AsyncIterator[str]:
        genkey, first, gen = await self.start(req, "generate/stream")
        job = self._launch(genkey, request, first, gen)

        async def events() -> AsyncIterator[str]:
            sent, reason = 0, None
            try:
                while (out := await job.queue.get()) is not None:
                    o = out.outputs[0]
                    if len(o.text) > sent:
                        yield _event({"token": o.text[sent:]})
                        sent = len(o.text)
                    reason = o.finish_reason
                yield _event({"token": "", "finish_reason": reason or "abort"})
            finally:
                if not job.task.done():  # the client went away mid-stream
                    job.task.cancel()

        return events()

    def abort(self, genkey: Optional[str]) -> bool:
        job = self.jobs.get(genkey or "")
        if job is None or job.task is None or job.task.done():
            return False
        job.aborted = True
        job.task.cancel()
        return True


def _event(data: dict) -> str:
    return f"event: message\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _body(request: Request, model: type[BaseModel]) -> BaseModel:
    """GET or POST body, invalid or missing JSON read as {} (Aphrodite reads the genkey even on GET)."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    return model.model_validate(data if isinstance(data, dict) else {})


def install_kobold(app: FastAPI, engine: Any, config: ServingConfig) -> KoboldServing:
    kobold = KoboldServing(engine, config)
    kai = APIRouter()
    extra = APIRouter()
    name = kobold.base.model_name
    limit = kobold.base.max_model_len

    @kai.post("/generate")
    async def generate(body: KAIGenerationInput, request: Request):
        result = await kobold.generate(body, request)
        return JSONResponse(result) if result is not None else JSONResponse({}, status_code=499)

    @kai.get("/model")
    async def model():
        return {"result": f"aphrodite/{name}"}

    @kai.get("/info/version")
    async def info_version():
        return {"result": KAI_VERSION}

    @kai.get("/config/max_length")
    async def max_length():
        return {"value": limit - 1}  # the most a request may ask for (one prompt token must remain)

    @kai.get("/config/max_context_length")
    async def max_context_length():
        return {"value": limit}

    @kai.get("/config/soft_prompts_list")
    async def soft_prompts_list():
        return {"values": []}

    @kai.get("/config/soft_prompt")
    async def get_soft_prompt():
        return {"value": ""}

    @kai.put("/config/soft_prompt")
    async def put_soft_prompt():
        return {}

    @extra.post("/generate/stream")
    async def generate_stream(body: KAIGenerationInput, request: Request):
        events = await kobold.stream(body, request)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "Connection": "keep-alive",
                                          "X-Accel-Buffering": "no"})

    @extra.post("/generate/check")
    async def generate_check(request: Request):
        body = await _body(request, GenKey)
        job = kobold.jobs.get(body.genkey or "")
        return {"results": [{"text": job.text if job else ""}]}

    @extra.get("/generate/check")
    async def generate_check_get(request: Request):
        return await generate_check(request)

    @extra.post("/abort")
    async def abort(request: Request):
        body = await _body(request, GenKey)
        return {"success": "true" if kobold.abort(body.genkey) else "false"}

    @extra.post("/tokencount")
    async def tokencount(body: TokenCountRequest):
        ids = list(kobold.tokenizer.encode(body.prompt))
        return {"value": len(ids), "ids": ids}

    @extra.get("/version")
    async def kcpp_version():
        return {"result": "KoboldCpp", "version": KCPP_VERSION}

    @extra.get("/true_max_context_length")
    async def true_max_context_length():
        return {"value": limit}

    @extra.get("/preloadstory")
    async def preloadstory():
        return {}

    app.include_router(kai, prefix="/api/v1", tags=["kobold"])
    app.include_router(kai, prefix="/api/latest", include_in_schema=False)
    app.include_router(extra, prefix="/api/extra", tags=["kobold"])
    app.state.kobold = kobold
    return kobold
