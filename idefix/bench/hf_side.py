"""The reference a Python user would otherwise pick: transformers' Idefics3ForConditionalGeneration.generate
with its own processor, on the same checkpoint, dtype, device and threads. transformers is imported here only,
when the comparison runs.

Batched decode uses one `generate` call over `batch` prompts of equal length (so no padding is needed) and
times the steps after the first token with a streamer; the prefill of the batch is left out, as for idefix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from idefix.bench.options import BenchOptions
from idefix.bench.roofline import DecodeCost
from idefix.bench.stats import timed
from idefix.bench.workload import image_messages, random_image, text_ids
from idefix.model.config import Idefics3Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class StepClock:
    """A transformers streamer that only notes when each batch of tokens arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersSide:
    name = "transformers"
    label = "transformers"

    def __init__(self, path: Path, options: BenchOptions) -> None:
        self.path, self.options = path, options
        self.device = torch.device(options.device)
        self.dtype = DTYPES[options.dtype]
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> float:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        start = time.perf_counter()
        model: Any = transformers.Idefics3ForConditionalGeneration.from_pretrained(self.path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(self.path)
        return time.perf_counter() - start

    def close(self) -> None:
        self.model = self.processor = None

    def decode_cost(self) -> DecodeCost:
        return DecodeCost.of(self.model, Idefics3Config.from_dir(self.path), self.dtype)

    # ---------------------------------------------------------------------------------------- measurements

    def encode(self, run: int) -> float:
        side = self.model.config.vision_config.image_size
        generator = torch.Generator().manual_seed(run)
        pixels = torch.randn(1, self.options.tiles, 3, side, side, generator=generator).to(self.device)
        mask = torch.ones(1, self.options.tiles, side, side, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            return timed(lambda: self._sync(self.model.get_image_features(pixels, mask).pooler_output))

    def prefill(self, run: int) -> float:
        ids = text_ids(self.processor.tokenizer, self.options.prefill_tokens, 1000 + run)
        input_ids = torch.tensor([ids], device=self.device)
        return timed(lambda: self._generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)))

    def ttft(self, run: int) -> float:
        image = random_image(self.options.image_size, 2000 + run)

        def first_token() -> None:
            text = self.processor.apply_chat_template(image_messages(image), add_generation_prompt=True)
            inputs = self.processor(text=text, images=[[image]], return_tensors="pt").to(self.device)
            self._generate(**inputs)

        return timed(first_token)

    def decode(self, batch: int, run: int) -> float:
        tokens = self.options.decode_tokens
        rows = [
            text_ids(self.processor.tokenizer, self.options.decode_prompt_tokens, 100_000 * batch + 1000 * run + row)
            for row in range(batch)
        ]
        input_ids = torch.tensor(rows, device=self.device)
        clock = StepClock()
        self._generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            streamer=clock,
        )
        # the last `tokens` notes are the new tokens; the first of them ends the prefill
        return batch * (tokens - 1) / (clock.times[-1] - clock.times[-tokens])

    def _generate(self, **kwargs: Any) -> Any:
        kwargs.setdefault("max_new_tokens", 1)
        with torch.inference_mode():
            out = self.model.generate(**kwargs, do_sample=False)
        return self._sync(out)

    def _sync(self, result: Any) -> Any:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result
