"""What flows through the engine: a Sequence per answer being generated, RequestOutput back out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from idefix.engine.stop import StopStrings
from idefix.processing.image import ImageBatch
from idefix.processing.tokenizer import Detokenizer
from idefix.sampling import SamplingParams


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for the engine. token_ids: with every <image> expanded; images: tiles of all images
    (None without images); image_digests: content hash per image; image_token_id: the model's <image> id;
    image_seq_len: <image> tokens per tile."""

    token_ids: list[int]
    images: ImageBatch | None
    image_digests: tuple[str, ...]
    image_token_id: int
    image_seq_len: int

    def image_token_counts(self) -> list[int]:
        """<image> tokens of each image, in prompt order."""
        tiles = self.images.tiles_per_image if self.images is not None else []
        return [n * self.image_seq_len for n in tiles]

    def cache_keys(self) -> list[Any]:
        """One key per prompt token for prefix matching: the token id, or (digest, k) for the k-th
        <image> token of an image, so different images never share a cached prefix."""
        counts = zip(self.image_digests, self.image_token_counts(), strict=True)
        image_keys = iter([(digest, k) for digest, count in counts for k in range(count)])
        return [next(image_keys) if token == self.image_token_id else token for token in self.token_ids]


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Usage:
    """Token counts and timings of one request (all its choices)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    time_to_first_token: float = 0.0
    total_prompt_time_sec: float = 0.0
    total_completion_time_sec: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def total_time_sec(self) -> float:
        return self.total_prompt_time_sec + self.total_completion_time_sec

    @property
    def avg_tok_per_sec(self) -> float:
        """All tokens (prompt, cached included, and answer) over the whole request time, as mistral.rs reports."""
        return self.total_tokens / self.total_time_sec if self.total_time_sec > 0 else 0.0

    @property
    def avg_prompt_tok_per_sec(self) -> float:
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / self.total_prompt_time_sec if self.total_prompt_time_sec > 0 else 0.0

    @property
    def avg_compl_tok_per_sec(self) -> float:
        t = self.total_completion_time_sec
        return self.completion_tokens / t if t > 0 else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one choice of a request.

    text: new text (stop strings never included); token_ids: new tokens; finished / finish_reason
    ("stop" | "length" | "abort"); logprobs: one entry per new token when asked; usage: the request's
    usage so far (final once every choice has finished).
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    usage: Usage


@dataclass
class Sequence:
    """One answer being generated (a request with n > 1 has n of them). Owned by the engine thread."""

    request_id: str
    index: int
    prompt: PreparedPrompt
    params: SamplingParams
    keys: list[Any]
    detokenizer: Detokenizer
    stops: StopStrings
    max_tokens: int
    generator: torch.Generator | None
    usage: Usage
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_time: float | None = None
    leader: Sequence | None = None  # choice 0 of the same request, for choices 1..n-1

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    def valid_keys(self) -> list[Any]:
        """Prefix keys of the positions whose KV is in this sequence's slot."""
        return (self.keys + self.output_ids)[: self.num_computed]
