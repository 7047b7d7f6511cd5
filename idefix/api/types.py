"""The request and response objects of the Python API, shaped like mistralrs's (and OpenAI's) chat types.

Responses are frozen dataclasses: `dataclasses.asdict(response)` gives the OpenAI-style JSON object.
Pure Python: importing this module loads no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idefix.errors import InvalidRequestError

if TYPE_CHECKING:
    from idefix.api.messages import VisionMessages


@dataclass
class ChatCompletionRequest:
    """One chat completion: the conversation plus every sampling field the OpenAI server accepts.

    messages: OpenAI-style messages (`{"role": "user", "content": "text" | [parts]}`, image parts as
        `{"type": "image_url", "image_url": {"url": URL | path | data URI | base64}}` or
        `{"type": "image", "image": PIL.Image}`), a `VisionMessages`, or an already templated prompt string.
    model: any name; the response reports the loaded model's id.
    stream: False -> one `ChatCompletionResponse`; True -> an iterator of `ChatCompletionChunkResponse`.
    Sampling fields are validated when the request is sent (`InvalidRequestError` names the field); None =
    the default (temperature 1, top_p 1, no penalties, no token limit but the context). mistralrs names
    (`n_choices`, `stop_seqs`) and OpenAI names (`n`, `stop`, `max_completion_tokens`) are both accepted.
    """

    messages: Sequence[Mapping[str, Any]] | VisionMessages | str
    model: str = "default"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n_choices: int = 1
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: Mapping[int, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stop_seqs: Sequence[str] | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    stream: bool = False

    def sampling_fields(self) -> dict[str, Any]:
        """The sampling fields under their OpenAI names, for `idefix.sampling.from_openai` (None = not given)."""
        if self.n is not None and self.n_choices not in (1, self.n):
            raise InvalidRequestError(f"n={self.n} and n_choices={self.n_choices} disagree; give one of them")
        if self.stop is not None and self.stop_seqs is not None:
            raise InvalidRequestError("give stop or stop_seqs, not both")
        if not isinstance(self.stream, bool):
            raise InvalidRequestError(f"stream must be true or false, got {self.stream!r}")
        stop = self.stop if self.stop is not None else self.stop_seqs
        return {
            "max_tokens": self.max_tokens,
            "max_completion_tokens": self.max_completion_tokens,
            "n": self.n if self.n is not None else self.n_choices,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "stop": list(stop) if stop is not None and not isinstance(stop, str) else stop,
            "stop_token_ids": list(self.stop_token_ids) if self.stop_token_ids is not None else None,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Usage:
    """Token counts and timings of one request (all its choices).

    total_tokens = prompt_tokens + completion_tokens; cached_prompt_tokens: prompt tokens whose KV came from
    the prefix cache. total_prompt_time_sec: from arrival to the first token (queueing, image encoding,
    prefill); total_completion_time_sec: from the first token to the last; total_time_sec: their sum.
    avg_prompt_tok_per_sec counts only the prompt tokens actually computed (not the cached ones);
    avg_tok_per_sec = total_tokens / total_time_sec. Rates are 0.0 where their time is 0.
    """

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int
    avg_tok_per_sec: float
    avg_prompt_tok_per_sec: float
    avg_compl_tok_per_sec: float
    total_time_sec: float
    total_prompt_time_sec: float
    total_completion_time_sec: float


@dataclass(frozen=True)
class TopLogprob:
    """One alternative for a generated token: its text, id, log-probability and UTF-8 bytes."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class ResponseLogprob:
    """A generated token with its log-probability and the `top_logprobs` most likely alternatives."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@dataclass(frozen=True)
class Logprobs:
    """Per-token log-probabilities of a choice (or of a chunk's new tokens)."""

    content: list[ResponseLogprob] | None


@dataclass(frozen=True)
class ResponseMessage:
    """The answer: `content` (the generated text) and `role` ("assistant")."""

    content: str
    role: str


@dataclass(frozen=True)
class Choice:
    """One completion. finish_reason: "stop" (EOS or a stop string / token) or "length" (token limit or
    context full); logprobs: None unless the request asked for them."""

    finish_reason: str
    index: int
    message: ResponseMessage
    logprobs: Logprobs | None


@dataclass(frozen=True)
class ChatCompletionResponse:
    """The answer to a non-streaming request; `object` is "chat.completion"."""

    id: str
    choices: list[Choice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage


@dataclass(frozen=True)
class Delta:
    """New text of a streamed choice; `role` is "assistant"."""

    content: str
    role: str


@dataclass(frozen=True)
class ChunkChoice:
    """One choice's news in a chunk; `finish_reason` is set on its last chunk only."""

    finish_reason: str | None
    index: int
    delta: Delta
    logprobs: Logprobs | None


@dataclass(frozen=True)
class ChatCompletionChunkResponse:
    """One streamed piece of the answer; `object` is "chat.completion.chunk". Concatenating the
    `delta.content` of a choice's chunks gives its whole text. `usage` is set on the request's last chunk."""

    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage | None = None
