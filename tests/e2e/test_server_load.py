"""Load on one server: many concurrent streams give exactly the answers they give alone, and clients that go away
free everything they held (read back from /metrics)."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
from openai import AsyncOpenAI

from tests.e2e.conftest import API_KEY, DEMO_IMAGES, Server

IMAGES = ["star.png", "shapes.png", "wide.png", "crosses.png"]


def request(i: int, image_server: str) -> dict:
    """32 different requests: text only, an image by URL, an image inline; different questions and lengths."""
    text = f"Question {i}: " + "what is there? " * (1 + i % 3)
    image = IMAGES[i % len(IMAGES)]
    if i % 3 == 0:
        content: str | list[dict] = text
    elif i % 3 == 1:
        url = f"{image_server}/{image}"
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    else:
        data = base64.b64encode((DEMO_IMAGES / image).read_bytes()).decode()
        url = f"data:image/png;base64,{data}"
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4 + i % 9, "temperature": 0}


async def stream_text(client: AsyncOpenAI, body: dict) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(model="default", stream=True, **body)
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_64_concurrent_streams_equal_the_same_requests_alone(open_server: Server, image_server: str) -> None:
    bodies = [request(i % 32, image_server) for i in range(64)]

    async def run() -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
        client = AsyncOpenAI(api_key=API_KEY, base_url=open_server.base_url, max_retries=0, timeout=120)
        alone = [await stream_text(client, body) for body in bodies[:32]]
        together = await asyncio.gather(*(stream_text(client, body) for body in bodies))
        await client.close()
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert all(finish in ("stop", "length") for _, finish in together)
    assert together == alone + alone
    metrics = open_server.metrics()
    assert metrics["idefix_kv_slots_in_use"] == 0 and metrics["idefix_num_requests_unfinished"] == 0


def wait_idle(server: Server, limit: float = 10.0) -> tuple[float, dict[str, float]]:
    """Seconds until no request runs or waits and no KV slot is in use, and the metrics then."""
    start = time.monotonic()
    while True:
        metrics = server.metrics()
        busy = ("idefix_num_requests_running", "idefix_num_requests_waiting", "idefix_kv_slots_in_use")
        if not any(metrics[name] for name in busy) and not metrics["idefix_num_requests_unfinished"]:
            return time.monotonic() - start, metrics
        if time.monotonic() - start > limit:
            return limit, metrics
        time.sleep(0.01)


def test_16_clients_leaving_mid_stream_free_everything(open_server: Server) -> None:
    before = open_server.metrics().get("idefix_requests_aborted_total", 0.0)
    body = {
        "messages": [{"role": "user", "content": "Keep talking."}],
        "max_tokens": 500,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }

    async def leave_after_two_chunks(client: AsyncOpenAI) -> int:
        stream = await client.chat.completions.create(model="default", stream=True, **body)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.close()
        return seen

    async def run() -> list[int]:
        client = AsyncOpenAI(api_key=API_KEY, base_url=open_server.base_url, max_retries=0, timeout=60)
        seen = await asyncio.gather(*(leave_after_two_chunks(client) for _ in range(16)))
        await client.close()
        return list(seen)

    assert asyncio.run(run()) == [2] * 16
    seconds, metrics = wait_idle(open_server)
    assert seconds < 5.0, metrics
    assert metrics["idefix_requests_aborted_total"] == before + 16
    assert metrics["idefix_completion_tokens_total"] > 0
    assert open_server.healthy()


def test_a_non_streaming_client_that_gives_up_aborts_its_request(open_server: Server) -> None:
    before = open_server.metrics().get("idefix_requests_aborted_total", 0.0)
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Keep talking."}],
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    try:
        httpx.post(f"{open_server.url}/v1/chat/completions", json=body, headers=open_server.headers(), timeout=0.5)
        raise AssertionError("3000 tokens took less than 0.5 s")
    except httpx.TimeoutException:
        pass
    seconds, metrics = wait_idle(open_server)
    assert seconds < 5.0, metrics
    assert metrics["idefix_requests_aborted_total"] == before + 1
