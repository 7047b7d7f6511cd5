"""Engine outputs (`Completion`, `RequestOutput`) -> the API's typed response objects."""

from __future__ import annotations

import time
from collections.abc import Sequence

from idefix import __version__
from idefix.api.types import (
    ChatCompletionChunkResponse,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    Logprobs,
    ResponseLogprob,
    ResponseMessage,
    TopLogprob,
    Usage,
)
from idefix.generate import Completion
from idefix.processing.tokenizer import Tokenizer
from idefix.request import RequestOutput, TokenLogprob
from idefix.request import Usage as EngineUsage

FINGERPRINT = f"idefix-{__version__}"
ROLE = "assistant"


def usage_of(usage: EngineUsage) -> Usage:
    """A frozen snapshot of the engine's (still mutable) usage, with the totals and rates filled in."""
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        avg_tok_per_sec=usage.avg_tok_per_sec,
        avg_prompt_tok_per_sec=usage.avg_prompt_tok_per_sec,
        avg_compl_tok_per_sec=usage.avg_compl_tok_per_sec,
        total_time_sec=usage.total_time_sec,
        total_prompt_time_sec=usage.total_prompt_time_sec,
        total_completion_time_sec=usage.total_completion_time_sec,
    )


class ResponseFactory:
    """Builds the responses of one request: they share its id, creation time and model name."""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer) -> None:
        self.id = request_id
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer

    def response(self, completion: Completion) -> ChatCompletionResponse:
        choices = [
            Choice(
                finish_reason=choice.finish_reason or "abort",
                index=choice.index,
                message=ResponseMessage(content=choice.text, role=ROLE),
                logprobs=self.logprobs(choice.logprobs),
            )
            for choice in completion.choices
        ]
        return ChatCompletionResponse(
            id=self.id,
            choices=choices,
            created=self.created,
            model=self.model,
            system_fingerprint=FINGERPRINT,
            object="chat.completion",
            usage=usage_of(completion.usage),
        )

    def chunk(self, out: RequestOutput, last: bool) -> ChatCompletionChunkResponse:
        """The chunk for one engine output; `last`: the request's final output (the chunk carries usage)."""
        choice = ChunkChoice(
            finish_reason=out.finish_reason,
            index=out.index,
            delta=Delta(content=out.text, role=ROLE),
            logprobs=self.logprobs(out.logprobs),
        )
        return ChatCompletionChunkResponse(
            id=self.id,
            choices=[choice],
            created=self.created,
            model=self.model,
            system_fingerprint=FINGERPRINT,
            object="chat.completion.chunk",
            usage=usage_of(out.usage) if last else None,
        )

    def logprobs(self, entries: Sequence[TokenLogprob] | None) -> Logprobs | None:
        if entries is None:
            return None
        content = [
            ResponseLogprob(
                token=(text := self._text(entry.token_id)),
                token_id=entry.token_id,
                logprob=entry.logprob,
                bytes=list(text.encode()),
                top_logprobs=[self._top(token_id, logprob) for token_id, logprob in entry.top],
            )
            for entry in entries
        ]
        return Logprobs(content=content)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self._text(token_id)
        return TopLogprob(token=text, token_id=token_id, logprob=logprob, bytes=list(text.encode()))

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
