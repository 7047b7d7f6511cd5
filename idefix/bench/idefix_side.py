"""idefix measured the way a user runs it: `load()`, then requests through the continuous-batching Engine.

Every method returns seconds (or a rate) of one run; `idefix.bench.run` repeats them. Each run uses
inputs no earlier run used (see `workload`), so the prefix and image caches never answer.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from idefix.bench.options import BenchOptions
from idefix.bench.roofline import DecodeCost
from idefix.bench.stats import timed
from idefix.bench.workload import image_messages, random_image, text_ids
from idefix.config import EngineConfig
from idefix.engine.engine import Engine
from idefix.loading import LoadedModel, load
from idefix.request import PreparedPrompt
from idefix.sampling import SamplingParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class IdefixSide:
    """One idefix configuration: the compute dtype, and a GGML type when quantized in situ."""

    name = "idefix"

    def __init__(self, path: Path, options: BenchOptions, isq: str | None = None) -> None:
        self.path, self.options, self.isq = path, options, isq
        self.label = "idefix" if isq is None else f"idefix {isq}"
        self.device = torch.device(options.device)
        self._loaded: LoadedModel | None = None
        self._single: Engine | None = None
        self._batch: Engine | None = None

    @property
    def loaded(self) -> LoadedModel:
        assert self._loaded is not None, "load() first"
        return self._loaded

    def load(self) -> float:
        extra = {} if self.isq is None else {"isq": self.isq}
        start = time.perf_counter()
        self._loaded = load(
            str(self.path), dtype=self.options.dtype, device=self.options.device, progress=False, **extra
        )
        return time.perf_counter() - start

    def close(self) -> None:
        self._loaded = self._single = self._batch = None

    def decode_cost(self) -> DecodeCost:
        model = self.loaded.model
        return DecodeCost.of(model, model.config, model.dtype)

    def image_prompt(self) -> tuple[int, int]:
        """(tiles, prompt tokens) of the TTFT prompt."""
        image = random_image(self.options.image_size, 0)
        prompt = self.loaded.processor(image_messages(image), [image])
        assert prompt.images is not None
        return sum(prompt.images.tiles_per_image), len(prompt.token_ids)

    # ---------------------------------------------------------------------------------------- measurements

    def encode(self, run: int) -> float:
        """Seconds to encode `tiles` full tiles (vision tower + connector) in one call."""
        side = self.loaded.model.config.vision.image_size
        generator = torch.Generator().manual_seed(run)
        pixels = torch.randn(self.options.tiles, 3, side, side, generator=generator).to(self.device)
        mask = torch.ones(self.options.tiles, side, side, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            return timed(lambda: self._sync(self.loaded.model.encode_images(pixels, mask)))

    def prefill(self, run: int) -> float:
        """Seconds from adding a text prompt of prefill_tokens tokens to its first token."""
        engine = self._single_engine()
        prompt = engine.text_prompt(text_ids(engine.tokenizer, self.options.prefill_tokens, 1000 + run))
        return timed(lambda: self._finish(engine, prompt))

    def ttft(self, run: int) -> float:
        """Seconds from a one-image chat request (image preprocessing included) to its first token."""
        engine = self._single_engine()
        messages = image_messages(random_image(self.options.image_size, 2000 + run))
        return timed(lambda: self._finish(engine, engine.prepare(messages)))

    def decode(self, batch: int, run: int) -> float:
        """Aggregate decode tokens/s of `batch` concurrent requests, over the steps where all of them decode
        (their prompts are prefilled first; the steps that include prefill work are left out)."""
        engine = self._batch_engine()
        tokens = self.options.decode_tokens
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        for row in range(batch):
            ids = text_ids(engine.tokenizer, self.options.decode_prompt_tokens, 100_000 * batch + 1000 * run + row)
            engine.add(engine.text_prompt(ids), params)
        started: set[str] = set()
        count, seconds = 0, 0.0
        while engine.has_unfinished():
            decoding = len(started) == batch
            start = time.perf_counter()
            outputs = engine.step()
            if decoding:
                seconds += time.perf_counter() - start
                count += sum(len(out.token_ids) for out in outputs)
            started.update(out.request_id for out in outputs)
        if count == 0:
            raise RuntimeError(f"no step decoded all {batch} requests together; ask for more --decode-tokens")
        return count / seconds

    # ---------------------------------------------------------------------------------------- engines

    def _single_engine(self) -> Engine:
        """One request at a time, context for the longest single-request prompt."""
        if self._single is None:
            longest = max(self.options.prefill_tokens, self.image_prompt()[1]) + 2
            config = EngineConfig(max_num_seqs=1, max_model_len=longest, cache_slots=0, max_waiting=1)
            self._single = Engine(self.loaded, config)
        return self._single

    def _batch_engine(self) -> Engine:
        if self._batch is None:
            batch = max(self.options.concurrency)
            context = self.options.decode_context + 1
            config = EngineConfig(max_num_seqs=batch, max_model_len=context, cache_slots=0, max_waiting=batch)
            self._batch = Engine(self.loaded, config)
        return self._batch

    def _finish(self, engine: Engine, prompt: PreparedPrompt) -> None:
        engine.add(prompt, SamplingParams(temperature=0.0, max_tokens=1))
        while engine.has_unfinished():
            engine.step()

    def _sync(self, result: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result
