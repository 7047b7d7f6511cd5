"""The builder API of mistralrs's Rust crate, in Python: `VisionModelBuilder(id)...build()` -> `VisionModel`.

For example:

    model = VisionModelBuilder("HuggingFaceTB/SmolVLM-256M-Instruct").with_isq(IsqType.Q8_0).with_logging().build()
    messages = VisionMessages().add_image_message(TextMessageRole.User, "What is depicted here?", image, model)
    response = model.send_chat_request(messages)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from idefix.api.options import IsqType, ModelDType, VisionPlain

if TYPE_CHECKING:
    from idefix.api.runner import Messages, Runner
    from idefix.api.types import ChatCompletionChunkResponse, ChatCompletionResponse
    from idefix.media import MediaPolicy
    from idefix.sampling import SamplingParams


@dataclass(frozen=True)
class VisionModelBuilder:
    """How to load a model; each `with_*` returns a new builder, `build()` loads it.

    Fields (set them with the methods): model_id (folder, hub repo id or "demo"), isq, logging_enabled, dtype,
    device, max_num_seqs, prefix_cache_n, max_model_len, token_source, revision, seed, media_policy, uqff,
    topology — their meanings are those of `Runner`'s arguments. ISQ, UQFF and topologies are not
    available yet: `build()` raises `InvalidRequestError` when one is set.
    """

    model_id: str
    isq: IsqType | None = None
    logging_enabled: bool = False
    dtype: ModelDType = ModelDType.Auto
    device: str | None = None
    max_num_seqs: int = 16
    prefix_cache_n: int | None = None
    max_model_len: int | None = 4096
    token_source: str = "cache"
    revision: str | None = None
    seed: int | None = None
    media_policy: MediaPolicy | None = None
    uqff: str | list[str] | None = None
    topology: str | None = None

    def with_isq(self, isq: IsqType | str) -> VisionModelBuilder:
        """Quantize the weights in place while loading (`IsqType.Q8_0`, "Q4K", ...)."""
        return replace(self, isq=IsqType.parse(isq))

    def with_logging(self) -> VisionModelBuilder:
        """Show loading progress and log to stderr (the "idefix" logger at INFO)."""
        return replace(self, logging_enabled=True)

    def with_dtype(self, dtype: ModelDType | str) -> VisionModelBuilder:
        """Weights and compute dtype (`ModelDType.BF16`, "fp32", ...)."""
        return replace(self, dtype=ModelDType.parse(dtype))

    def with_device(self, device: str) -> VisionModelBuilder:
        """Run on this torch device ("cpu", "cuda", "cuda:1"); default CUDA when present, else CPU."""
        return replace(self, device=device)

    def with_force_cpu(self) -> VisionModelBuilder:
        """Run on the CPU even when a GPU is present."""
        return replace(self, device="cpu")

    def with_max_num_seqs(self, max_num_seqs: int) -> VisionModelBuilder:
        """Sequences decoded together (default 16)."""
        return replace(self, max_num_seqs=max_num_seqs)

    def with_prefix_cache_n(self, prefix_cache_n: int) -> VisionModelBuilder:
        """Finished conversations kept for prefix reuse (default 4)."""
        return replace(self, prefix_cache_n=prefix_cache_n)

    def with_max_model_len(self, max_model_len: int | None) -> VisionModelBuilder:
        """Context per sequence, prompt + answer (default 4096; None = the model's own limit)."""
        return replace(self, max_model_len=max_model_len)

    def with_token_source(self, token_source: str) -> VisionModelBuilder:
        """Hub token: "cache", "none", "env:VAR", "literal:TOKEN" or "path:FILE"."""
        return replace(self, token_source=token_source)

    def with_hf_revision(self, revision: str) -> VisionModelBuilder:
        """Hub branch, tag or commit to load."""
        return replace(self, revision=revision)

    def with_seed(self, seed: int) -> VisionModelBuilder:
        """Seed of every request that gives none."""
        return replace(self, seed=seed)

    def with_media_policy(self, media_policy: MediaPolicy) -> VisionModelBuilder:
        """What image URLs / paths messages may name (default: anything, `MediaPolicy.trusted()`)."""
        return replace(self, media_policy=media_policy)

    def from_uqff(self, path: str | list[str]) -> VisionModelBuilder:
        """Load pre-quantized weights from UQFF file(s) (not available yet)."""
        return replace(self, uqff=path)

    def with_topology(self, path: str) -> VisionModelBuilder:
        """Device-mapping topology file (not available yet)."""
        return replace(self, topology=path)

    def build(self) -> VisionModel:
        """Load the model (errors: `ModelLoadError`, `InvalidRequestError`)."""
        from idefix.api.runner import Runner

        if self.logging_enabled:
            _enable_logging()
        which = VisionPlain(
            self.model_id, dtype=self.dtype, revision=self.revision, from_uqff=self.uqff, topology=self.topology
        )
        runner = Runner(
            which,
            max_seqs=self.max_num_seqs,
            prefix_cache_n=self.prefix_cache_n,
            token_source=self.token_source,
            in_situ_quant=self.isq,
            seed=self.seed,
            max_model_len=self.max_model_len,
            device=self.device,
            media_policy=self.media_policy,
            progress=self.logging_enabled,
        )
        return VisionModel(runner)


class VisionModel:
    """A loaded model (from `VisionModelBuilder.build()`).

    Every method takes messages (`VisionMessages` or an OpenAI-style list) and optional sampling fields
    under their OpenAI names (`max_tokens=64`, `temperature=0.7`, `top_p`, `seed`, `stop`, `n`, `logprobs`,
    ...). Sampling is greedy unless a temperature is given, as with mistralrs's `VisionMessages`.
    Sync and async calls may run concurrently from any threads / event loops: the engine batches them.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        """The underlying `Runner` (for `send_chat_completion_request`)."""

    def send_chat_request(self, messages: Messages, **sampling: Any) -> ChatCompletionResponse:
        """The whole answer."""
        return self.runner._complete(messages, self._params(sampling))

    def stream_chat_request(self, messages: Messages, **sampling: Any) -> Iterator[ChatCompletionChunkResponse]:
        """The answer as chunks while it is generated; errors are raised in the call."""
        return self.runner._stream(messages, self._params(sampling))

    async def send_chat_request_async(self, messages: Messages, **sampling: Any) -> ChatCompletionResponse:
        """The whole answer, awaited; `asyncio.gather` many of them to batch them."""
        return await self.runner._complete_async(messages, self._params(sampling))

    async def stream_chat_request_async(
        self, messages: Messages, **sampling: Any
    ) -> AsyncIterator[ChatCompletionChunkResponse]:
        """`async for chunk in model.stream_chat_request_async(messages)`; errors are raised by the first step."""
        async for chunk in self.runner._stream_async(messages, self._params(sampling)):
            yield chunk

    def close(self) -> None:
        """Stop the engine thread and free the model (see `Runner.close`)."""
        self.runner.close()

    def __enter__(self) -> VisionModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _params(self, sampling: dict[str, Any]) -> SamplingParams:
        return self.runner._sampling({"temperature": 0.0, **sampling})


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (it may be replaced, e.g. by test capture)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _enable_logging() -> None:
    """The "idefix" logger at INFO, to stderr unless the program already gave it a handler."""
    logger = logging.getLogger("idefix")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
