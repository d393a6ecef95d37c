"""SamplingParams: the Aphrodite (v0.6.7) sampling field set, its defaults and validation messages.

Host-side only: the scheduler and the serving layer import this, so it must never import JAX.
The on-device sampler (`aphrodite_jax/sampling/sampler.py`) reads these fields into per-row arrays.

From docs/decisions.md: `top_k` 0 means off like -1 (D21); `eta_cutoff` / `epsilon_cutoff` are in
units of 1e-4 (D2); `seed` -1 means unseeded. Samplers the engine does not implement yet raise
"<field> is not supported yet" when set to a non-default value, so nothing is silently ignored.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum
from typing import Any, Optional, Union

from aphrodite_jax.guided.params import GuidedDecodingParams

_SAMPLING_EPS = 1e-5
_MAX_INT64 = 2**63 - 1


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


# Fields whose sampler is not implemented yet, with their neutral value. Setting any of them to
# something else is a ValueError; a later issue removes entries as the samplers land.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    # Python callables cannot run inside the jitted sampler; register a JAX step instead
    # (aphrodite_jax.sampling.register_sampler, docs/samplers.md).
    "logits_processors": None,
}

# Aphrodite's SamplerID enum (docs/decisions.md D27): the ids and names `sampler_priority` accepts, mapped
# to our registry's step names.
SAMPLER_IDS: dict[int, tuple[str, str]] = {
    0: ("TOP_P_TOP_K", "top_p_top_k"), 1: ("TOP_A", "top_a"), 2: ("MIN_P", "min_p"), 3: ("TFS", "tfs"),
    4: ("TYPICAL_P", "typical_p"), 5: ("TEMPERATURE", "temperature"), 6: ("PENALTIES", "penalties"),
    7: ("DRY", "dry"), 8: ("NO_REPEAT_NGRAM", "no_repeat_ngram"), 9: ("TOP_NSIGMA", "top_nsigma"),
    10: ("ETA_CUTOFF", "eta_cutoff"), 11: ("EPSILON_CUTOFF", "epsilon_cutoff"),
    12: ("QUADRATIC", "quadratic"), 13: ("XTC", "xtc"),
}
_SAMPLER_BY_NAME = {name.lower(): step for name, step in SAMPLER_IDS.values()}
_SAMPLER_BY_NAME.update({step: step for _, step in SAMPLER_IDS.values()})


def _is_default(name: str, value: Any, default: Any) -> bool:
    if default is None:
        return value is None or value == []
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return abs(float(value) - default) < _SAMPLING_EPS
    return value == default


@dataclass
class SamplingParams:
    """Sampling parameters of one request (Aphrodite v0.6.7 fields and defaults)."""

    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    dynatemp_min: float = 0.0
    dynatemp_max: float = 0.0
    dynatemp_exponent: float = 1.0
    temperature_last: bool = False
    top_p: float = 1.0
    top_k: int = -1
    top_a: float = 0.0
    min_p: float = 0.0
    tfs: float = 1.0
    eta_cutoff: float = 0.0  # units of 1e-4 (docs/decisions.md D2)
    epsilon_cutoff: float = 0.0  # units of 1e-4
    typical_p: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    seed: Optional[int] = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: the rest of the context (the engine fills it in)
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    custom_token_bans: Optional[list[int]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Optional[list[Any]] = None
    truncate_prompt_tokens: Optional[int] = None
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    nsigma: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breaker_ids: list[int] = field(default_factory=list)
    dry_range: int = 0
    dry_max_ngram: int = 12
    dry_max_occurrences: int = 8
    dry_early_exit_match_len: int = 8
    skew: float = 0.0
    sampler_priority: Optional[list[Union[int, str]]] = None
    no_repeat_ngram_size: int = 0
    token_ban_ranges: Optional[list[tuple]] = None
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    # Kobold's rep_pen_range / rep_pen_slope (KoboldCpp semantics; an extension of Aphrodite's set):
    # the repetition penalty looks at the last `range` tokens of prompt + output only (0 = all), and
    # tokens seen only in the older half of that window get 1 + (penalty - 1) * slope (1 = flat).
    repetition_penalty_range: int = 0
    repetition_penalty_slope: float = 1.0
    mirostat_mode: int = 0  # 0 off, 2 Mirostat v2 (v0.5.3 semantics; Kobold clients send it)
    mirostat_tau: float = 0.0
    mirostat_eta: float = 0.0
    # Values of registered research samplers' fields (docs/samplers.md), by field name.
    extra_args: Optional[dict[str, Any]] = None
    guided_decoding: Optional[GuidedDecodingParams] = None  # aphrodite_jax/guided

    def __post_init__(self) -> None:
        self._normalize()
        self._verify_args()
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, GuidedDecodingParams):
                raise ValueError("guided_decoding must be a GuidedDecodingParams")
            self.guided_decoding.verify()
            if self.use_beam_search:
                raise ValueError("guided_decoding cannot be combined with use_beam_search yet")
        if self.use_beam_search:
            self._verify_beam_search()
        else:
            self._verify_non_beam_search()
            if self.temperature < _SAMPLING_EPS:
                # Greedy: the truncation samplers are reset to neutral (Aphrodite behaviour).
                self.top_p, self.top_k, self.min_p, self.top_a = 1.0, -1, 0.0, 0.0
        self._verify_supported()

    # ------------------------------------------------------------------ normalization
    def _normalize(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.seed == -1:
            self.seed = None
        if self.top_k == 0:  # docs/decisions.md D21: 0 means off, like -1
            self.top_k = -1
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if 0 < self.temperature < 0.01:
            warnings.warn(f"temperature {self.temperature} is below 0.01; raising it to 0.01", stacklevel=3)
            self.temperature = 0.01
        if self.logit_bias is not None:
            self.logit_bias = self._clean_logit_bias(self.logit_bias)
        self.token_ban_ranges = self._clean_ban_ranges(self.token_ban_ranges)
        self.sampler_priority = self._clean_priority(self.sampler_priority)
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise ValueError("extra_args must be a dict of sampler field values")

    @staticmethod
    def _clean_ban_ranges(ranges: Any) -> Optional[list[tuple[list[int], int, int]]]:
        """[(tokens, start, length), ...]: ban `tokens` while start <= output_len < start + length."""
        if ranges is None or ranges == []:
            return None
        if not isinstance(ranges, (list, tuple)):
            raise ValueError("token_ban_ranges must be a list of tuples")
        out = []
        for r in ranges:
            if not isinstance(r, (tuple, list)) or len(r) != 3:
                raise ValueError("token_ban_ranges must be a list of tuples (tokens, start, length)")
            tokens, start, length = r
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                tokens = [tokens]
            if (not isinstance(tokens, (list, tuple))
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
                raise ValueError("token_ban_ranges: tokens must be a list of integers")
            for v in (start, length):
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError("token_ban_ranges: start and length must be non-negative integers")
            out.append((list(tokens), start, length))
        return out

    @staticmethod
    def _clean_priority(priority: Any) -> Optional[list[str]]:
        """sampler_priority as registry step names; ids or case-insensitive names, all 14 required.
        Names that are not Aphrodite's are kept for registered research samplers (checked by the
        engine, which knows the registry)."""
        if priority is None or priority == []:
            return None
        if not isinstance(priority, (list, tuple)):
            raise ValueError("sampler_priority must be a list of integers or strings")
        out: list[str] = []
        for item in priority:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ValueError("sampler_priority must be a list of integers or strings")
            if isinstance(item, int):
                if item not in SAMPLER_IDS:
                    raise ValueError(f"Invalid sampler ID in priority list: {item} (sampler_priority takes "
                                     "ids 0-13 or names)")
                name = SAMPLER_IDS[item][1]
            else:
                name = _SAMPLER_BY_NAME.get(item.strip().lower(), item.strip())
                if not name:
                    raise ValueError(f"Invalid sampler ID in priority list: {item!r}")
            if name not in out:  # duplicates are accepted; the first place counts
                out.append(name)
        missing = [n for n, step in SAMPLER_IDS.values() if step not in out]
        if missing:
            raise ValueError(f"Missing required samplers in priority list: {missing} "
                             "(sampler_priority must list all 14 samplers)")
        return out

    @staticmethod
    def _clean_logit_bias(bias: dict) -> dict[int, float]:
        out: dict[int, float] = {}
        for k, v in bias.items():
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise ValueError(
                    "Found token_id in logit_bias that is not an integer or string representing an integer"
                ) from None
            if isinstance(k, float) and k != tid:
                raise ValueError(
                    "Found token_id in logit_bias that is not an integer or string representing an integer")
            out[tid] = min(100.0, max(-100.0, float(v)))
        return out

    # ------------------------------------------------------------------ validation (Aphrodite's messages, D26)
    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool):
            raise ValueError(f"n must be an int, but is of type {type(self.n)}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.best_of < self.n:
            raise ValueError(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not isinstance(self.repetition_penalty_range, int) or self.repetition_penalty_range < 0:
            raise ValueError(f"repetition_penalty_range must be a non-negative integer, got "
                             f"{self.repetition_penalty_range}.")
        if self.repetition_penalty_slope < 0.0:
            raise ValueError(f"repetition_penalty_slope must be non-negative, got {self.repetition_penalty_slope}.")
        if self.repetition_penalty < 1.0:
            raise ValueError(f"repetition_penalty must be in [1, inf), got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if self.top_a < 0:
            raise ValueError(f"top_a must be non negative, got {self.top_a}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not 0.0 < self.tfs <= 1.0:
            raise ValueError(f"tfs must be in (0, 1], got {self.tfs}.")
        if not 0.0 <= self.epsilon_cutoff <= 1000.0:
            raise ValueError(f"epsilon_cutoff must be in [0, 1000], got {self.epsilon_cutoff}.")
        if not self.eta_cutoff >= 0.0:
            raise ValueError(f"eta_cutoff must be non negative, got {self.eta_cutoff}.")
        if not 0.0 <= self.typical_p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. "
                             "Set detokenize=True to use stop.")
        if self.xtc_threshold < 0.0:
            raise ValueError("xtc_threshold must be non-negative, got {}.".format(self.xtc_threshold))
        if not 0.0 <= self.xtc_probability <= 1.0:
            raise ValueError(f"xtc_probability must be in [0, 1], got {self.xtc_probability}.")
        if self.nsigma < 0.0:
            raise ValueError(f"nsigma must be non-negative, got {self.nsigma}.")
        if self.dry_multiplier < 0.0:
            raise ValueError(f"dry_multiplier must be non-negative, got {self.dry_multiplier}.")
        if self.dry_base <= 1.0:
            raise ValueError(f"dry_base must be greater than 1, got {self.dry_base}.")
        for name in ("dry_allowed_length", "dry_range", "dry_max_ngram", "dry_max_occurrences",
                     "dry_early_exit_match_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.skew < 0.0:
            raise ValueError(f"skew must be non-negative, got {self.skew}.")
        if self.custom_token_bans is not None and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.custom_token_bans):
            raise ValueError("custom_token_bans must be a list of integers")
        if self.token_ban_ranges is not None and not all(
                isinstance(r, (tuple, list)) for r in self.token_ban_ranges):
            raise ValueError("token_ban_ranges must be a list of tuples")
        if self.mirostat_mode not in (0, 2):
            raise ValueError(f"mirostat_mode must be 0 (off) or 2 (Mirostat v2), got {self.mirostat_mode}.")
        if self.mirostat_mode == 2 and self.mirostat_tau <= 0.0:
            raise ValueError(f"mirostat_tau must be positive when mirostat_mode is 2, got {self.mirostat_tau}.")
        if self.mirostat_eta < 0.0:
            raise ValueError(f"mirostat_eta must be non-negative, got {self.mirostat_eta}.")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be a non-negative integer, got {self.no_repeat_ngram_size}.")
        if self.seed is not None and not -(2**63) <= self.seed <= _MAX_INT64:
            raise ValueError(f"seed must fit in int64, got {self.seed}.")

    def _verify_beam_search(self) -> None:
        if self.best_of == 1:
            raise ValueError(f"best_of must be greater than 1 when using beam search. Got {self.best_of}.")
        if self.temperature > _SAMPLING_EPS:
            raise ValueError("temperature must be 0 when using beam search.")
        if self.top_p < 1.0 - _SAMPLING_EPS:
            raise ValueError("top_p must be 1 when using beam search.")
        if self.top_k != -1:
            raise ValueError("top_k must be -1 when using beam search.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False, or 'never', got {self.early_stopping}.")

    def _verify_non_beam_search(self) -> None:
        if self.early_stopping is not False:
            raise ValueError("early_stopping is not effective and must be False when not using beam search.")
        if not (1.0 - _SAMPLING_EPS < self.length_penalty < 1.0 + _SAMPLING_EPS):
            raise ValueError("length_penalty is not effective and must be the default value of 1.0 when not "
                             "using beam search.")

    def _verify_supported(self) -> None:
        for name, default in UNSUPPORTED_DEFAULTS.items():
            if not _is_default(name, getattr(self, name), default):
                raise ValueError(f"{name} is not supported yet (got {getattr(self, name)!r}).")

    def verify_vocab(self, vocab_size: int) -> None:
        """Checks token ids against the vocabulary (the engine calls it once it knows the vocab)."""
        if self.logit_bias and any(not 0 <= t < vocab_size for t in self.logit_bias):
            raise ValueError("token_id in logit_bias contains out-of-vocab token id")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is not allowed to be empty.")
            if any(not 0 <= t < vocab_size for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids contains out-of-vocab token id!")
        if self.custom_token_bans and any(not 0 <= t < vocab_size for t in self.custom_token_bans):
            raise ValueError("custom_token_bans contains out-of-vocab token id")

    def verify_max_logprobs(self, max_logprobs: int) -> None:
        """Logprobs above --max-logprobs are rejected (docs/decisions.md D31)."""
        for v in (self.logprobs, self.prompt_logprobs):
            if v is not None and v > max_logprobs:
                raise ValueError(f"Cannot request more than {max_logprobs} logprobs.")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def greedy(cls, **kwargs: Any) -> "SamplingParams":
        """Greedy decoding (temperature 0) with any other fields given."""
        return cls(temperature=0.0, **kwargs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS and not self.use_beam_search

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def stop_max_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def all_stop_token_ids(self, eos_token_ids: "set[int] | list[int] | tuple[int, ...]" = ()) -> set[int]:
        """stop_token_ids plus the model's EOS ids (unless ignore_eos): the ids min_tokens bans."""
        out = set(self.stop_token_ids)
        if not self.ignore_eos:
            out.update(eos_token_ids)
        return out

    def active_samplers(self) -> list[str]:
        """Names of the registered on-device steps this request turns on (each step's `active` test)."""
        act = []
        if self.logit_bias:
            act.append("logit_bias")
        if self.allowed_token_ids is not None:
            act.append("allowed_token_ids")
        if self.custom_token_bans:
            act.append("token_bans")
        if (abs(self.presence_penalty) >= _SAMPLING_EPS or abs(self.frequency_penalty) >= _SAMPLING_EPS
                or self.repetition_penalty > 1.0 + _SAMPLING_EPS):
            act.append("penalties")
        if not self.is_greedy:
            if abs(self.temperature - 1.0) >= _SAMPLING_EPS:
                act.append("temperature")
            if self.top_p < 1.0 - _SAMPLING_EPS or self.top_k != -1:
                act.append("top_p_top_k")
            if self.min_p > _SAMPLING_EPS:
                act.append("min_p")
        return act

    def clone(self) -> "SamplingParams":
        """A deep copy (logits_processors, if any, are shared rather than copied)."""
        procs = self.logits_processors
        self.logits_processors = None
        try:
            new = copy.deepcopy(self)
        finally:
            self.logits_processors = procs
        new.logits_processors = procs
        return new

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Every field's default, stated once (the dataclass above): the HTTP request models and the sampler
# steps' "off" values (padded rows) derive theirs from it.
SAMPLING_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SamplingParams) if f.default is not MISSING}


def sequence_seed(seed: int, seq_index: int) -> int:
    """The seed of sequence `seq_index` of a request: the request seed for index 0, a splitmix64 mix of
    (seed, index) for the others, so the n / best_of samples of a seeded request differ but reproduce."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    if seq_index == 0:
        return s
    z = (s + 0x9E3779B97F4A7C15 * seq_index) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
