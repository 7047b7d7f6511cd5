"""EngineConfig: the engine's capacity settings, fixed at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from idefix.errors import InvalidRequestError


@dataclass(frozen=True)
class EngineConfig:
    """max_num_seqs: sequences decoded together (each holds one KV slot while running).
    max_model_len: context per sequence (prompt + answer); None = the model's own limit.
    max_num_batched_tokens: new tokens per forward pass; long prompts are prefilled in chunks of this size
        so running sequences keep decoding meanwhile.
    max_waiting: requests queued beyond the running ones before `OverloadedError`.
    cache_slots: extra KV slots that keep finished conversations for prefix reuse (turn 2 of a chat).
    enable_prefix_caching: reuse the KV of the longest cached prefix (text and image tokens).
    image_cache_bytes: bound of the encoded-image feature cache (LRU, keyed by image content).
    cuda_graphs: on a CUDA device, replay decode steps as CUDA graphs (recorded on first use of each batch
        shape; see idefix/engine/graphs.py).
    """

    max_num_seqs: int = 16
    max_model_len: int | None = 4096
    max_num_batched_tokens: int = 512
    max_waiting: int = 64
    cache_slots: int = 4
    enable_prefix_caching: bool = True
    image_cache_bytes: int = 256 * 2**20
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_waiting < 0 or self.cache_slots < 0 or self.image_cache_bytes < 0:
            raise InvalidRequestError("max_waiting, cache_slots and image_cache_bytes must not be negative")
