"""End-to-end fixtures: a local image HTTP server, and `idefix` servers started through the real CLI.

Every server is a real `python -m idefix --port 0 ... vision-plain -m CHECKPOINT` subprocess on 127.0.0.1; its port
is read from the start-up banner. Nothing here talks to any address but loopback.
"""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DEMO_IMAGES = REPO / "idefix" / "demo" / "images"
DEMO_MODEL = REPO / "idefix" / "demo" / "model"
API_KEY = "foobar"  # the key the seed's example passes
_BANNER = re.compile(r"http://127\.0\.0\.1:(\d+)/v1")


# ---------------------------------------------------------------------------------------------- images


def png(size: tuple[int, int], color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels (a decompression bomb, caught from the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + width // 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * 64)) + chunk(b"IEND", b"")


class _Images(BaseHTTPRequestHandler):
    """GET routes of the local image server (see `image_server`)."""

    stop = threading.Event()
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/slow.png":
            return self._slow()
        if path == "/endless.png":
            return self._endless()
        if m := re.fullmatch(r"/chain/(\d+)", path):
            hops = int(m.group(1))
            target = "/star.png" if hops == 0 else f"/chain/{hops - 1}"
            return self._send(302, {"Location": target}, b"")
        status, headers, body = self.routes.get(path, (404, {"Content-Type": "text/plain"}, b"not found"))
        self._send(status, headers, body)

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(png((8, 8))[:16])
        self.wfile.flush()
        self.stop.wait(8.0)  # far past the server's media timeout; bounded so the thread ends by itself

    def _endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        block = b"\x89PNG" + b"\x00" * 65532
        try:
            for _ in range(1024):  # 64 MiB at most
                self.wfile.write(block)
        except OSError:
            pass  # the idefix server hung up at its byte cap, as it should


class _ImageServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5, and the idefix server fetches up to 32 images at once. Past the
    # backlog the kernel drops connection attempts and the client retries 1 s later, past the 1 s connect timeout
    # of `open_flags`: the 64-stream load test failed on a 400 once in 8 runs. 32 fetches at once, with the GIL
    # busy: 28 of 160 connections failed with backlog 5, none with 128 (measured in session 9).
    request_queue_size = 128
    daemon_threads = True


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    """http://127.0.0.1:PORT serving demo images, good and broken images, slow / endless bodies, redirects."""
    image = {"Content-Type": "image/png"}
    _Images.routes = {
        **{f"/{p.name}": (200, image, p.read_bytes()) for p in DEMO_IMAGES.glob("*.png")},
        "/tiny.png": (200, image, png((1, 1))),
        "/tall.png": (200, image, png((1, 5000))),
        "/bomb.png": (200, image, bomb_png()),
        "/truncated.png": (200, image, png((64, 64), (10, 200, 30))[:60]),
        "/text.png": (200, {"Content-Type": "text/plain"}, b"this is not an image at all\n" * 10),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
    }
    server = _ImageServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Images.stop.set()
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------- idefix servers


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1/"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics by name (labelled ones keep their label text)."""
        values: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


def start_server(
    checkpoint: Path, flags: list[str], folder: Path, api_key: str | None = None, model_flags: tuple[str, ...] = ()
) -> Server:
    """`python -m idefix --port 0 FLAGS vision-plain -m CHECKPOINT MODEL_FLAGS`, ready once /health answers 200."""
    folder.mkdir(parents=True, exist_ok=True)
    stdout, stderr = folder / "server.out", folder / "server.err"
    key = ["--api-key", api_key] if api_key else []
    model = ["vision-plain", "-m", str(checkpoint), *model_flags]
    command = [sys.executable, "-m", "idefix", "--port", "0", *key, *flags, *model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDEFIX_API_KEY": ""}
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"idefix server exited {process.returncode}:\n{stderr.read_text()[-3000:]}")
        match = _BANNER.search(stdout.read_text(errors="replace"))
        if match:
            server = Server(f"http://127.0.0.1:{match.group(1)}", process, stdout, stderr, api_key)
            if server.healthy():
                return server
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"idefix server did not start in time:\n{stderr.read_text()[-3000:]}")


def open_flags(images_dir: Path) -> list[str]:
    """The permissive server: private image URLs (the test image server is on loopback), the demo images folder."""
    return [
        "--allow-private-media-urls",
        "--allowed-local-media-path",
        str(images_dir),
        "--media-timeout",
        "2",
        "--media-connect-timeout",
        "1",
        "--max-image-bytes",
        str(2 * 2**20),
        "--max-body-bytes",
        str(4 * 2**20),
        "--media-max-redirects",
        "3",
    ]


@pytest.fixture(scope="session")
def open_server(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One permissive server (API key `foobar`) shared by the API, load and bad-input tests."""
    server = start_server(small_checkpoint, open_flags(DEMO_IMAGES), tmp_path_factory.mktemp("open"), API_KEY)
    yield server
    server.stop()


def needs_demo_model() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (DEMO_MODEL / "config.json").exists(),
        reason="the shipped demo model (idefix/demo/model/config.json) does not exist yet; it is being trained",
    )


@pytest.fixture(scope="module")
def image_url(image_server: str) -> Callable[[str], str]:
    """name -> http://127.0.0.1:PORT/name on the shared image server (the demo images by their names)."""
    return lambda name: f"{image_server}/{name}"
