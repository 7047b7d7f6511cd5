"""`SamplingParams`: how one request chooses its tokens, validated once when the request arrives.

Field ranges follow the OpenAI API where it has the field (a bad value is an `InvalidRequestError`, which the
server answers with a 400) and vLLM otherwise. How the fields act on the logits, and in which order, is
described in `idefix.engine.sampler`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idefix.errors import InvalidRequestError

MAX_N = 16
"""Most completions one request may ask for."""
MAX_STOP_STRINGS = 16
"""Most stop strings per request (OpenAI allows 4; vLLM has no limit)."""
MAX_STOP_STRING_CHARS = 256
"""Longest stop string, in characters; the stop matcher holds back at most this much text."""
MAX_STOP_TOKEN_IDS = 256
"""Most extra stop token ids per request."""
MAX_LOGIT_BIAS_ENTRIES = 1024
"""Most entries in `logit_bias`."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives reported per token (the OpenAI limit)."""
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy: dividing float32 logits by them would overflow."""
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; immutable, validated in `__post_init__`.

    Sequences may be passed as lists (they are stored as tuples), `stop` as one string, and `logit_bias`
    keys as decimal strings, as OpenAI JSON carries them (they are stored as ints).
    """

    max_tokens: int | None = None
    """Most tokens to generate (>= 1); None = until a stop condition or the model's context is full."""
    temperature: float = 1.0
    """Softmax temperature, 0..2; below 1e-5 the request is greedy (argmax, no randomness)."""
    top_k: int = 0
    """Keep only the k most likely tokens (ties with the k-th are kept too); 0 or -1 = off; 1 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling, 0 < p <= 1: keep the most likely tokens whose mass just reaches p; 1 = off."""
    min_p: float = 0.0
    """0..1: drop tokens whose probability is below min_p times the top token's; 0 = off."""
    frequency_penalty: float = 0.0
    """-2..2, OpenAI: logit[t] -= count[t] * frequency_penalty, count over generated tokens only."""
    presence_penalty: float = 0.0
    """-2..2, OpenAI: logit[t] -= presence_penalty if t was generated at least once."""
    repetition_penalty: float = 1.0
    """> 0, CTRL / transformers: for tokens in the prompt or the output, logit / p if logit > 0 else logit * p."""
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    """Token id -> value in -100..100 added to its logit (-100 practically bans it, 100 practically forces it)."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same tokens whatever else is
    batched with it (on the same device and model). None = the process-wide generator."""
    stop: tuple[str, ...] = ()
    """Up to 16 non-empty strings (<= 256 characters each); generation ends when the text contains one, and
    the stop string itself is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation, besides the model's EOS ids; the token is not returned as text."""
    min_tokens: int = 0
    """EOS and `stop_token_ids` are banned until this many tokens were generated (<= max_tokens)."""
    ignore_eos: bool = False
    """Keep generating past EOS (for benchmarks); `stop` / `stop_token_ids` / `max_tokens` still apply."""
    n: int = 1
    """Number of completions for the prompt, 1..16; with a seed, completion i uses seed + i."""
    logprobs: bool = False
    """Return the log-probability of each chosen token."""
    top_logprobs: int = 0
    """0..20 most likely alternatives to report per token; needs `logprobs`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_stop_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_int_tuple("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _as_bias_dict(self.logit_bias))
        self._check_numbers()
        self._check_counts()

    def _check_numbers(self) -> None:
        _check_float("temperature", self.temperature, 0.0, 2.0)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        for token, bias in self.logit_bias.items():
            _check_float(f"logit_bias[{token}]", bias, -100.0, 100.0)

    def _check_counts(self) -> None:
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("top_k", self.top_k, -1, None)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check_int("n", self.n, 1, MAX_N)
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.seed is not None:
            _check_int("seed", self.seed, *_SEED_RANGE)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError(f"top_logprobs={self.top_logprobs} needs logprobs=true")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: temperature (almost) 0, or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise `InvalidRequestError` if `logit_bias` or `stop_token_ids` names an id outside 0..vocab_size-1."""
        for name, ids in (("logit_bias", self.logit_bias.keys()), ("stop_token_ids", self.stop_token_ids)):
            for token in ids:
                if not 0 <= token < vocab_size:
                    raise InvalidRequestError(
                        f"{name} has token id {token}, outside the model's vocabulary 0..{vocab_size - 1}"
                    )


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        left = "(" if low_open else "["
        right = "]" if math.isfinite(high) else ")"
        raise InvalidRequestError(f"{name}={value} is out of range, allowed {left}{low}, {high}{right}")


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name}={value} is out of range, allowed {allowed}")


def _as_stop_tuple(stop: Any) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop has {len(stops)} strings, allowed at most {MAX_STOP_STRINGS}")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                f"stop string of {len(s)} characters is too long, allowed at most {MAX_STOP_STRING_CHARS}"
            )
    return tuple(stops)


def _as_int_tuple(name: str, ids: Any) -> tuple[int, ...]:
    if not isinstance(ids, list | tuple):
        raise InvalidRequestError(f"{name} must be a list of token ids, got {ids!r}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"{name} has {len(ids)} ids, allowed at most {MAX_STOP_TOKEN_IDS}")
    for token in ids:
        _check_int(name, token, 0, None)
    return tuple(ids)


def _as_bias_dict(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"logit_bias has {len(bias)} entries, allowed at most {MAX_LOGIT_BIAS_ENTRIES}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        _check_int("logit_bias token id", token, 0, None)
        out[token] = value
    return out


OPENAI_FIELDS = frozenset(
    {
        "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
        "presence_penalty", "repetition_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "min_tokens",
        "ignore_eos", "n", "logprobs", "top_logprobs",
    }
)  # fmt: skip


def from_openai(**fields: Any) -> SamplingParams:
    """SamplingParams from OpenAI chat-completion fields (plus vLLM / mistral.rs extras such as top_k);
    None means "not given". `max_completion_tokens` is OpenAI's newer name for `max_tokens`."""
    unknown = sorted(set(fields) - OPENAI_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown sampling field(s): {', '.join(unknown)}")
    given = {name: value for name, value in fields.items() if value is not None}
    newer = given.pop("max_completion_tokens", None)
    if newer is not None:
        given["max_tokens"] = newer
    if given.get("logprobs") is False:
        given.pop("top_logprobs", None)
    return SamplingParams(**given)
