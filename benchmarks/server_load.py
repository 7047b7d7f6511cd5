"""Load on the OpenAI-compatible server: requests/s and time to first token at several concurrency levels.

    python benchmarks/server_load.py                        # the demo model, 1 / 8 / 32 clients
    python benchmarks/server_load.py -m MODEL -c 1 4 16 --max-tokens 64 --requests 64
    python benchmarks/server_load.py --url http://127.0.0.1:1234   # a server that is already running

Starts `python -m idefix --port 0 ... vision-plain -m MODEL` on 127.0.0.1 unless --url is given. Each request is
a streaming chat completion with one image (a demo image with one pixel changed, so neither the image cache nor the
prefix cache can answer it) and a question, `max_tokens` tokens with EOS ignored (every request does the same
work). Each client sends its requests one after the other; TTFT is measured by the client, from sending the
request to the first content token. Prints a markdown table and, with --json, the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "idefix" / "demo" / "images"


def distinct_image(rng: random.Random, name: str) -> str:
    image = Image.open(IMAGES / name).convert("RGB")
    image.putpixel((rng.randrange(image.width), rng.randrange(image.height)), tuple(rng.randrange(256) for _ in "rgb"))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def body(rng: random.Random, max_tokens: int) -> dict:
    name = rng.choice(["star.png", "shapes.png", "wide.png", "crosses.png"])
    content = [
        {"type": "image_url", "image_url": {"url": distinct_image(rng, name)}},
        {"type": "text", "text": rng.choice(["Describe the image.", "How many circles are there?"])},
    ]
    return {
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[float, int]:
    """(seconds to the first content token, completion tokens) of one streaming request."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def level(base: str, clients: int, requests: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    payloads = [body(rng, max_tokens) for _ in range(requests)]
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    results: list[tuple[float, int]] = []
    url = f"{base}/v1/chat/completions"

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one(client, url, queue.get_nowait()))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, url, body(random.Random(-1), 2))  # warm-up, not counted
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts = sorted(ttft for ttft, _ in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tok_per_s": sum(tokens for _, tokens in results) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    }


def start_server(model: str, max_seqs: int) -> tuple[subprocess.Popen[bytes], str]:
    command = [sys.executable, "-m", "idefix", "--port", "0", "--max-seqs", str(max_seqs), "vision-plain", "-m", model]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    assert process.stdout is not None
    for raw in process.stdout:
        if match := re.search(r"http://127\.0\.0\.1:(\d+)/v1", raw.decode()):
            return process, f"http://127.0.0.1:{match.group(1)}"
    raise SystemExit(f"the server did not start (exit {process.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=str(REPO / "idefix" / "demo" / "model"))
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("-c", "--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-seqs", type=int, default=32, help="the started server's --max-seqs (default 32)")
    parser.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = parser.parse_args()
    process, base = (None, args.url) if args.url else start_server(args.model, args.max_seqs)
    try:
        rows = [asyncio.run(level(base, c, max(args.requests, c), args.max_tokens, seed=c)) for c in args.clients]
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print(f"\nmodel {args.model}, {args.max_tokens} tokens per answer, one distinct image per request\n")
    print("| clients | requests | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['output_tok_per_s']:.0f} "
            f"| {1000 * r['ttft_p50_s']:.0f} | {1000 * r['ttft_p99_s']:.0f} |"
        )
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
