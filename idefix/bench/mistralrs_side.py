"""mistral.rs (the `mistralrs` PyPI package, optional) on the same checkpoint, dtype and threads.

Made like for like where mistral.rs allows it (see shared FACTS):
- its KV cache is f16 on the CPU by default; MISTRALRS_CPU_KV_F32=1 forces f32 for fp32 runs (bf16 runs keep
  f16: the same bytes as idefix's bf16 cache);
- every request has its own text / image, and its prefix cache is off, so neither its prefix cache nor its
  image-feature cache answers;
- its chat path drops the text of a text-only turn, so it is given the SmolVLM template plus one branch for a
  plain-string content (image turns render exactly as with the checkpoint's template);
- rayon's thread count follows --threads (RAYON_NUM_THREADS, unless already set).
Its vision tower cannot be called on its own, so it has no encode figure. Timings are wall-clock, taken here:
TTFT and prefill around a max_tokens=1 request; decode from streamed tokens, over the time after every
request of the batch has its first token, as for idefix.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from idefix.bench.options import BenchOptions
from idefix.bench.roofline import DecodeCost
from idefix.bench.stats import timed
from idefix.bench.workload import random_image, text_ids
from idefix.demo.vocab import SMOLVLM_CHAT_TEMPLATE
from idefix.processing.tokenizer import Tokenizer

# The SmolVLM template with a branch for string content (what mistral.rs makes of a text-only turn).
TEMPLATE = SMOLVLM_CHAT_TEMPLATE.replace(
    "{% if message['content'][0]['type'] == 'image' %}",
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}",
).replace("{% endfor %}<end_of_utterance>", "{% endfor %}{% endif %}<end_of_utterance>")


def missing_reason(options: BenchOptions) -> str | None:
    """Why mistral.rs cannot be measured here, or None."""
    if importlib.util.find_spec("mistralrs") is None:
        return "the mistralrs package is not installed (pip install mistralrs)"
    if options.device != "cpu":
        return "the mistralrs PyPI package runs on the CPU; compare on --device cpu"
    return None


class MistralrsSide:
    name = "mistralrs"
    label = "mistralrs"

    def __init__(self, path: Path, options: BenchOptions) -> None:
        self.path, self.options = path, options
        self.tokenizer = Tokenizer.from_dir(path)
        self.runner: Any = None
        self._template = tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False)  # noqa: SIM115
        self._template.write(TEMPLATE)
        self._template.close()

    def load(self) -> float:
        if self.options.dtype == "fp32":
            os.environ["MISTRALRS_CPU_KV_F32"] = "1"
        if self.options.threads is not None:
            os.environ.setdefault("RAYON_NUM_THREADS", str(self.options.threads))
        os.environ.setdefault("RUST_LOG", "error")  # its INFO / WARN lines go to stdout, into the table
        import mistralrs

        dtype = mistralrs.ModelDType.F32 if self.options.dtype == "fp32" else mistralrs.ModelDType.BF16
        start = time.perf_counter()
        which: Any = mistralrs.Which.MultimodalPlain(
            model_id=str(self.path), arch=mistralrs.MultimodalArchitecture.Idefics3, dtype=dtype
        )
        self.runner = mistralrs.Runner(
            which=which,
            max_seqs=max(self.options.concurrency),
            prefix_cache_n=0,
            jinja_explicit=self._template.name,
        )
        return time.perf_counter() - start

    def close(self) -> None:
        self.runner = None
        Path(self._template.name).unlink(missing_ok=True)

    def decode_cost(self) -> DecodeCost | None:
        return None  # same checkpoint and dtype: idefix's figure is used

    def encode(self, run: int) -> float:
        raise NotImplementedError("mistral.rs does not expose its vision tower")

    def prefill(self, run: int) -> float:
        import mistralrs

        prompt = self._text(self.options.prefill_tokens, 1000 + run)
        request = mistralrs.CompletionRequest(prompt=prompt, model="default", max_tokens=1, temperature=0.0)
        return timed(lambda: self.runner.send_completion_request(request))

    def ttft(self, run: int) -> float:
        import mistralrs

        buffer = io.BytesIO()
        random_image(self.options.image_size, 2000 + run).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content: Any = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe the image."},
        ]
        request = mistralrs.ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="default", max_tokens=1, temperature=0.0
        )
        return timed(lambda: self.runner.send_chat_completion_request(request))

    def decode(self, batch: int, run: int) -> float:
        import mistralrs

        # The Runner is not re-entrant ("Already borrowed" from threads): open every stream from this thread,
        # then read them round-robin; the engine generates them together meanwhile.
        streams = []
        for row in range(batch):
            prompt = self._text(self.options.decode_prompt_tokens, 100_000 * batch + 1000 * run + row)
            request = mistralrs.ChatCompletionRequest(
                messages=[{"role": "user", "content": prompt}],
                model="default",
                max_tokens=self.options.decode_tokens,
                temperature=0.0,
                ignore_eos=True,
                stream=True,
            )
            streams.append(iter(self.runner.send_chat_completion_request(request)))
        stamps: list[list[float]] = [[] for _ in streams]
        live = set(range(batch))
        while live:
            for row in sorted(live):
                try:
                    next(streams[row])
                    stamps[row].append(time.perf_counter())
                except StopIteration:
                    live.discard(row)
        if any(len(times) < 2 for times in stamps):
            raise RuntimeError("mistral.rs streamed fewer tokens than asked for")
        all_started = max(times[0] for times in stamps)
        count = sum(1 for times in stamps for t in times if t > all_started)
        return count / (max(times[-1] for times in stamps) - all_started)

    def _text(self, tokens: int, seed: int) -> str:
        return self.tokenizer.decode(text_ids(self.tokenizer, tokens, seed))
