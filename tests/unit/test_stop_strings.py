"""Stop strings on streamed text: never emitted, held back only while ambiguous, earliest match wins."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from idefix.engine.stop import StopStrings


def run(stops: Sequence[str], deltas: Sequence[str]) -> tuple[list[str], bool, str]:
    """Emitted pieces (one per delta, then the flush), whether it stopped, and the stop string matched."""
    matcher = StopStrings(stops)
    pieces, stopped = [], False
    for delta in deltas:
        piece, stopped = matcher.feed(delta)
        pieces.append(piece)
        if stopped:
            break
    pieces.append(matcher.flush())
    return pieces, stopped, matcher.matched or ""


@pytest.mark.parametrize(
    "deltas",
    [
        ["Hello wor", "ld<|end|>ignored"],
        ["Hello world<|e", "nd|>ignored"],
        ["Hello world<", "|en", "d|", ">ignored"],
        ["Hello world", "<|", "end", "|>ignored"],
    ],
)
def test_stop_split_across_deltas(deltas: list[str]) -> None:
    pieces, stopped, matched = run(["<|end|>"], deltas)
    assert "".join(pieces) == "Hello world" and stopped and matched == "<|end|>"


def test_only_the_ambiguous_suffix_is_held_back() -> None:
    m = StopStrings(["<|end|>"])
    assert m.feed("Hello <|e") == ("Hello ", False)
    assert m.feed("x") == ("<|ex", False)  # the hold-back turned out not to be a stop string
    assert m.feed("a <") == ("a ", False)
    assert m.feed(" b") == ("< b", False)
    assert m.flush() == ""


def test_no_stop_emits_everything() -> None:
    deltas = ["The ", "cat <", "sat", " on |", "the mat", "<|en"]
    pieces, stopped, _ = run(["<|end|>"], deltas)
    assert "".join(pieces) == "".join(deltas) and not stopped
    assert pieces[-1] == "<|en"  # held back until flush
    pieces, stopped, _ = run([], deltas)
    assert pieces[:-1] == deltas and not stopped


def test_several_stop_strings_the_earliest_wins() -> None:
    pieces, _, matched = run(["STOP", "\n\n", "###"], ["one ### two", " STOP"])
    assert "".join(pieces) == "one " and matched == "###"
    pieces, _, matched = run(["STOP", "\n\n"], ["a\n", "\nb STOP"])
    assert "".join(pieces) == "a" and matched == "\n\n"


def test_one_stop_a_prefix_of_another() -> None:
    # "END" completes before "ENDING" could: generation stops at the shorter one.
    pieces, _, matched = run(["ENDING", "END"], ["it is the EN", "DI", "NG"])
    assert "".join(pieces) == "it is the " and matched == "END"
    # The longer stop alone: "END" + "x" is not a stop, all text comes back.
    pieces, stopped, _ = run(["ENDING"], ["the END", "x"])
    assert "".join(pieces) == "the ENDx" and not stopped
    # Overlapping prefixes: "aab" is found after a false start "aa".
    pieces, _, matched = run(["aab"], ["xa", "a", "a", "b tail"])
    assert "".join(pieces) == "xa" and matched == "aab"


def test_multibyte_text_and_stop_strings() -> None:
    pieces, stopped, matched = run(["🛑停"], ["日本語 😀", "🎉 🛑", "停 after"])
    assert "".join(pieces) == "日本語 😀🎉 " and stopped and matched == "🛑停"
    pieces, stopped, _ = run(["🛑停"], ["café 🛑", "止 ok"])
    assert "".join(pieces) == "café 🛑止 ok" and not stopped


def test_stop_at_the_very_start() -> None:
    assert run(["</s>"], ["</s>rest"]) == (["", ""], True, "</s>")
    assert run(["</s>"], ["<", "/s", ">"]) == (["", "", "", ""], True, "</s>")


def test_after_a_stop_everything_is_dropped() -> None:
    m = StopStrings(["x"])
    assert m.feed("abxcd") == ("ab", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(["ok", ""])
