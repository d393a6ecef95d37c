"""SamplingParams: defaults, normalization, Aphrodite's validation messages (docs/decisions.md D26), unsupported
samplers."""
import subprocess
import sys

import pytest

from aphrodite_jax.sampling_params import UNSUPPORTED_DEFAULTS, SamplingParams, SamplingType, sequence_seed


def test_defaults_match_spec_table():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1, 1.0, 1.0, -1, 0.0)
    assert (p.max_tokens, p.min_tokens, p.repetition_penalty, p.xtc_threshold) == (16, 0, 1.0, 0.1)
    assert (p.dry_base, p.dry_allowed_length, p.dry_max_ngram, p.stop, p.stop_token_ids) == (1.75, 2, 12, [], [])
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert p.active_samplers() == []
    assert p.sampling_type == SamplingType.RANDOM


def test_normalization():
    p = SamplingParams(top_k=0, seed=-1, stop="###", logit_bias={"5": 250, 7: -300.0})
    assert p.top_k == -1 and p.seed is None and p.stop == ["###"]
    assert p.logit_bias == {5: 100.0, 7: -100.0}
    with pytest.warns(UserWarning):
        assert SamplingParams(temperature=0.001).temperature == 0.01
    g = SamplingParams.greedy(top_p=0.5, top_k=5, min_p=0.2, seed=3)
    assert g.is_greedy and (g.top_p, g.top_k, g.min_p) == (1.0, -1, 0.0)
    assert g.sampling_type == SamplingType.GREEDY
    assert SamplingParams(seed=4).sampling_type == SamplingType.RANDOM_SEED


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be at least 1, got 0."),
    (dict(n=1.5), "n must be an int"),
    (dict(n=3, best_of=2), "best_of must be greater than or equal to n, got n=3 and best_of=2."),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0.5), "repetition_penalty must be in [1, inf)"),
    (dict(temperature=-1), "temperature must be non-negative"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=-5), "top_k must be -1 (disable), or at least 1"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(top_a=-1), "top_a must be non negative"),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
    (dict(min_tokens=-1), "min_tokens must be greater than or equal to 0"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens must be less than or equal to max_tokens=4"),
    (dict(logprobs=-1), "logprobs must be non-negative"),
    (dict(prompt_logprobs=-2), "prompt_logprobs must be non-negative"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be >= 1"),
    (dict(stop=["a", ""]), "stop cannot contain an empty string."),
    (dict(stop=["a"], detokenize=False), "stop strings are only supported when detokenize is True."),
    (dict(xtc_probability=2), "xtc_probability must be in [0, 1]"),
    (dict(dry_base=1.0), "dry_base must be greater than 1"),
    (dict(dry_range=-1), "dry_range must be non-negative"),
    (dict(skew=-1), "skew must be non-negative"),
    (dict(custom_token_bans=["a"]), "custom_token_bans must be a list of integers"),
    (dict(logit_bias={"x": 1}), "Found token_id in logit_bias that is not an integer"),
    (dict(early_stopping=True), "early_stopping is not effective and must be False"),
    (dict(length_penalty=2.0), "length_penalty is not effective"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


_NON_DEFAULT = {bool: True, int: 3, float: 0.5}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_DEFAULTS))
def test_unsupported_samplers_are_rejected(name):
    default = UNSUPPORTED_DEFAULTS[name]
    value = {"logits_processors": [print], "sampler_priority": [0], "token_ban_ranges": [([1], 0, 2)],
             "use_beam_search": True}.get(name, _NON_DEFAULT.get(type(default)))
    kwargs = {name: value}
    if name == "use_beam_search":
        kwargs.update(temperature=0.0, best_of=2)
    with pytest.raises(ValueError, match=f"{name} is not supported yet"):
        SamplingParams(**kwargs)
    SamplingParams(**{name: default})  # the neutral value is accepted


def test_vocab_and_logprob_limits():
    SamplingParams(logit_bias={3: 1.0}).verify_vocab(10)
    with pytest.raises(ValueError, match="out-of-vocab"):
        SamplingParams(logit_bias={30: 1.0}).verify_vocab(10)
    with pytest.raises(ValueError, match="out-of-vocab"):
        SamplingParams(allowed_token_ids=[1, 10]).verify_vocab(10)
    with pytest.raises(ValueError, match="Cannot request more than 5 logprobs."):
        SamplingParams(logprobs=6).verify_max_logprobs(5)


def test_active_samplers_clone_and_stop_ids():
    p = SamplingParams(temperature=0.7, top_k=40, min_p=0.1, presence_penalty=0.3, stop_token_ids=[9],
                       logit_bias={1: 2.0})
    assert set(p.active_samplers()) == {"temperature", "top_p_top_k", "min_p", "penalties", "logit_bias"}
    q = p.clone()
    q.stop_token_ids.append(10)
    assert p.stop_token_ids == [9] and q.temperature == 0.7
    assert p.all_stop_token_ids([2]) == {2, 9}
    assert SamplingParams(ignore_eos=True, stop_token_ids=[9]).all_stop_token_ids([2]) == {9}


def test_sequence_seed_distinct_and_stable():
    seeds = [sequence_seed(1234, i) for i in range(8)]
    assert seeds[0] == 1234 and len(set(seeds)) == 8
    assert seeds == [sequence_seed(1234, i) for i in range(8)]
    assert all(0 <= s < 2**64 for s in seeds)


def test_module_does_not_import_jax():
    code = "import sys, aphrodite_jax.sampling_params; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
