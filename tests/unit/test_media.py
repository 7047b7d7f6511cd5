"""idefix.media: every image source, every limit, and the SSRF rules, against servers on 127.0.0.1 only."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from idefix import media
from idefix.errors import ImageError
from idefix.media import MediaPolicy, image_digest, load_image

LOOPBACK = "127.0.0.1"


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 1-bit PNG that claims width x height pixels in ~60 bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


GOOD_PNG = png(8, 6)


def noisy_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("L", (64, 64), (bytes(range(7, 256, 13)) * 216)[:4096]).save(buffer, "PNG")
    return buffer.getvalue()


NOISY_PNG = noisy_png()
ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/png": (200, {"Content-Type": "image/png"}, GOOD_PNG),
    "/tiny": (200, {}, png(1, 1)),
    "/tall": (200, {}, png(1, 5000)),
    "/bomb": (200, {}, png_header_only(20_000, 20_000)),
    "/text": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
    "/truncated": (200, {}, NOISY_PNG[: len(NOISY_PNG) * 2 // 3]),
    "/missing": (404, {}, b"gone"),
    "/redirect": (302, {"Location": "/png"}, b""),
    "/redirect-private": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
    "/redirect-internal": (302, {"Location": "http://internal.test/image.png"}, b""),
    "/gzip": (200, {"Content-Encoding": "gzip"}, zlib.compress(GOOD_PNG)),
}


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.hosts.append(self.headers.get("Host", ""))
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path.startswith("/chain/"):
            self._send(302, {"Location": f"/chain/{int(self.path.rsplit('/', 1)[1]) + 1}"}, b"")
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**20))
            self.end_headers()
        else:
            self._send(*ROUTES.get(self.path, (404, {}, b"")))

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def serve(server: ThreadingHTTPServer) -> Iterator[str]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{LOOPBACK}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve(ThreadingHTTPServer((LOOPBACK, 0), Handler))


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tls_cert: tuple[Path, Path]) -> Iterator[str]:
    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_cert)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from serve(server)


def open_policy(**changes: object) -> MediaPolicy:
    settings: dict = {"allow_private_urls": True, "max_image_bytes": 2**20, "total_timeout": 3.0, **changes}
    return MediaPolicy(**settings)


def refused(source: object, policy: MediaPolicy, *fragments: str) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(source, policy)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Fake DNS for *.test names (`table[name]` = addresses); records every lookup; real names never resolve."""
    table: dict[str, list[str]] = {"calls": []}
    real = socket.getaddrinfo

    def fake(host: str, port: object, *args: object, **kwargs: object) -> list:
        table["calls"].append(host)
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in table[host]]
        if host.replace(".", "").isdigit():  # an IP literal httpcore hands to create_connection: no DNS involved
            return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        raise socket.gaierror(f"test resolver: unknown host {host}")

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"connection attempted to {address}")

    monkeypatch.setattr(socket, "create_connection", refuse)


# --- URLs -----------------------------------------------------------------------------------------------------------


def test_url_png_loads_and_is_detached(server: str) -> None:
    image = load_image(f"http://{server}/png", open_policy())
    assert image.size == (8, 6) and image.getpixel((0, 0)) == (200, 30, 40)
    assert type(image) is Image.Image  # a plain copy: no file, no decoder behind it


@pytest.mark.parametrize(("path", "size"), [("/tiny", (1, 1)), ("/tall", (1, 5000)), ("/redirect", (8, 6))])
def test_url_good_cases(server: str, path: str, size: tuple[int, int]) -> None:
    assert load_image(f"http://{server}{path}", open_policy()).size == size


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("/missing", ["HTTP 404"]),
        ("/text", ["not a supported image"]),
        ("/truncated", ["cannot decode", "truncated"]),
        ("/bomb", ["too many pixels"]),
        ("/big-declared", ["larger than 1048576 bytes"]),
        ("/gzip", ["Content-Encoding"]),
        ("/chain/0", ["more than 3 redirects"]),
    ],
)
def test_url_errors(server: str, path: str, fragments: list[str]) -> None:
    refused(f"http://{server}{path}", open_policy(), f"image URL http://{server}{path}", *fragments)


def test_url_endless_body_stops_at_the_cap(server: str) -> None:
    started = time.monotonic()
    refused(f"http://{server}/endless", open_policy(max_image_bytes=300_000), "larger than 300000 bytes")
    assert time.monotonic() - started < 2


def test_url_slow_server_times_out(server: str) -> None:
    started = time.monotonic()
    refused(f"http://{server}/slow", open_policy(total_timeout=0.3), "timed out")
    assert time.monotonic() - started < 1.2


def test_url_redirect_chain_respects_max_redirects(server: str) -> None:
    refused(f"http://{server}/chain/0", open_policy(max_redirects=1), "more than 1 redirects")


def test_loopback_server_refused_by_default_policy(server: str, no_connect: None) -> None:
    refused(f"http://{server}/png", MediaPolicy(), "loopback address (127.0.0.1)")


def test_urls_can_be_switched_off(server: str, no_connect: None) -> None:
    refused(f"http://{server}/png", MediaPolicy(allow_urls=False), "URLs are not allowed")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://2130706433/", "not a canonical IP"),
        ("http://0177.0.0.1/", "invalid URL"),
        ("http://0x7f000001/", "not a canonical IP"),
        ("http://0x7f.1/", "not a canonical IP"),
        ("http://127.1/", "not a canonical IP"),
        ("http://127.0.0.1./", "not a canonical IP"),
        ("http://%31%32%37.0.0.1/", "not a canonical IP"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:7f00:1]:8080/", "loopback"),
        ("http://[64:ff9b::7f00:1]/", "loopback"),
        ("http://[2002:7f00:1::]/", "loopback"),
        ("http://[fe80::1]/", "link-local"),
        ("http://public.example\\@127.0.0.1/", "backslash"),
        ("http://public.example@127.0.0.1/", "user info"),
        ("http://127.0.0.1/", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://10.1.2.3/", "private"),
        ("http://192.168.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://100.64.0.1/", "non-global"),
        ("http://224.0.0.1/", "multicast"),
        ("http://localhost/", "loopback"),
        ("http://mixed.test/", "private address (10.0.0.7)"),
        ("ftp://example.com/cat.png", "scheme 'ftp' is not supported"),
        ("gopher://example.com/", "scheme 'gopher' is not supported"),
        ("http:///nohost", "no host"),
    ],
)
def test_ssrf_forms_refused_before_any_connection(
    url: str, fragment: str, resolver: dict[str, list[str]], no_connect: None
) -> None:
    resolver["localhost"] = ["127.0.0.1"]
    resolver["mixed.test"] = ["8.8.8.8", "10.0.0.7"]  # one bad address is enough
    refused(url, MediaPolicy(), fragment)
    assert set(resolver["calls"]) <= {"localhost", "mixed.test"}  # IP forms are judged without DNS


def test_redirects_are_rechecked_each_hop(
    server: str, resolver: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend the loopback test server is a public host, so that only the redirect target is judged.
    real = media._non_public_kind
    monkeypatch.setattr(media, "_non_public_kind", lambda address: None if str(address) == LOOPBACK else real(address))
    resolver["internal.test"] = ["10.9.8.7"]
    assert load_image(f"http://{server}/redirect", MediaPolicy()).size == (8, 6)
    connections: list[tuple[str, int]] = []
    real_connect = socket.create_connection

    def recording_connect(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        connections.append(address)
        return real_connect(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", recording_connect)
    refused(f"http://{server}/redirect-private", MediaPolicy(), "redirected to http://169.254.169.254", "link-local")
    refused(f"http://{server}/redirect-internal", MediaPolicy(), "redirected to http://internal.test", "10.9.8.7")
    assert {address[0] for address in connections} == {LOOPBACK}


def test_name_resolved_once_and_the_checked_ip_is_connected(server: str, resolver: dict[str, list[str]]) -> None:
    # A rebinding DNS answers 127.0.0.1 first and something else afterwards: the later answers must never be used.
    port = server.rsplit(":", 1)[1]
    resolver["media.test"] = [LOOPBACK]
    Handler.hosts.clear()
    image = load_image(f"http://media.test:{port}/png", open_policy())
    assert image.size == (8, 6)
    assert resolver["calls"].count("media.test") == 1
    assert Handler.hosts == [f"media.test:{port}"]


def test_https_verifies_the_host_name_while_connecting_to_the_ip(
    tls_server: str, tls_cert: tuple[Path, Path], resolver: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ssl.create_default_context

    def trusting_test_ca(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = real(*args, **kwargs)  # type: ignore[arg-type]
        context.load_verify_locations(cafile=str(tls_cert[0]))
        return context

    monkeypatch.setattr(ssl, "create_default_context", trusting_test_ca)
    port = tls_server.rsplit(":", 1)[1]
    resolver["media.test"] = [LOOPBACK]
    assert load_image(f"https://media.test:{port}/png", open_policy()).size == (8, 6)
    # Same server by IP: the certificate names media.test, not 127.0.0.1, so verification must fail.
    refused(f"https://{tls_server}/png", open_policy(), "certificate")


# --- local paths ----------------------------------------------------------------------------------------------------


@pytest.fixture
def media_dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "cat.png").write_bytes(GOOD_PNG)
    (outside / "secret.png").write_bytes(GOOD_PNG)
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    return allowed, outside


def test_path_inside_allowed_dir_loads(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    policy = MediaPolicy(allowed_local_paths=(allowed,))
    assert load_image(str(allowed / "cat.png"), policy).size == (8, 6)
    assert load_image(allowed / "cat.png", policy).size == (8, 6)
    assert load_image(f"file://{allowed / 'cat.png'}", policy).size == (8, 6)


@pytest.mark.parametrize(
    ("relative", "fragments"),
    [
        ("outside/secret.png", ["is outside the allowed media directories (--allowed-local-media-path)"]),
        ("allowed/../outside/secret.png", ["is outside the allowed media directories"]),
        ("allowed/escape.png", ["is outside the allowed media directories"]),
        ("outside/nope.png", ["is outside the allowed media directories"]),  # existence is not revealed
        ("allowed/nope.png", ["no such file"]),
        ("allowed/sub", ["is a directory"]),
    ],
)
def test_path_errors(media_dirs: tuple[Path, Path], relative: str, fragments: list[str]) -> None:
    allowed, _ = media_dirs
    source = str(allowed.parent / relative)
    refused(source, MediaPolicy(allowed_local_paths=(allowed,)), f"image path {source[:60]}", *fragments)


def test_file_url_follows_the_path_policy(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs
    refused(f"file://{outside / 'secret.png'}", MediaPolicy(allowed_local_paths=(allowed,)), "is outside the allowed")
    refused("file://remote.example/share/cat.png", MediaPolicy.trusted(), "must name a local file")


def test_local_files_off_by_default_and_any_file_when_trusted(media_dirs: tuple[Path, Path]) -> None:
    _, outside = media_dirs
    refused(str(outside / "secret.png"), MediaPolicy(), "local image files are not allowed")
    refused("/etc/passwd", MediaPolicy(allowed_local_paths=(outside,)), "/etc/passwd is outside the allowed")
    assert load_image(str(outside / "secret.png"), MediaPolicy.trusted()).size == (8, 6)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_oversized_file_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    refused(str(tmp_path / "pipe"), MediaPolicy.trusted(), "not a regular file")
    (tmp_path / "big.png").write_bytes(GOOD_PNG + b"\0" * 5000)
    refused(str(tmp_path / "big.png"), MediaPolicy(allowed_local_paths=None, max_image_bytes=4096), "larger than 4096")


# --- bytes, base64, data URIs, PIL ----------------------------------------------------------------------------------


def test_data_uri_and_bare_base64() -> None:
    encoded = base64.b64encode(GOOD_PNG).decode()
    assert load_image(f"data:image/png;base64,{encoded}", MediaPolicy()).size == (8, 6)
    assert load_image(encoded, MediaPolicy()).size == (8, 6)
    assert load_image(GOOD_PNG, MediaPolicy()).size == (8, 6)


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("data:image/png;base64,@@@not base64@@@", ["image data URI data:image/png;base64,@@@", "not valid base64"]),
        ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), ["not a supported image"]),
        ("data:text/plain;base64,aGVsbG8=", ["'text/plain' is not an image"]),
        ("data:image/png,rawbytes", ["only base64 data URIs"]),
        ("A" * 65, ["image base64 AAAA", "not valid base64"]),
        (base64.b64encode(b"x" * 300).decode(), ["not a supported image"]),
        (b"plain bytes", ["image bytes (11 bytes)", "not a supported image"]),
        (b"", ["image is empty"]),
    ],
)
def test_inline_errors(source: str | bytes, fragments: list[str]) -> None:
    message = refused(source, MediaPolicy(), *fragments)
    assert len(message) < 200  # long sources are shortened in messages


def test_base64_over_the_byte_cap_refused_before_decoding() -> None:
    refused("data:image/png;base64," + "A" * 8000, MediaPolicy(max_image_bytes=1000), "larger than 1000 bytes")


def test_pixel_limit_checked_from_the_header(server: str) -> None:
    started = time.monotonic()
    refused(png_header_only(8000, 8000), MediaPolicy(), "8000x8000 image has more than 40000000 pixels")
    refused(png_header_only(20_000, 20_000), MediaPolicy(), "too many pixels")
    refused(png(1, 5000), MediaPolicy(max_pixels=4999), "1x5000 image has more than 4999 pixels")
    assert time.monotonic() - started < 1


def test_exif_orientation_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    loaded = load_image(buffer.getvalue(), MediaPolicy())
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # type: ignore[index]  # red ends up on top
    assert bottom[2] > 200 and bottom[0] < 60  # type: ignore[index]


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_image(buffer.getvalue(), MediaPolicy())
    assert getattr(loaded, "n_frames", 1) == 1
    assert loaded.convert("RGB").getpixel((1, 1)) == (255, 0, 0)


def test_pil_image_passes_through_checked_and_copied(tmp_path: Path) -> None:
    original = Image.new("L", (3, 2), 77)
    loaded = load_image(original, MediaPolicy())
    assert loaded is not original and loaded.mode == "L" and image_digest(loaded) == image_digest(original)
    refused(Image.new("L", (10, 10)), MediaPolicy(max_pixels=99), "PIL image", "more than 99 pixels")
    (tmp_path / "lazy.png").write_bytes(GOOD_PNG[:-30])
    with Image.open(tmp_path / "lazy.png") as lazy:  # opened but not decoded: load() happens in load_image
        refused(lazy, MediaPolicy(), "PIL image: cannot decode image")


def test_image_digest_is_a_content_hash() -> None:
    first, same, other = Image.new("RGB", (2, 2), 5), Image.new("RGB", (2, 2), 5), Image.new("RGB", (2, 2), 6)
    assert image_digest(first) == image_digest(same) != image_digest(other)
    assert image_digest(Image.new("L", (2, 2), 5)) != image_digest(Image.new("L", (4, 1), 5))
    red, blue = Image.new("P", (2, 2), 0), Image.new("P", (2, 2), 0)
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert image_digest(red) != image_digest(blue)  # same indices, different colours
    assert len(image_digest(first)) == 64
