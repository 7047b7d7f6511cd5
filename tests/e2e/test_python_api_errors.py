"""The Python API's failure paths end to end: documented exception classes for bad model ids, images,
parameters and over-long prompts; the restrictive media policy; leaving a stream early; `close()`."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import idefix
from idefix import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ContextLengthError,
    EngineDeadError,
    IdefixError,
    ImageError,
    InvalidRequestError,
    MediaPolicy,
    ModelLoadError,
    Runner,
    Which,
)

IMAGES = Path(__file__).resolve().parents[2] / "idefix" / "demo" / "images"


@pytest.fixture(scope="module")
def runner(small_checkpoint: Path) -> Iterator[Runner]:
    with Runner(Which.VisionPlain(str(small_checkpoint)), max_seqs=4, progress=False) as runner:
        yield runner


def _ask(image: Any) -> list[dict[str, Any]]:
    if isinstance(image, Image.Image):
        part = {"type": "image", "image": image}
    else:
        part = {"type": "image_url", "image_url": {"url": image}}
    return [{"role": "user", "content": [part, {"type": "text", "text": "What is in this image?"}]}]


def _random_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40 + 10 * seed, 70, 3), dtype=np.uint8))


def test_leaving_a_stream_early_aborts_it(runner: Runner) -> None:
    request = ChatCompletionRequest(_ask(_random_image(4)), max_tokens=500, temperature=0, ignore_eos=True, stream=True)
    for _ in runner.send_chat_completion_request(request):  # type: ignore[union-attr]
        break
    engine = runner._live().engine
    deadline = time.monotonic() + 5
    while engine.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.requests and engine.pool.num_running == 0


def test_errors_raise_the_documented_classes(runner: Runner, image_url: Callable[[str], str], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="missing"):
        Runner(Which.VisionPlain(str(tmp_path / "missing")), progress=False)
    (tmp_path / "notes.png").write_text("not an image")
    for source in (image_url("nothing-here.png"), str(tmp_path / "notes.png"), str(tmp_path / "absent.png")):
        with pytest.raises(ImageError):
            runner.send_chat_completion_request(ChatCompletionRequest(_ask(source), max_tokens=4))
    for fields in ({"temperature": 5.0}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2, "n_choices": 3}):
        for stream in (False, True):  # a stream raises in the call, not while iterating
            with pytest.raises(InvalidRequestError, match=next(iter(fields))):
                runner.send_chat_completion_request(
                    ChatCompletionRequest(_ask(_random_image(5)), **fields, stream=stream)
                )
    with pytest.raises(ContextLengthError, match="context"):
        runner.send_chat_completion_request(ChatCompletionRequest(_ask(_random_image(5)), max_tokens=10**6))
    with pytest.raises(InvalidRequestError, match="role"):
        runner.send_chat_completion_request(ChatCompletionRequest([{"role": "robot", "content": "hi"}]))
    assert issubclass(ContextLengthError, InvalidRequestError) and issubclass(ImageError, IdefixError)
    assert idefix.ModelLoadError is ModelLoadError


def test_media_policy_restricts_untrusted_input(small_checkpoint: Path, image_url: Callable[[str], str]) -> None:
    with Runner(
        Which.VisionPlain(str(small_checkpoint)), max_seqs=1, media_policy=MediaPolicy(), progress=False
    ) as strict:
        for source in (image_url("star.png"), str(IMAGES / "star.png")):
            with pytest.raises(ImageError):
                strict.send_chat_completion_request(ChatCompletionRequest(_ask(source), max_tokens=2))
        ok = strict.send_chat_completion_request(
            ChatCompletionRequest(_ask(Image.open(IMAGES / "star.png")), max_tokens=2)
        )
        assert isinstance(ok, ChatCompletionResponse)


def test_close_stops_the_thread_and_frees_the_model(small_checkpoint: Path) -> None:
    runner = Runner(Which.VisionPlain(str(small_checkpoint)), max_seqs=2, progress=False)
    engine = runner._live()
    model = weakref.ref(engine.engine.loaded.model)
    thread = engine._thread
    assert thread.is_alive()
    res = runner.send_chat_completion_request(ChatCompletionRequest([{"role": "user", "content": "Hi"}], max_tokens=2))
    del engine, res
    runner.close()
    runner.close()  # idempotent
    assert not thread.is_alive() and runner.closed
    assert model() is None
    with pytest.raises(EngineDeadError, match="closed"):
        runner.send_chat_completion_request(ChatCompletionRequest([{"role": "user", "content": "Hi"}]))


def test_a_forgotten_runner_stops_its_thread(small_checkpoint: Path) -> None:
    runner = Runner(Which.VisionPlain(str(small_checkpoint)), max_seqs=1, progress=False)
    thread = runner._live()._thread
    del runner
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_a_templated_prompt_string(runner: Runner) -> None:
    messages = [{"role": "user", "content": "Say something."}]
    text = runner._live().engine.loaded.processor.template.render(messages, add_generation_prompt=True)
    as_messages, as_text = (
        runner.send_chat_completion_request(ChatCompletionRequest(m, max_tokens=6, temperature=0))
        for m in (messages, text)
    )
    assert isinstance(as_messages, ChatCompletionResponse) and isinstance(as_text, ChatCompletionResponse)
    assert as_text.choices[0].message.content == as_messages.choices[0].message.content
    assert as_text.usage.prompt_tokens == as_messages.usage.prompt_tokens
    assert runner.max_sequence_length() == 4096
    for bad, named in (("  ", "empty"), (text + "<image>", "<image>")):
        with pytest.raises(InvalidRequestError, match=named):
            runner.send_chat_completion_request(ChatCompletionRequest(bad, max_tokens=2))
