"""Bad input never hurts the server: each case gets the right status in OpenAI's error shape, nothing is streamed
before the error, a client mistake is never a 5xx (the official client retries those), and /health stays fine.

Two servers: the shared permissive one (private image URLs allowed, so the loopback image server can play a
broken, slow or endless image host; API key `foobar`) and a strict one started here with the default media policy,
one allowed local folder, 2 images per request, a 1 MiB body cap, a 512-token context and a tiny queue.
"""

from __future__ import annotations

import base64
import json
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import API_KEY, Server, png, start_server

Body = dict[str, Any] | bytes


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """allowed/ok.png, allowed/link.png -> ../secret.png (outside the allowed folder)."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png((16, 16)))
    (root / "secret.png").write_bytes(png((16, 16), (0, 0, 255)))
    (allowed / "link.png").symlink_to(root / "secret.png")
    return root, allowed


@pytest.fixture(scope="module")
def strict_server(
    small_checkpoint: Path, media_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    flags = ["--allowed-local-media-path", str(media_dirs[1]), "--max-images-per-request", "2"]
    flags += ["--max-body-bytes", str(2**20), "--media-timeout", "2", "--max-seqs", "2", "--max-waiting", "1"]
    folder = tmp_path_factory.mktemp("strict")
    server = start_server(small_checkpoint, flags, folder, model_flags=("--max-seq-len", "512"))
    yield server
    server.stop()


def chat(content: Any = "Hello", **fields: Any) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def image(url: str, text: str = "What is it?") -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def post(server: Server, body: Body, headers: dict[str, str] | None = None) -> httpx.Response:
    headers = {**server.headers(), **(headers or {})}
    if isinstance(body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=30)
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")  # never a started event stream
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


# (id, which server, body builder given the image server URL and the media folders, status, code)
Case = tuple[str, str, Callable[[str, tuple[Path, Path]], Body], int, str | None]
LONG_TEXT = "word " * 2000
CASES: list[Case] = [
    # request shape
    ("malformed_json", "strict", lambda s, d: b'{"model": "default", "messages": [', 400, "invalid_json"),
    ("body_not_an_object", "strict", lambda s, d: b"[1, 2, 3]", 400, "invalid_value"),
    ("empty_body", "strict", lambda s, d: b"", 400, "invalid_json"),
    ("wrong_type_temperature", "strict", lambda s, d: chat(temperature="hot"), 400, "invalid_value"),
    ("wrong_type_messages", "strict", lambda s, d: {"model": "default", "messages": "hi"}, 400, None),
    ("missing_messages", "strict", lambda s, d: {"model": "default"}, 400, None),
    ("empty_messages", "strict", lambda s, d: {"model": "default", "messages": []}, 400, None),
    ("unknown_role", "strict", lambda s, d: {"model": "default", "messages": [{"role": "robot", "content": "x"}]},
     400, None),
    ("unknown_part_type", "strict", lambda s, d: chat([{"type": "input_audio", "input_audio": {}}]), 400, None),
    ("image_url_without_url", "strict", lambda s, d: chat([{"type": "image_url", "image_url": {}}]), 400, None),
    ("empty_content", "strict", lambda s, d: chat([]), 400, None),
    ("unknown_model", "strict", lambda s, d: {**chat(), "model": "gpt-4o"}, 404, "model_not_found"),
    ("unknown_field", "strict", lambda s, d: chat(max_token=5), 400, None),
    ("seed_as_string", "strict", lambda s, d: chat(seed="42"), 400, None),
    # sampling values
    ("max_tokens_0", "strict", lambda s, d: chat(max_tokens=0), 400, None),
    ("temperature_negative", "strict", lambda s, d: chat(temperature=-1), 400, None),
    ("top_p_2", "strict", lambda s, d: chat(top_p=2), 400, None),
    ("n_over_limit", "strict", lambda s, d: chat(n=17), 400, None),
    ("top_logprobs_without_logprobs", "strict", lambda s, d: chat(top_logprobs=3), 400, None),
    ("logit_bias_outside_vocab", "strict", lambda s, d: chat(logit_bias={"99999999": 5}), 400, None),
    ("stream_options_without_stream", "strict", lambda s, d: chat(stream_options={"include_usage": True}), 400, None),
    # features we cannot honour
    ("tools", "strict", lambda s, d: chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None),
    ("response_format_json", "strict", lambda s, d: chat(response_format={"type": "json_object"}), 400, None),
    ("audio_output", "strict", lambda s, d: chat(audio={"voice": "alloy", "format": "wav"}), 400, None),
    ("chat_template_in_request", "strict", lambda s, d: chat(chat_template="{{ messages }}"), 400, None),
    ("assistant_tool_calls", "strict", lambda s, d: {"model": "default", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y", "tool_calls": [{"id": "1", "type": "function"}]},
    ]}, 400, None),  # fmt: skip
    # context
    ("prompt_over_context", "strict", lambda s, d: chat(LONG_TEXT), 400, "context_length_exceeded"),
    ("max_tokens_over_context", "strict", lambda s, d: chat(max_tokens=5000), 400, "context_length_exceeded"),
    ("prompt_over_context_streaming", "strict", lambda s, d: chat(LONG_TEXT, stream=True), 400,
     "context_length_exceeded"),
    # image sources refused by policy
    ("file_url", "strict", lambda s, d: chat(image("file:///etc/passwd")), 400, "invalid_image"),
    ("ftp_url", "strict", lambda s, d: chat(image("ftp://127.0.0.1/image.png")), 400, "invalid_image"),
    ("path_outside_allowed_dir", "strict", lambda s, d: chat(image("/etc/hostname")), 400, "invalid_image"),
    ("dotdot_traversal", "strict", lambda s, d: chat(image(f"{d[1]}/../secret.png")), 400, "invalid_image"),
    ("symlink_escape", "strict", lambda s, d: chat(image(f"{d[1]}/link.png")), 400, "invalid_image"),
    ("private_ip_url", "strict", lambda s, d: chat(image(f"{s}/star.png")), 400, "invalid_image"),
    ("private_ip_url_streaming", "strict", lambda s, d: chat(image(f"{s}/star.png"), stream=True), 400,
     "invalid_image"),
    ("decimal_ip", "strict", lambda s, d: chat(image(f"http://2130706433:{_port(s)}/star.png")), 400, "invalid_image"),
    ("octal_ip", "strict", lambda s, d: chat(image(f"http://0177.0.0.1:{_port(s)}/star.png")), 400, "invalid_image"),
    ("ipv6_mapped_ip", "strict", lambda s, d: chat(image(f"http://[::ffff:127.0.0.1]:{_port(s)}/star.png")), 400,
     "invalid_image"),
    ("parser_confusion", "strict", lambda s, d: chat(image(f"http://public.example\\@127.0.0.1:{_port(s)}/star.png")),
     400, "invalid_image"),
    ("name_resolving_to_loopback", "strict", lambda s, d: chat(image(f"http://localhost:{_port(s)}/star.png")), 400,
     "invalid_image"),
    ("redirect_chain_from_loopback", "strict", lambda s, d: chat(image(f"{s}/chain/2")), 400, "invalid_image"),
    ("bad_base64_data_uri", "strict", lambda s, d: chat(image("data:image/png;base64,!!!not*base64!!!")), 400,
     "invalid_image"),
    ("base64_of_non_image", "strict", lambda s, d: chat(image(base64.b64encode(b"hello " * 40).decode())), 400,
     "invalid_image"),
    ("too_many_images", "strict", lambda s, d: chat([*image(f"{d[1]}/ok.png")] * 3), 400, None),
    ("too_many_images_streaming", "strict", lambda s, d: chat([*image(f"{d[1]}/ok.png")] * 3, stream=True), 400,
     None),
    # image hosts that misbehave (the permissive server, which may fetch from loopback)
    ("image_404", "open", lambda s, d: chat(image(f"{s}/missing.png")), 400, "invalid_image"),
    ("image_404_streaming", "open", lambda s, d: chat(image(f"{s}/missing.png"), stream=True), 400, "invalid_image"),
    ("slow_image_server", "open", lambda s, d: chat(image(f"{s}/slow.png")), 400, "invalid_image"),
    ("endless_image_body", "open", lambda s, d: chat(image(f"{s}/endless.png")), 400, "invalid_image"),
    ("non_image_bytes", "open", lambda s, d: chat(image(f"{s}/text.png")), 400, "invalid_image"),
    ("truncated_png", "open", lambda s, d: chat(image(f"{s}/truncated.png")), 400, "invalid_image"),
    ("bomb_20000x20000", "open", lambda s, d: chat(image(f"{s}/bomb.png")), 400, "invalid_image"),
    ("redirect_chain_too_long", "open", lambda s, d: chat(image(f"{s}/chain/5")), 400, "invalid_image"),
    ("redirect_to_file_url", "open", lambda s, d: chat(image(f"{s}/to-file")), 400, "invalid_image"),
]  # fmt: skip


# What the error message must say, where the reason is worth pinning down.
FRAGMENTS = {
    "malformed_json": "not valid JSON",
    "unknown_part_type": "messages[0].content[0]",
    "image_url_without_url": "messages[0].content[0].image_url.url",
    "unknown_field": "max_token",
    "tools": "not supported",
    "chat_template_in_request": "chat template",
    "file_url": "outside the allowed",
    "ftp_url": "scheme 'ftp'",
    "dotdot_traversal": "outside the allowed",
    "symlink_escape": "outside the allowed",
    "private_ip_url": "loopback",
    "decimal_ip": "not a canonical IP",
    "ipv6_mapped_ip": "loopback",
    "parser_confusion": "backslash",
    "name_resolving_to_loopback": "loopback",
    "too_many_images": "at most 2",
    "image_404": "HTTP 404",
    "slow_image_server": "timed out",
    "endless_image_body": "larger than",
    "non_image_bytes": "not a supported image",
    "truncated_png": "cannot decode",
    "bomb_20000x20000": "too many pixels",
    "redirect_chain_too_long": "more than 3 redirects",
    "redirect_to_file_url": "scheme 'file'",
}


def _port(image_server: str) -> str:
    return image_server.rsplit(":", 1)[1]


@pytest.mark.parametrize(("name", "which", "build", "status", "code"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_matrix(
    name: str,
    which: str,
    build: Callable[[str, tuple[Path, Path]], Body],
    status: int,
    code: str | None,
    request: pytest.FixtureRequest,
    image_server: str,
    media_dirs: tuple[Path, Path],
) -> None:
    server: Server = request.getfixturevalue("open_server" if which == "open" else "strict_server")
    started = time.monotonic()
    error = assert_error(post(server, build(image_server, media_dirs)), status, code)
    assert FRAGMENTS.get(name, "") in error["message"]
    assert time.monotonic() - started < 10, "a bad request must fail fast (media timeout is 2 s)"
    if status == 400 and code in (None, "invalid_value"):
        assert error["type"] == "invalid_request_error"
    assert server.healthy()


@pytest.mark.parametrize("size", ["tiny", "tall"])
def test_degenerate_images_are_answered(open_server: Server, image_server: str, size: str) -> None:
    # A 1x1 image crashed another server on this model family (CVE-2026-22773); 1x5000 is as thin as it gets.
    response = post(open_server, chat(image(f"{image_server}/{size}.png")))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert open_server.healthy()


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong"}, {"Authorization": ""}], ids=["wrong", "none"])
def test_api_key(open_server: Server, headers: dict[str, str]) -> None:
    for response in (post(open_server, chat(), headers), httpx.get(f"{open_server.url}/v1/models", headers=headers)):
        assert assert_error(response, 401, "invalid_api_key")
    assert post(open_server, chat(), {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert open_server.healthy()


def test_unknown_route_and_wrong_method(strict_server: Server) -> None:
    assert_error(httpx.get(f"{strict_server.url}/v1/completions-typo"), 404, "unknown_url")
    assert_error(httpx.get(f"{strict_server.url}/v1/chat/completions"), 405, "method_not_allowed")
    assert strict_server.healthy()


def _raw_post(server: Server, head: str, chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Send a request by hand (headers, then body pieces until the server answers); its status and bytes."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                break
        data = b""
        while not _complete(data):  # the body may come in a later segment than the headers
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    return int(data.split(b" ", 2)[1]), data


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


def test_declared_oversized_body_is_refused_without_reading_it(strict_server: Server) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10**9}\r\n\r\n"
    )
    status, data = _raw_post(strict_server, head, iter([]))
    assert status == 413 and b"request_too_large" in data
    assert strict_server.healthy()


def test_endless_chunked_body_stops_at_the_byte_cap(strict_server: Server) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b'{"model": "default", "messages": [' + b" " * 65000

    def endless() -> Iterator[bytes]:
        for _ in range(1024):  # 64 MiB at most; the cap is 1 MiB
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
            time.sleep(0.001)

    status, data = _raw_post(strict_server, head, endless())
    assert status == 413 and b"request_too_large" in data
    assert strict_server.healthy()


def test_full_queue_answers_503_with_retry_after(strict_server: Server) -> None:
    # --max-seqs 2 --max-waiting 1: two requests run, one waits, the fourth is refused.
    long = chat("Talk for a long time.", max_tokens=400, ignore_eos=True, stream=True)
    url = f"{strict_server.url}/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        streams = [client.stream("POST", url, json=long) for _ in range(3)]
        responses = [stream.__enter__() for stream in streams]
        try:
            assert [r.status_code for r in responses] == [200, 200, 200]
            refused = client.post(url, json=chat())
            error = assert_error(refused, 503, "overloaded")
            assert refused.headers["retry-after"].isdigit() and error["type"] != "invalid_request_error"
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    deadline = time.monotonic() + 10
    while strict_server.metrics()["idefix_num_requests_unfinished"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert strict_server.metrics()["idefix_kv_slots_in_use"] == 0
    assert post(strict_server, chat()).status_code == 200


def test_no_client_mistake_was_a_server_error(strict_server: Server, open_server: Server) -> None:
    for server in (strict_server, open_server):
        text = httpx.get(f"{server.url}/metrics").text
        lines = [line for line in text.splitlines() if "http_requests_total{" in line]
        assert lines and not [line for line in lines if 'status="5' in line and "503" not in line], lines
        assert "Traceback" not in server.log_tail()
    assert json.loads(httpx.get(f"{strict_server.url}/health").text)["status"] == "ok"
