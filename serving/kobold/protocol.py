"""The Kobold (KAI / KoboldCpp) generation schema and its mapping onto SamplingParams.

Every field KoboldAI Lite or SillyTavern sends is declared; an unknown field is a 400 naming it
(extra="forbid"), like the OpenAI side. Fields that only steer a client UI are accepted and listed in
UI_ONLY_FIELDS. A field whose sampler the engine lacks gets that sampler's "not supported yet" 400.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from aphrodite_jax.sampling_params import SamplingParams

# Fields that change nothing about generation: client UI state, hints or bookkeeping.
UI_ONLY_FIELDS = ("quiet", "gui_settings", "use_world_info", "use_story", "use_memory", "use_authors_note",
                  "api_server", "streaming", "can_abort", "s1", "s2", "s3", "s4", "s5", "s6", "s7",
                  "replace_instruct_placeholders")

# Kobold sampler ids (KoboldAI / KoboldCpp `sampler_order`) -> Aphrodite SamplerID (docs/decisions.md D27).
# KAI: 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen. Aphrodite runs top-k and
# top-p as one step (id 0), so both map to it.
KAI_TO_APHRODITE = {0: 0, 1: 1, 2: 0, 3: 3, 4: 4, 5: 5, 6: 6}
DEFAULT_PRIORITY = [7, 6, 8, 5, 9, 0, 1, 2, 3, 10, 11, 4, 12, 13]

# SamplingParams field -> the Kobold field a validation message should name.
PARAM_TO_KAI = {"repetition_penalty": "rep_pen", "typical_p": "typical", "epsilon_cutoff": "eps_cutoff",
                "seed": "sampler_seed", "stop": "stop_sequence", "max_tokens": "max_length",
                "sampler_priority": "sampler_order", "custom_token_bans": "banned_tokens",
                "dynatemp_min": "dynatemp_range", "dynatemp_max": "dynatemp_range",
                "dry_range": "dry_penalty_last_n", "ignore_eos": "bypass_eos",
                "mirostat_mode": "mirostat", "repetition_penalty_range": "rep_pen_range",
                "repetition_penalty_slope": "rep_pen_slope"}


class KAIGenerationInput(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str
    genkey: Optional[str] = None
    n: int = Field(default=1, ge=1)
    max_context_length: int = Field(ge=1)
    max_length: int = Field(ge=1)
    memory: str = ""
    rep_pen: float = 1.0
    rep_pen_range: int = 0
    rep_pen_slope: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0
    top_a: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    tfs: float = 1.0
    eps_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    typical: float = 1.0
    temperature: float = 1.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    nsigma: float = 0.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = Field(default=0, validation_alias=AliasChoices("dry_penalty_last_n", "dry_range"))
    dry_sequence_breakers: Optional[Union[list[str], str]] = None
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    sampler_order: Optional[list[int]] = None
    sampler_seed: Optional[int] = None
    stop_sequence: Optional[list[str]] = None
    include_stop_str_in_output: bool = False
    trim_stop: bool = True
    singleline: bool = False
    bypass_eos: bool = False
    render_special: bool = False
    use_default_badwordsids: Optional[bool] = None
    banned_tokens: Optional[list[str]] = None
    logit_bias: Optional[dict[str, float]] = None
    grammar: Optional[str] = None
    grammar_retain_state: bool = False
    logprobs: bool = False
    images: Optional[list[Any]] = None
    frmttriminc: bool = False
    frmtrmblln: bool = False
    frmtrmspch: bool = False
    frmtadsnsp: bool = False
    # UI-only (see UI_ONLY_FIELDS).
    quiet: Optional[bool] = None
    gui_settings: Optional[bool] = None
    use_world_info: Optional[bool] = None
    use_story: Optional[bool] = None
    use_memory: Optional[bool] = None
    use_authors_note: Optional[bool] = None
    api_server: Optional[str] = None
    streaming: Optional[bool] = None
    can_abort: Optional[bool] = None
    replace_instruct_placeholders: Optional[bool] = None
    s1: Optional[int] = None
    s2: Optional[int] = None
    s3: Optional[int] = None
    s4: Optional[int] = None
    s5: Optional[int] = None
    s6: Optional[int] = None
    s7: Optional[int] = None
    # Fields of registered research samplers (docs/samplers.md), sent as top-level keys.
    extra_args: Optional[dict[str, Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _collect_research_fields(cls, data: Any) -> Any:
        from aphrodite_jax.sampling.registry import move_research_fields

        return move_research_fields(data, set(cls.model_fields))


class KoboldRequestError(ValueError):
    def __init__(self, message: str, field: Optional[str]):
        super().__init__(message)
        self.field = field


_SP_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def sampler_priority(order: list[int]) -> Optional[list[int]]:
    """A KAI sampler_order as Aphrodite's full 14-id priority, or None when it is the default order.

    The samplers the client listed take the slots they hold in the default order, in the client's
    order; samplers Kobold has no id for (DRY, min-p, XTC, ...) stay where the default puts them."""
    bad = [x for x in order if x not in KAI_TO_APHRODITE]
    if bad:
        raise KoboldRequestError(f"sampler_order: unknown Kobold sampler id {bad[0]} (valid: 0-6)",
                                 "sampler_order")
    mine = list(dict.fromkeys(KAI_TO_APHRODITE[x] for x in order))
    slots = [i for i, s in enumerate(DEFAULT_PRIORITY) if s in mine]
    out = list(DEFAULT_PRIORITY)
    for slot, sid in zip(slots, mine):
        out[slot] = sid
    return None if out == DEFAULT_PRIORITY else out


def _active_ids(kw: dict[str, Any], greedy: bool) -> set[int]:
    """The Aphrodite sampler ids this request turns on (each step's `active` test)."""
    on = {7: kw["dry_multiplier"] > 1e-5,
          6: kw["repetition_penalty"] > 1 + 1e-5 or abs(kw["presence_penalty"]) >= 1e-5
          or abs(kw["frequency_penalty"]) >= 1e-5,
          5: not greedy and (abs(kw["temperature"] - 1) >= 1e-5 or "dynatemp_min" in kw),
          9: kw["nsigma"] > 1e-5, 0: not greedy and (kw["top_p"] < 1 - 1e-5 or kw["top_k"] > 0),
          1: not greedy and kw["top_a"] > 0, 2: not greedy and kw["min_p"] > 1e-5, 3: kw["tfs"] < 1 - 1e-5,
          10: kw["eta_cutoff"] > 1e-5, 11: kw["epsilon_cutoff"] > 1e-5, 4: kw["typical_p"] < 1 - 1e-5,
          12: kw["smoothing_factor"] > 1e-5 or kw["smoothing_curve"] > 1, 13: kw["xtc_probability"] > 1e-5}
    return {sid for sid, active in on.items() if active}


def _reorders_active(prio: list[int], kw: dict[str, Any], greedy: bool) -> bool:
    """Whether `prio` runs this request's active samplers in another order than the default does.
    When it does not, leaving sampler_priority unset gives exactly the same output."""
    active = _active_ids(kw, greedy)
    return [s for s in prio if s in active] != [s for s in DEFAULT_PRIORITY if s in active]


def _check_ui_only(req: KAIGenerationInput) -> None:
    refused = [(name, "output formatting") for name in ("frmttriminc", "frmtrmblln", "frmtrmspch", "frmtadsnsp")
               if getattr(req, name)]
    if req.logprobs:
        refused.append(("logprobs", "logprobs on the Kobold API"))
    if req.images:
        refused.append(("images", "image inputs"))
    if req.grammar_retain_state:
        refused.append(("grammar_retain_state", "grammar state across requests"))
    if req.replace_instruct_placeholders and "{{[" in req.prompt:
        refused.append(("replace_instruct_placeholders", "instruct placeholders"))
    if refused:
        name, what = refused[0]
        raise KoboldRequestError(f"{name}: {what} is not supported yet", name)
    order = req.sampler_order or []
    for i in range(7):
        legacy = getattr(req, f"s{i + 1}")
        if legacy is not None and (i >= len(order) or order[i] != legacy):
            raise KoboldRequestError(f"s{i + 1} ({legacy}) disagrees with sampler_order {order}", f"s{i + 1}")


def to_sampling_kwargs(req: KAIGenerationInput, *, prompt_len: int, badwords: Any,
                       token_ids_of: Any) -> dict[str, Any]:
    """The SamplingParams keyword arguments for a Kobold request (raises KoboldRequestError).

    `badwords()` gives the default bad-word ids; `token_ids_of(text)` tokenizes without specials."""
    _check_ui_only(req)
    greedy = req.temperature < 1e-5
    kw: dict[str, Any] = dict(
        n=1 if greedy else req.n, max_tokens=req.max_length, repetition_penalty=req.rep_pen,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        top_k=-1 if req.top_k <= 0 else req.top_k, top_a=req.top_a, top_p=req.top_p, min_p=req.min_p,
        tfs=max(req.tfs, 1e-5), epsilon_cutoff=req.eps_cutoff, eta_cutoff=req.eta_cutoff,
        typical_p=req.typical, temperature=req.temperature, smoothing_factor=req.smoothing_factor,
        smoothing_curve=req.smoothing_curve, nsigma=req.nsigma, xtc_threshold=req.xtc_threshold,
        xtc_probability=req.xtc_probability, dry_multiplier=req.dry_multiplier, dry_base=req.dry_base,
        dry_allowed_length=req.dry_allowed_length, dry_range=req.dry_penalty_last_n,
        seed=None if req.sampler_seed in (None, -1) else req.sampler_seed,
        stop=list(req.stop_sequence or []) + (["\n"] if req.singleline else []),
        include_stop_str_in_output=req.include_stop_str_in_output or not req.trim_stop,
        ignore_eos=req.bypass_eos, skip_special_tokens=not req.render_special)
    kw["best_of"] = kw["n"]
    if req.dynatemp_range > 0 and not greedy:  # docs/decisions.md D17: [T - range, T + range]
        kw.update(dynatemp_min=max(0.0, req.temperature - req.dynatemp_range),
                  dynatemp_max=req.temperature + req.dynatemp_range, dynatemp_exponent=req.dynatemp_exponent)
    kw.update(repetition_penalty_range=max(req.rep_pen_range, 0), repetition_penalty_slope=req.rep_pen_slope)
    if req.extra_args:
        kw["extra_args"] = dict(req.extra_args)
    if req.sampler_order:
        prio = sampler_priority(req.sampler_order)
        if prio is not None and _reorders_active(prio, kw, greedy):
            kw["sampler_priority"] = prio
    if req.mirostat:
        if "mirostat_mode" not in _SP_FIELDS:
            raise KoboldRequestError("mirostat is not supported yet", "mirostat")
        kw.update(mirostat_mode=req.mirostat, mirostat_tau=req.mirostat_tau, mirostat_eta=req.mirostat_eta)
    bans: list[int] = []
    if req.use_default_badwordsids:
        bans += badwords()
    for phrase in req.banned_tokens or []:
        ids = token_ids_of(phrase)
        if len(ids) != 1:
            raise KoboldRequestError(f"banned_tokens: {phrase!r} is {len(ids)} tokens; banning multi-token "
                                     "phrases is not supported yet", "banned_tokens")
        bans += ids
    if bans:
        kw["custom_token_bans"] = sorted(set(bans))
    if req.logit_bias:
        kw["logit_bias"] = dict(req.logit_bias)
    return kw


def dry_breakers(value: Any) -> Optional[list[str]]:
    """KoboldCpp/ST send dry_sequence_breakers as a list or a JSON string of a list."""
    if value is None or isinstance(value, list):
        return value
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise KoboldRequestError("dry_sequence_breakers must be a list of strings or a JSON string of one",
                                 "dry_sequence_breakers")
    return data
