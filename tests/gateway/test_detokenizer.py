"""Tests for services.gateway.detokenizer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from services.gateway.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

SENTENCES = [
    "Hello world, the café serves crème brûlée and naïve résumé.",
    "世界你好，你好世界。世界和平！",
    "emoji time 😀🎉👍🏽 and more 😀😀 🎉",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Ünïcödé straße — “quotes” and ‘single’ … done",
]
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style), vocab 300, trained on SENTENCES."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer: Metaspace, byte fallback, leading space stripped."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", *byte_tokens], show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def decode(tokenizer, ids, skip_special_tokens=True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def run(tokenizer, ids, chunk=1, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    """Push ids `chunk` at a time, then flush; return the outputs and the detokenizer."""
    det = IncrementalDetokenizer(tokenizer, **kwargs)
    outputs = [det.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    outputs.append(det.flush())
    return outputs, det


def expected_with_stop(text: str, stop) -> str:
    """The reference: cut at the first point where a stop string is complete."""
    best = None
    for s in stop:
        start = text.find(s)
        if start >= 0 and (best is None or (start + len(s), start) < best):
            best = (start + len(s), start)
    return text if best is None else text[: best[1]]


class RecordingTokenizer:
    """Wraps a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, **kwargs)


# ------------------------------------------------------------ plain decoding


@pytest.mark.parametrize("text", SENTENCES + [" ".join(SENTENCES), "世界😀é", "x"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_concatenation_equals_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    outputs, det = run(tokenizer, ids, chunk=chunk)
    assert "".join(outputs) == text == decode(tokenizer, ids)
    assert det.text == text
    assert not det.stopped


def test_fixture_splits_multibyte_characters(tokenizer):
    # The test is only meaningful if some token ends inside a UTF-8 character.
    ids = tokenizer.encode(" ".join(SENTENCES))
    assert any(REPLACEMENT_CHAR in decode(tokenizer, [i]) for i in ids)


def test_incomplete_character_is_held_back(tokenizer):
    ids = tokenizer.encode("世界😀é")
    det = IncrementalDetokenizer(tokenizer)
    seen = ""
    for token in ids:
        out = det.push([token])
        assert REPLACEMENT_CHAR not in out
        seen += out
        assert "世界😀é".startswith(seen)
    assert seen + det.flush() == "世界😀é"


def test_emoji_split_byte_by_byte(tokenizer):
    # Single-byte tokens: every emoji needs four tokens before it can be shown.
    ids = [_byte_token(tokenizer, b) for b in "😀👍🏽".encode()]
    det = IncrementalDetokenizer(tokenizer)
    outputs = [det.push([i]) for i in ids]
    assert outputs[:4] == ["", "", "", "😀"]
    assert "".join(outputs) + det.flush() == "😀👍🏽"


def _byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_level_table()


def _byte_token(tokenizer, byte: int) -> int:
    """The id of the single-byte token for `byte`."""
    token_id = tokenizer.convert_tokens_to_ids(BYTE_TO_CHAR[byte])
    assert isinstance(token_id, int)
    return token_id


def test_invalid_utf8_is_flushed(tokenizer):
    # A lone lead byte at the very end never completes: flush returns the "\ufffd".
    ids = tokenizer.encode("ok") + [_byte_token(tokenizer, 0xE4)]
    det = IncrementalDetokenizer(tokenizer)
    assert "".join(det.push([i]) for i in ids) == "ok"
    assert det.flush() == REPLACEMENT_CHAR
    assert det.text == decode(tokenizer, ids)


def test_special_tokens(tokenizer):
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = tokenizer.encode("Hello") + [eos] + tokenizer.encode(" world")
    skipped, _ = run(tokenizer, ids)
    kept, _ = run(tokenizer, ids, skip_special_tokens=False)
    assert "".join(skipped) == "Hello world"
    assert "".join(kept) == "Hello" + EOS + " world" == decode(tokenizer, ids, skip_special_tokens=False)


def test_push_after_flush_and_empty_push(tokenizer):
    det = IncrementalDetokenizer(tokenizer)
    assert det.push([]) == ""
    assert det.push(tokenizer.encode("abc")) == "abc"
    assert det.flush() == ""
    assert det.push(tokenizer.encode("def")) == ""
    assert det.flush() == ""
    assert det.text == "abc"


def test_empty_stop_string_rejected(tokenizer):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tokenizer, stop=["x", ""])


# ------------------------------------------------------------ prompt context


def test_prompt_context_keeps_leading_space(metaspace_tokenizer):
    tok = metaspace_tokenizer
    prompt = tok.encode("Hello")
    ids = tok.encode("Hello world, the café")[len(prompt):]
    assert tok.encode("Hello world, the café")[: len(prompt)] == prompt
    # Decoded alone, the first generated token loses its leading space.
    assert not decode(tok, ids).startswith(" ")
    _, det = run(tok, ids, prompt_token_ids=prompt)
    assert det.text == " world, the café"


def test_prompt_context_with_byte_level(tokenizer):
    prompt = tokenizer.encode("世界你好")
    ids = tokenizer.encode(" emoji 😀 time")
    _, det = run(tokenizer, ids, prompt_token_ids=prompt)
    assert det.text == " emoji 😀 time"


def test_prompt_ending_inside_a_character_is_ignored(tokenizer):
    prompt = [_byte_token(tokenizer, 0xE4), _byte_token(tokenizer, 0xB8)]
    ids = [_byte_token(tokenizer, 0x96)] + tokenizer.encode("ok")
    _, det = run(tokenizer, ids, prompt_token_ids=prompt)
    assert det.text == decode(tokenizer, ids)


# ------------------------------------------------------------ window size


def test_window_stays_short_for_long_output(tokenizer):
    ids = tokenizer.encode(" ".join(SENTENCES)) * 30
    recorder = RecordingTokenizer(tokenizer)
    _, det = run(recorder, ids)
    assert det.text == decode(tokenizer, ids)
    assert recorder.longest <= 16


def test_window_stays_short_for_invalid_utf8(tokenizer):
    # Continuation bytes with no lead byte: every prefix ends in "\ufffd".
    garbage = [_byte_token(tokenizer, b) for b in (0x80, 0x9F, 0xBF, 0xA5)] * 100
    ids = tokenizer.encode("start ") + garbage + tokenizer.encode(" end 世界")
    recorder = RecordingTokenizer(tokenizer)
    outputs, det = run(recorder, ids)
    assert det.text == decode(tokenizer, ids)
    assert recorder.longest <= 24
    # the garbage is released as it goes, not only at the end
    assert sum(len(o) for o in outputs[:200]) > 100


# ------------------------------------------------------------ stop strings


def test_stop_string_cuts_and_stops(tokenizer):
    ids = tokenizer.encode("Hello world, the café serves")
    _, det = run(tokenizer, ids, stop=["café"])
    assert det.text == "Hello world, the "
    assert det.stopped
    assert det.push(tokenizer.encode("more")) == ""
    assert det.flush() == ""


def test_stop_prefix_is_held_then_released(tokenizer):
    det = IncrementalDetokenizer(tokenizer, stop=["world peace"])
    assert det.push(tokenizer.encode("Hello world")) == "Hello "
    assert det.push(tokenizer.encode(" pe")) == ""
    assert det.push(tokenizer.encode("ach")) == "world peach"
    assert not det.stopped
    assert det.push(tokenizer.encode(" world pea")) == " "
    assert det.flush() == "world pea"
    assert det.text == "Hello world peach world pea"


def test_stop_string_split_inside_a_character(tokenizer):
    ids = tokenizer.encode("你好世界和平")
    _, det = run(tokenizer, ids, stop=["界"])
    assert det.text == "你好世"
    assert det.stopped


def test_first_completed_stop_wins(tokenizer):
    ids = tokenizer.encode("abcdef")
    _, det = run(tokenizer, ids, chunk=len(ids), stop=["abcdef", "d"])
    assert det.text == "abc"
    _, det = run(tokenizer, ids, stop=["bc", "abc"])
    assert det.text == ""


def test_stop_at_start_gives_empty_text(tokenizer):
    _, det = run(tokenizer, tokenizer.encode("Hello"), stop=["He"])
    assert det.text == "" and det.stopped


def test_stop_never_matching_releases_everything(tokenizer):
    ids = tokenizer.encode("Hello world")
    outputs, det = run(tokenizer, ids, stop=["Hello there", "ld!"])
    assert det.text == "Hello world"
    assert outputs[-1] == "ld"  # held back until the end, then flushed


# ------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_matches_full_decode(tokenizer, data):
    vocab = len(tokenizer)
    # Half of the draws are high single bytes, so characters split and UTF-8 breaks often.
    high_bytes = st.integers(0x80, 0xFF).map(lambda b: _byte_token(tokenizer, b))
    ids = data.draw(st.lists(st.one_of(st.integers(0, vocab - 1), high_bytes), max_size=80), label="ids")
    chunk = data.draw(st.integers(1, 4), label="chunk")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    full = decode(tokenizer, ids, skip)

    stop_strings = st.text(alphabet="ab世界😀 é\ufffd" + EOS[:3], min_size=1, max_size=4)
    if full:
        cut = st.tuples(st.integers(0, len(full) - 1), st.integers(1, 4)).map(lambda t: full[t[0]:t[0] + t[1]])
        stop_strings = st.one_of(stop_strings, cut)
    stop = data.draw(st.lists(stop_strings, max_size=3), label="stop")

    outputs, det = run(tokenizer, ids, chunk=chunk, stop=stop, skip_special_tokens=skip)
    expected = expected_with_stop(full, stop)
    assert "".join(outputs) == det.text == expected
    assert det.stopped == any(s in full for s in stop)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_with_prompt(tokenizer, data):
    vocab = len(tokenizer)
    words = data.draw(st.lists(st.sampled_from(" ".join(SENTENCES).split(" ")), min_size=1, max_size=6))
    prompt = tokenizer.encode(" ".join(words))
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    _, det = run(tokenizer, ids, prompt_token_ids=prompt)
    assert det.text == decode(tokenizer, ids)
