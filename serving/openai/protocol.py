"""Pydantic v2 request/response models of the OpenAI-compatible API: completions, chat, models and tokenize.

Requests forbid unknown fields (extra="forbid") so a misspelt sampler is a 400 naming it instead of
being silently ignored. Every SamplingParams field is accepted as an Aphrodite extra (extra_body);
`to_sampling_kwargs()` hands the set ones to SamplingParams, which owns the value checks and messages.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from aphrodite_jax.sampling_params import SAMPLING_DEFAULTS as _D  # the defaults, stated once

_MAX_INT64 = 2**63 - 1


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------- errors
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------------------- shared
class StreamOptions(OpenAIBaseModel):
    include_usage: bool = True
    continuous_usage_stats: bool = False  # docs/decisions.md D11: OpenAI's behaviour by default


class JsonSchemaFormat(OpenAIBaseModel):
    name: Optional[str] = None
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


# Aphrodite's sampler fields that map one-to-one onto SamplingParams.
SAMPLER_FIELDS = (
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
    "top_p", "top_k", "top_a", "min_p", "tfs", "eta_cutoff", "epsilon_cutoff", "typical_p",
    "smoothing_factor", "smoothing_curve", "dynatemp_min", "dynatemp_max", "dynatemp_exponent",
    "temperature_last", "seed", "use_beam_search", "length_penalty", "early_stopping", "stop",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens", "custom_token_bans",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "xtc_threshold",
    "xtc_probability", "nsigma", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_range",
    "dry_max_ngram", "dry_max_occurrences", "dry_early_exit_match_len", "skew", "sampler_priority",
    "no_repeat_ngram_size", "token_ban_ranges", "logit_bias", "allowed_token_ids",
    "mirostat_mode", "mirostat_tau", "mirostat_eta", "extra_args", "repetition_penalty_range",
    "repetition_penalty_slope",
)

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class SamplingRequestBase(OpenAIBaseModel):
    """Fields shared by completions and chat: OpenAI's sampling knobs plus every Aphrodite sampler."""

    model: str
    n: int = _D["n"]
    best_of: Optional[int] = _D["best_of"]
    presence_penalty: float = _D["presence_penalty"]
    frequency_penalty: float = _D["frequency_penalty"]
    repetition_penalty: float = _D["repetition_penalty"]
    temperature: Optional[float] = None  # None: the route's default (docs/decisions.md D20)
    top_p: Optional[float] = None
    top_k: int = _D["top_k"]
    top_a: float = _D["top_a"]
    min_p: float = _D["min_p"]
    tfs: float = _D["tfs"]
    eta_cutoff: float = _D["eta_cutoff"]
    epsilon_cutoff: float = _D["epsilon_cutoff"]
    typical_p: float = _D["typical_p"]
    smoothing_factor: float = _D["smoothing_factor"]
    smoothing_curve: float = _D["smoothing_curve"]
    dynatemp_min: float = _D["dynatemp_min"]
    dynatemp_max: float = _D["dynatemp_max"]
    dynatemp_exponent: float = _D["dynatemp_exponent"]
    temperature_last: bool = _D["temperature_last"]
    seed: Optional[int] = Field(default=None, ge=-1, le=_MAX_INT64)
    use_beam_search: bool = _D["use_beam_search"]
    length_penalty: float = _D["length_penalty"]
    early_stopping: Union[bool, str] = _D["early_stopping"]
    stop: Optional[Union[str, list[str]]] = _D["stop"]
    stop_token_ids: Optional[list[int]] = _D["stop_token_ids"]
    include_stop_str_in_output: bool = _D["include_stop_str_in_output"]
    ignore_eos: bool = _D["ignore_eos"]
    max_tokens: Optional[int] = Field(default=None, validation_alias=AliasChoices(
        "max_tokens", "max_completion_tokens"))
    min_tokens: int = _D["min_tokens"]
    custom_token_bans: Optional[list[int]] = _D["custom_token_bans"]
    skip_special_tokens: bool = _D["skip_special_tokens"]
    spaces_between_special_tokens: bool = _D["spaces_between_special_tokens"]
    truncate_prompt_tokens: Optional[int] = _D["truncate_prompt_tokens"]
    xtc_threshold: float = _D["xtc_threshold"]
    xtc_probability: float = _D["xtc_probability"]
    nsigma: float = _D["nsigma"]
    dry_multiplier: float = _D["dry_multiplier"]
    dry_base: float = _D["dry_base"]
    dry_allowed_length: int = _D["dry_allowed_length"]
    dry_sequence_breakers: Optional[Union[list[str], str]] = None
    dry_range: int = Field(default=_D["dry_range"], validation_alias=AliasChoices("dry_range", "dry_penalty_last_n"))
    dry_max_ngram: int = _D["dry_max_ngram"]
    dry_max_occurrences: int = _D["dry_max_occurrences"]
    dry_early_exit_match_len: int = _D["dry_early_exit_match_len"]
    skew: float = _D["skew"]
    sampler_priority: Optional[list[Union[int, str]]] = Field(
        default=None, validation_alias=AliasChoices("sampler_priority", "sampler_order"))
    no_repeat_ngram_size: int = _D["no_repeat_ngram_size"]
    token_ban_ranges: Optional[list[list[Any]]] = _D["token_ban_ranges"]
    logit_bias: Optional[dict[str, float]] = _D["logit_bias"]
    allowed_token_ids: Optional[list[int]] = _D["allowed_token_ids"]
    repetition_penalty_range: int = _D["repetition_penalty_range"]
    repetition_penalty_slope: float = _D["repetition_penalty_slope"]
    mirostat_mode: int = _D["mirostat_mode"]
    mirostat_tau: float = _D["mirostat_tau"]
    mirostat_eta: float = _D["mirostat_eta"]
    # Fields of registered research samplers (docs/samplers.md). Clients may also send them as
    # top-level keys; `_collect_research_fields` moves those here.
    extra_args: Optional[dict[str, Any]] = _D["extra_args"]
    prompt_logprobs: Optional[int] = _D["prompt_logprobs"]

    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    priority: int = 0
    add_special_tokens: bool = True
    echo: bool = False
    # OpenAI fields with no effect on generation, accepted so standard clients work.
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _collect_research_fields(cls, data: Any) -> Any:
        from aphrodite_jax.sampling.registry import move_research_fields

        return move_research_fields(data, set(cls.model_fields))

    def to_sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields the client set (defaults stay SamplingParams' own)."""
        out = {name: getattr(self, name) for name in SAMPLER_FIELDS if name in self.model_fields_set}
        for name in ("temperature", "top_p"):
            if out.get(name, 0) is None:
                del out[name]
        return out


# ---------------------------------------------------------------------------------------- completions
class CompletionRequest(SamplingRequestBase):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[list[Optional[dict[str, Any]]]] = None


def _now() -> int:
    return int(time.time())


class CompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: Optional[UsageInfo] = None


class CompletionStreamChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionStreamResponse(ResponseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------------------------- chat
class ContentPart(OpenAIBaseModel):
    type: str
    text: Optional[str] = None


class FunctionCall(ResponseModel):
    name: str
    arguments: str = "{}"


class ToolCall(ResponseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatCompletionRequest(SamplingRequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: Optional[list[dict[str, str]]] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False  # docs/decisions.md D15: the template adds any BOS

    @model_validator(mode="after")
    def _check_generation_flags(self) -> "ChatCompletionRequest":
        if self.continue_final_message and self.add_generation_prompt and \
                "add_generation_prompt" in self.model_fields_set:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class ChatLogProb(ResponseModel):
    token: str
    logprob: float = -9999.0
    bytes: Optional[list[int]] = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: Optional[list[ChatLogProbsContent]] = None


class ChatResponseMessage(ResponseModel):
    role: str
    content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = "stop"
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"chat-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[list[Optional[dict[str, Any]]]] = None


class DeltaFunctionCall(ResponseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(ResponseModel):
    """A streamed tool call fragment (OpenAI's format): id, type and name once, then argument pieces."""
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(ResponseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------------------------- models, tokens
class ModelPermission(ResponseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: str = "model_permission"
    created: int = Field(default_factory=_now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: Optional[str] = None
    is_blocking: bool = False


class ModelCard(ResponseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pygmalionai"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(ResponseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIBaseModel):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(ResponseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str
