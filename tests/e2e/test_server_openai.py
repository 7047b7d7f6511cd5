"""The OpenAI-compatible server through the official `openai` client (sync and async) and raw HTTP.

The small random checkpoint answers with random tokens, so these tests check the protocol; the answers themselves
are checked on the shipped demo model (skipped until it exists).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from idefix.config import EngineConfig
from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load
from idefix.media import MediaPolicy
from idefix.sampling import SamplingParams
from tests.e2e.conftest import API_KEY, DEMO_IMAGES, DEMO_MODEL, Server, needs_demo_model, open_flags, start_server

STAR = DEMO_IMAGES / "star.png"


def star_base64() -> str:
    return base64.b64encode(STAR.read_bytes()).decode()


def ask(url: str, text: str = "What is shown in this image?") -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def seed_example(base_url: str, image_url: str) -> None:
    """The seed's example as written, except for the server address and the image URL; checks the answer's form."""
    client = OpenAI(api_key="foobar", base_url=base_url)
    completion = client.chat.completions.create(
        model="default",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {
                        "type": "text",
                        "text": "What is shown in this image? Write a detailed response analyzing the scene.",
                    },
                ],
            },
        ],
        max_tokens=256,
        frequency_penalty=1.0,
        top_p=0.1,
        temperature=0,
    )
    resp = completion.choices[0].message.content
    assert isinstance(resp, str) and resp
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 20 and 1 <= usage.completion_tokens <= 256
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_seed_example_with_an_image_url(open_server: Server, image_server: str) -> None:
    seed_example(open_server.base_url, f"{image_server}/star.png")


def test_seed_command_with_isq_4(image_server: str, tmp_path: Path) -> None:
    # `idefix --port 1234 --isq 4 vision-plain -m MODEL`: the seed's flags (port 0 here), Q4K in situ.
    flags = ["--isq", "4", "--allow-private-media-urls"]
    server = start_server(DEMO_MODEL, flags, tmp_path, API_KEY)
    try:
        # Rows whose width is not a multiple of 256 fall back to Q4_1 (the demo model's 128-wide vision tower).
        assert re.search(r"quantization  ISQ (Q4_1\+)?Q4_K\n", server.stdout.read_text())
        seed_example(server.base_url, f"{image_server}/star.png")
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("form", ["data_uri", "bare_base64", "local_path", "file_url"])
def test_image_forms_give_the_same_answer_as_the_url(open_server: Server, image_server: str, form: str) -> None:
    client = OpenAI(api_key=API_KEY, base_url=open_server.base_url)
    source = {
        "data_uri": f"data:image/png;base64,{star_base64()}",
        "bare_base64": star_base64(),
        "local_path": str(STAR),
        "file_url": STAR.as_uri(),
    }[form]

    def answer(url: str) -> str | None:
        done = client.chat.completions.create(model="default", messages=ask(url), max_tokens=6, temperature=0)
        return done.choices[0].message.content

    assert answer(source) == answer(f"{image_server}/star.png")


def test_async_client_streams_role_content_finish_and_usage(open_server: Server, image_server: str) -> None:
    async def run() -> tuple[list, str]:
        client = AsyncOpenAI(api_key=API_KEY, base_url=open_server.base_url)
        messages = ask(f"{image_server}/shapes.png", "How many circles are there?")
        stream = await client.chat.completions.create(
            model="default", messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
        await client.close()
        return chunks, whole.choices[0].message.content or ""

    chunks, whole = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole  # streaming and not streaming give the same greedy answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 8
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_and_usage_fields(open_server: Server) -> None:
    body = {
        "model": "default", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    with httpx.stream("POST", f"{open_server.url}/v1/chat/completions", json=body, headers=open_server.headers()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    for key in ("avg_tok_per_sec", "avg_prompt_tok_per_sec", "avg_compl_tok_per_sec", "total_time_sec",
                "total_prompt_time_sec", "total_completion_time_sec"):  # fmt: skip
        assert usage[key] >= 0.0
    assert usage["total_time_sec"] == pytest.approx(usage["total_prompt_time_sec"] + usage["total_completion_time_sec"])


MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "{server}/shapes.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "{star}"}},
        {"type": "text", "text": "Compare them."},
    ]},
    {"role": "assistant", "content": "They differ."},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "{server}/crosses.png"}},
        {"type": "text", "text": "And this one?"},
    ]},
]  # fmt: skip


def multi_turn(image_server: str) -> list[dict]:
    text = json.dumps(MULTI_TURN).replace("{server}", image_server)
    return json.loads(text.replace("{star}", f"data:image/png;base64,{star_base64()}"))


def test_several_images_across_turns_with_logprobs(open_server: Server, image_server: str) -> None:
    client = OpenAI(api_key=API_KEY, base_url=open_server.base_url, timeout=30)
    done = client.chat.completions.create(
        model="default", messages=multi_turn(image_server), max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = done.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert 1 <= len(choice.logprobs.content) <= 5
    for item in choice.logprobs.content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0.0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    assert done.usage is not None and done.usage.prompt_tokens > 100  # three images' tiles are in the prompt


def test_n_seeded_choices_are_reproducible_and_stream_alike(open_server: Server) -> None:
    client = OpenAI(api_key=API_KEY, base_url=open_server.base_url, timeout=30, max_retries=0)
    fields: dict = {"model": "default", "messages": [{"role": "user", "content": "Tell me something."}]}
    fields.update(max_tokens=5, temperature=0.8, seed=7, n=3)

    def choices() -> list[str | None]:
        done = client.chat.completions.create(**fields)
        assert [c.index for c in done.choices] == [0, 1, 2]
        return [c.message.content for c in done.choices]

    first = choices()
    assert choices() == first
    streamed = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(**fields, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == first and finished == {0, 1, 2}


def test_models_route_and_model_names(open_server: Server) -> None:
    client = OpenAI(api_key=API_KEY, base_url=open_server.base_url, max_retries=0)
    served = [model.id for model in client.models.list()]
    assert len(served) == 1
    message = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model=served[0], messages=message, max_tokens=1).choices  # type: ignore
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=message, max_tokens=1)  # type: ignore[arg-type]
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"


def test_client_errors_reach_the_official_client_as_400(open_server: Server) -> None:
    client = OpenAI(api_key=API_KEY, base_url=open_server.base_url, max_retries=2)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], top_p=2)
    assert caught.value.status_code == 400 and caught.value.param == "top_p"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="wrong", base_url=open_server.base_url).models.list()


def test_metrics_count_requests_and_tokens(open_server: Server) -> None:
    before = open_server.metrics()
    body = {"model": "default", "messages": [{"role": "user", "content": "count"}], "max_tokens": 3}
    r = httpx.post(f"{open_server.url}/v1/chat/completions", json=body, headers=open_server.headers())
    assert r.status_code == 200
    after = open_server.metrics()
    key = 'idefix_http_requests_total{route="/v1/chat/completions",status="200"}'
    assert after[key] == before.get(key, 0.0) + 1
    assert after["idefix_completion_tokens_total"] >= before.get("idefix_completion_tokens_total", 0) + 1
    assert after["idefix_time_to_first_token_seconds_count"] > before.get("idefix_time_to_first_token_seconds_count", 0)
    assert after["idefix_kv_slots_in_use"] == 0 and after["idefix_num_requests_waiting"] == 0
    assert "idefix_image_cache_hit_rate" in after


def test_cors_is_off_unless_asked(open_server: Server) -> None:
    r = httpx.options(
        f"{open_server.url}/v1/models",
        headers={"Origin": "https://example.com", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------------------------------- demo model answers

DEMO_CASES = [
    ("shapes.png", "How many circles are there?", "3"),
    ("shapes.png", "What colour is the square?", "green"),
    ("star.png", "Describe the image.", "An orange star on a white background."),
    ("wide.png", "Where is the red triangle?", "top right"),
    ("crosses.png", "How many crosses are there?", "3"),
]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(DEMO_MODEL, open_flags(DEMO_IMAGES), tmp_path_factory.mktemp("demo"), API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_engine() -> Engine:
    return Engine(load(str(DEMO_MODEL), progress=False), EngineConfig(max_num_seqs=1, cache_slots=0))


@needs_demo_model()
@pytest.mark.parametrize(("image", "question", "answer"), DEMO_CASES)
def test_demo_model_answers_by_url_base64_and_path(
    demo_server: Server, demo_engine: Engine, image_server: str, image: str, question: str, answer: str
) -> None:
    client = OpenAI(api_key=API_KEY, base_url=demo_server.base_url)
    path: Path = DEMO_IMAGES / image
    data = base64.b64encode(path.read_bytes()).decode()
    greedy = SamplingParams(temperature=0, max_tokens=32)
    alone = generate(demo_engine, ask(str(path), question), greedy, MediaPolicy.trusted()).text
    for url in (f"{image_server}/{image}", f"data:image/png;base64,{data}", str(path)):
        messages = ask(url, question)
        done = client.chat.completions.create(model="default", messages=messages, max_tokens=32, temperature=0)
        assert done.choices[0].message.content == alone  # the server answers what the engine answers
    # Issue 6 asks for the right answers; the shipped model gives all five, so they are asserted outright
    # (not through tests/demo_gate.py, which excuses wrong answers while the model is below issue 4's targets).
    assert alone.strip() == answer
