"""The first generate path: one request, greedy decoding, a one-slot KV cache.

Kept deliberately small; the engine (continuous batching, sampling, caching) supersedes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from idefix.errors import ContextLengthError, InvalidRequestError
from idefix.loading import LoadedModel
from idefix.media import MediaPolicy, load_image
from idefix.model.attention import AttentionBatch
from idefix.processing.processor import Prompt, image_sources
from idefix.processing.tokenizer import Detokenizer


@dataclass(frozen=True)
class Generation:
    """text: the answer; token_ids: its tokens (the stop token excluded); finish_reason: "stop" | "length"."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


def prepare(loaded: LoadedModel, messages: object, policy: MediaPolicy | None = None) -> Prompt:
    """Load every image the messages name and build the prompt."""
    policy = policy or MediaPolicy.trusted()
    images: Sequence[Image.Image] = [load_image(source, policy) for source in image_sources(messages)]
    return loaded.processor(messages, images)


def greedy_tokens(loaded: LoadedModel, prompt: Prompt, max_new_tokens: int) -> Iterator[int]:
    """Yield greedy tokens until an EOS id (not yielded) or `max_new_tokens`."""
    if max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model, ids = loaded.model, prompt.token_ids
    room = loaded.max_model_len - len(ids)
    if room < 1:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens but the model's context is {loaded.max_model_len} tokens"
        )
    steps = min(max_new_tokens, room)
    with torch.inference_mode():
        image_embeds = None
        if prompt.images is not None:
            image_embeds = model.encode_images(prompt.images.pixel_values, prompt.images.pixel_attention_mask)
        cache = model.new_cache(num_slots=1, max_len=len(ids) + steps)
        input_ids = torch.tensor(ids, device=model.device)
        hidden = model(model.embed(input_ids, image_embeds), cache, AttentionBatch.single(0, 0, len(ids)))
        for step in range(steps):
            token = int(model.logits(hidden[-1:]).argmax(-1))
            if token in loaded.eos_token_ids:
                return
            yield token
            if step + 1 < steps:
                at = AttentionBatch.single(0, len(ids) + step, 1, device=model.device)
                next_ids = torch.tensor([token], device=model.device)
                hidden = model(model.embed(next_ids), cache, at)


def stream(
    loaded: LoadedModel, messages: object, max_new_tokens: int = 256, policy: MediaPolicy | None = None
) -> Iterator[str]:
    """Text deltas of the greedy answer to `messages`."""
    prompt = prepare(loaded, messages, policy)
    detok = Detokenizer(loaded.processor.tokenizer)
    for token in greedy_tokens(loaded, prompt, max_new_tokens):
        delta = detok.add([token])
        if delta:
            yield delta
    tail = detok.flush()
    if tail:
        yield tail


def generate(
    loaded: LoadedModel, messages: object, max_new_tokens: int = 256, policy: MediaPolicy | None = None
) -> Generation:
    """The greedy answer to `messages` (OpenAI-style chat messages with image parts)."""
    prompt = prepare(loaded, messages, policy)
    tokens = list(greedy_tokens(loaded, prompt, max_new_tokens))
    room = loaded.max_model_len - len(prompt.token_ids)
    stopped = len(tokens) < min(max_new_tokens, room)
    text = loaded.processor.tokenizer.decode(tokens)
    return Generation(text, tokens, len(prompt.token_ids), "stop" if stopped else "length")
