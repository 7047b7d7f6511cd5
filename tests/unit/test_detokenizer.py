"""The incremental detokenizer: deltas concatenate to the full decode, never split a UTF-8 character."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from idefix.processing.tokenizer import Detokenizer, Tokenizer
from tests.tokenizer_files import ASCII_CORPUS, build_metaspace, build_smolvlm

# Part of it is in the training corpus (merged tokens), part is not (raw byte tokens).
MULTIBYTE = "Hello 日本語のテキスト, 你好世界! emoji 😀🎉👍 café naïve — 今日は良い天気 🚀 done."


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Trained on the full corpus: some merges cross character boundaries."""
    return Tokenizer.from_dir(build_smolvlm(tmp_path_factory.mktemp("bl")))


@pytest.fixture(scope="module")
def ascii_level(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Trained on ASCII only: every CJK / emoji character is 3-4 byte tokens."""
    return Tokenizer.from_dir(build_smolvlm(tmp_path_factory.mktemp("ascii"), ASCII_CORPUS, 300))


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_metaspace(tmp_path_factory.mktemp("ms")))


def stream(tokenizer: Tokenizer, ids: Sequence[int], chunks: Sequence[int] = (1,), skip: bool = True) -> list[str]:
    """Feed `ids` in chunks of the given sizes (cycled); the deltas, flush last."""
    detok = Detokenizer(tokenizer, skip_special_tokens=skip)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        size = chunks[k % len(chunks)]
        deltas.append(detok.add(ids[i : i + size]))
        i, k = i + size, k + 1
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("name", ["byte_level", "ascii_level", "metaspace"])
def test_multibyte_text_streams_whole_characters(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(MULTIBYTE)
    assert tokenizer.decode(ids) == MULTIBYTE
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)
    # characters really were split across tokens, and the detokenizer held their first bytes back
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert "" in deltas[:-1]


def test_partial_character_is_held_until_complete(ascii_level: Tokenizer) -> None:
    ids = ascii_level.encode("😀")
    assert len(ids) == 4
    detok = Detokenizer(ascii_level)
    assert [detok.add([i]) for i in ids] == ["", "", "", "😀"]
    assert detok.flush() == ""


def test_flush_emits_a_trailing_incomplete_character(ascii_level: Tokenizer) -> None:
    ids = ascii_level.encode("ab日")[:-1]
    detok = Detokenizer(ascii_level)
    assert detok.add(ids) == "ab"
    assert detok.flush() == ascii_level.decode(ids)[2:] == "\ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_inside_and_between_characters(ascii_level: Tokenizer, skip: bool) -> None:
    image, eou = ascii_level.token_to_id("<image>"), ascii_level.token_to_id("<end_of_utterance>")
    assert image is not None and eou is not None
    text_ids = ascii_level.encode("日本 ok 😀")
    ids = [image, *text_ids[:2], eou, *text_ids[2:5], image, image, *text_ids[5:], eou]
    expected = ascii_level.decode(ids, skip_special_tokens=skip)
    assert ("<image>" in expected) is not skip
    for chunks in [(1,), (2,), (3, 1), (len(ids),)]:
        assert "".join(stream(ascii_level, ids, chunks, skip)) == expected


def test_metaspace_leading_space_after_skipped_specials(metaspace: Tokenizer) -> None:
    bos, eos = metaspace.bos_token_id, metaspace.eos_token_id
    assert bos is not None and eos is not None
    hello, world = metaspace.encode("Hello"), metaspace.encode("world")
    ids = [bos, *hello, eos, bos, *world, eos, *world]
    expected = metaspace.decode(ids)
    assert expected == "Hello world world"
    assert "".join(stream(metaspace, ids)) == expected


@pytest.mark.parametrize("name", ["byte_level", "ascii_level"])
@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(name: str, skip: bool, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        chunks = [rng.choice([1, 1, 1, 2, 3, 5]) for _ in range(4)]
        assert "".join(stream(tokenizer, ids, chunks, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_random_valid_text_never_emits_replacement_char(byte_level: Tokenizer) -> None:
    rng = random.Random(7)
    alphabet = list("ab 日本語你好😀🎉é—\n")
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        deltas = stream(byte_level, byte_level.encode(text), [rng.choice([1, 2])])
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


class CountingTokenizer(Tokenizer):
    """Records the length of every decode call."""

    lengths: list[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_window_stays_small_on_long_streams(tmp_path: Path) -> None:
    tokenizer = CountingTokenizer.from_dir(build_smolvlm(tmp_path / "tok", ASCII_CORPUS, 300))
    assert isinstance(tokenizer, CountingTokenizer)
    tokenizer.lengths = []
    ids = tokenizer.encode(MULTIBYTE * 40)
    assert len(ids) > 2000
    assert "".join(stream(tokenizer, ids)) == MULTIBYTE * 40
    # each token is decoded in a window of a few tokens, not the whole sequence
    assert max(tokenizer.lengths[:-1]) <= 8
    assert sum(tokenizer.lengths) < 6 * len(ids)


def test_window_stays_small_across_runs_of_skipped_specials(tmp_path: Path) -> None:
    tokenizer = CountingTokenizer.from_dir(build_smolvlm(tmp_path / "tok", ASCII_CORPUS, 300))
    assert isinstance(tokenizer, CountingTokenizer)
    image = tokenizer.token_to_id("<image>")
    assert image is not None
    ids = [*tokenizer.encode("Hi 日"), *[image] * 500, *tokenizer.encode(" there 😀")]
    tokenizer.lengths = []
    assert "".join(stream(tokenizer, ids)) == "Hi 日 there 😀"
    assert max(tokenizer.lengths) <= 8
