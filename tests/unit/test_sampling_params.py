"""SamplingParams validation: every bad value is an InvalidRequestError naming the field, value and range."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from idefix.errors import InvalidRequestError
from idefix.sampling import SamplingParams

BAD: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": 0}, r"max_tokens=0 is out of range, allowed >= 1"),
    ({"max_tokens": 2.5}, r"max_tokens must be an integer, got 2.5"),
    ({"max_tokens": True}, r"max_tokens must be an integer, got True"),
    ({"temperature": -0.1}, r"temperature=-0.1 is out of range, allowed \[0.0, 2.0\]"),
    ({"temperature": 2.01}, r"temperature=2.01 is out of range"),
    ({"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
    ({"temperature": "hot"}, r"temperature must be a finite number, got 'hot'"),
    ({"top_k": -2}, r"top_k=-2 is out of range, allowed >= -1"),
    ({"top_p": 0.0}, r"top_p=0.0 is out of range, allowed \(0.0, 1.0\]"),
    ({"top_p": 1.5}, r"top_p=1.5 is out of range"),
    ({"min_p": -0.01}, r"min_p=-0.01 is out of range, allowed \[0.0, 1.0\]"),
    ({"min_p": 1.01}, r"min_p=1.01 is out of range"),
    ({"frequency_penalty": -2.5}, r"frequency_penalty=-2.5 is out of range, allowed \[-2.0, 2.0\]"),
    ({"frequency_penalty": 2.5}, r"frequency_penalty=2.5 is out of range"),
    ({"presence_penalty": 3}, r"presence_penalty=3 is out of range, allowed \[-2.0, 2.0\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty=0.0 is out of range, allowed \(0.0, inf\)"),
    ({"repetition_penalty": float("inf")}, r"repetition_penalty must be a finite number, got inf"),
    ({"logit_bias": {5: 101}}, r"logit_bias\[5\]=101 is out of range, allowed \[-100.0, 100.0\]"),
    ({"logit_bias": {5: -100.5}}, r"logit_bias\[5\]=-100.5 is out of range"),
    ({"logit_bias": {-1: 1.0}}, r"logit_bias token id=-1 is out of range, allowed >= 0"),
    ({"logit_bias": {"abc": 1.0}}, r"logit_bias token id must be an integer, got 'abc'"),
    ({"logit_bias": [1, 2]}, r"logit_bias must map token ids to numbers"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, r"logit_bias has 1025 entries, allowed at most 1024"),
    ({"seed": 2**64}, r"seed=18446744073709551616 is out of range"),
    ({"seed": "7"}, r"seed must be an integer, got '7'"),
    ({"stop": [""]}, r"stop strings must be non-empty strings, got ''"),
    ({"stop": [1]}, r"stop strings must be non-empty strings, got 1"),
    ({"stop": 5}, r"stop must be a string or a list of strings, got 5"),
    ({"stop": ["x"] * 17}, r"stop has 17 strings, allowed at most 16"),
    ({"stop": ["x" * 257]}, r"stop string of 257 characters is too long, allowed at most 256"),
    ({"stop_token_ids": [3, -1]}, r"stop_token_ids=-1 is out of range, allowed >= 0"),
    ({"stop_token_ids": 3}, r"stop_token_ids must be a list of token ids, got 3"),
    ({"stop_token_ids": list(range(257))}, r"stop_token_ids has 257 ids, allowed at most 256"),
    ({"min_tokens": -1}, r"min_tokens=-1 is out of range, allowed >= 0"),
    ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens=5 is out of range, allowed 0..4"),
    ({"ignore_eos": 1}, r"ignore_eos must be true or false, got 1"),
    ({"n": 0}, r"n=0 is out of range, allowed 1..16"),
    ({"n": 17}, r"n=17 is out of range, allowed 1..16"),
    ({"logprobs": "yes"}, r"logprobs must be true or false, got 'yes'"),
    ({"top_logprobs": 21, "logprobs": True}, r"top_logprobs=21 is out of range, allowed 0..20"),
    ({"top_logprobs": -1, "logprobs": True}, r"top_logprobs=-1 is out of range"),
    ({"top_logprobs": 3}, r"top_logprobs=3 needs logprobs=true"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[next(iter(k)) + f"-{i}" for i, (k, _) in enumerate(BAD)])
def test_invalid_values_raise_with_field_and_range(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_defaults_and_boundaries_are_valid() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.n, p.stop, p.logit_bias) == (None, 1.0, 0, 1.0, 1, (), {})
    SamplingParams(
        max_tokens=1, temperature=2, top_k=-1, top_p=1e-6, min_p=1.0, frequency_penalty=-2, presence_penalty=2,
        repetition_penalty=1e-3, logit_bias={0: -100, 1: 100}, seed=-(2**63), stop=["x" * 256] * 16,
        min_tokens=1, n=16, logprobs=True, top_logprobs=20,
    )  # fmt: skip


def test_inputs_are_normalised() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[4, 5], logit_bias={"12": 3.0, 7: -1})
    assert p.stop == ("###",) and p.stop_token_ids == (4, 5) and p.logit_bias == {12: 3.0, 7: -1}
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_frozen_and_hashable() -> None:
    p = SamplingParams(logit_bias={1: 2.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(logit_bias={3: 1.0})) and p == SamplingParams(logit_bias={1: 2.0})


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [({"temperature": 0}, True), ({"temperature": 1e-6}, True), ({"top_k": 1}, True), ({"temperature": 0.01}, False)],
)
def test_greedy(kwargs: dict[str, Any], greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy


def test_check_vocab() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=(0, 99)).check_vocab(100)
    with pytest.raises(InvalidRequestError, match=r"logit_bias has token id 100, outside .* 0..99"):
        SamplingParams(logit_bias={100: 1.0}).check_vocab(100)
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids has token id 250, outside .* 0..99"):
        SamplingParams(stop_token_ids=(250,)).check_vocab(100)
