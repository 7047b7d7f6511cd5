"""The OpenAI chat-completions wire format: request models (validated strictly) and response models.

Requests are parsed with `ChatCompletionRequest.parse(body)`; any problem raises `pydantic.ValidationError`
or `InvalidRequestError`, which the server answers with a 400 in OpenAI's error shape.

Fields a request may carry:
- used: model, messages, stream, stream_options.include_usage, max_tokens, max_completion_tokens, temperature,
  top_p, top_k, min_p, frequency_penalty, presence_penalty, repetition_penalty, stop, seed, n, logprobs,
  top_logprobs, logit_bias, and the vLLM extras min_tokens, stop_token_ids, ignore_eos;
  `response_format` only as {"type": "text"}; `modalities` only as ["text"].
- accepted and ignored (they change nothing about the answer): `IGNORED_FIELDS`, `image_url.detail`,
  a message's `name`, and empty / null `tool_calls`, `function_call`, `audio`, `refusal`, `annotations`
  on echoed assistant messages.
- refused with a 400 that names them: `UNSUPPORTED_FIELDS` (tools, audio, a chat template in the request, ...)
  and any other field, so a typo such as `max_token` is never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from idefix.errors import InvalidRequestError

IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "reasoning_effort",
     "verbosity", "parallel_tool_calls"}
)  # fmt: skip
UNSUPPORTED_FIELDS = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "chat_template": "the server always uses the model's own chat template; a template in the request is refused",
    "chat_template_kwargs": "the server always uses the model's own chat template; template arguments are refused",
    "best_of": "best_of is not supported; use n",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "guided_json": "guided decoding is not supported",
    "guided_regex": "guided decoding is not supported",
    "guided_choice": "guided decoding is not supported",
    "guided_grammar": "guided decoding is not supported",
}
_MESSAGE_IGNORED = frozenset({"tool_calls", "function_call", "audio", "refusal", "annotations", "reasoning_content"})

Strict = ConfigDict(strict=True, extra="forbid")


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = Strict
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; images are always processed in full


class ImageUrlPart(BaseModel):
    model_config = Strict
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def check(self, where: str) -> None:
        for key, value in (self.model_extra or {}).items():
            if key not in _MESSAGE_IGNORED:
                raise InvalidRequestError(f"{where}.{key}: unknown message field")
            if value not in (None, [], {}, ""):
                raise InvalidRequestError(f"{where}.{key}: tool calls and audio are not supported")
        if self.content is None or self.content == []:
            raise InvalidRequestError(f"{where}.content: a message needs text or image content")

    def to_engine(self) -> dict[str, Any]:
        """The message as the engine's chat template reads it ("developer" is OpenAI's new name for "system")."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        parts = self.content or []
        return {"role": role, "content": [part.model_dump(exclude_none=True) for part in parts]}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None

    @classmethod
    def parse(cls, body: bytes) -> ChatCompletionRequest:
        request = cls.model_validate_json(body)
        request.check()
        return request

    def check(self) -> None:
        """Refuse what the server cannot honour (see the module docstring)."""
        for key in self.model_extra or {}:
            if key in UNSUPPORTED_FIELDS:
                raise InvalidRequestError(f"{key}: {UNSUPPORTED_FIELDS[key]}")
            if key not in IGNORED_FIELDS:
                raise InvalidRequestError(f"{key}: unknown field")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError(f"response_format: type {self.response_format.type!r} is not supported")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise InvalidRequestError("modalities: only 'text' output is supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options: only allowed when stream is true")
        for i, message in enumerate(self.messages):
            message.check(f"messages[{i}]")

    def sampling_fields(self) -> dict[str, Any]:
        """The fields `idefix.sampling.from_openai` takes (None = not given)."""
        names = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "logit_bias", "seed", "stop", "stop_token_ids",
                 "min_tokens", "ignore_eos", "n", "logprobs", "top_logprobs")  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def engine_messages(self) -> list[dict[str, Any]]:
        return [message.to_engine() for message in self.messages]

    def num_images(self) -> int:
        return sum(
            isinstance(part, ImageUrlPart) for m in self.messages if isinstance(m.content, list) for part in m.content
        )


# ---------------------------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    """OpenAI's usage plus mistral.rs's timing fields."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    avg_tok_per_sec: float
    avg_prompt_tok_per_sec: float
    avg_compl_tok_per_sec: float
    total_time_sec: float
    total_prompt_time_sec: float
    total_completion_time_sec: float


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _given_only(self) -> dict[str, str]:  # OpenAI leaves out what a delta does not change
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "idefix"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
