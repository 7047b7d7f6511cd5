"""Image sources -> validated, fully loaded PIL images, under a `MediaPolicy`.

A string is read as, in this order: a `data:` URI; an http(s) URL; a `file://` URL (exactly like a local path,
same policy); any other `scheme://` (refused); bare base64 (64+ characters, base64 alphabet and whitespace
only, so never a path with a `.` in it); otherwise a local path.

SSRF: a URL's host is taken from the same parser httpx connects with, refused in non-canonical numeric forms
(`127.1`, `2130706433`, `0x7f.1`) and with userinfo; it is resolved once, every address is checked, and the
request goes to the checked IP itself (Host header and TLS SNI/certificate name stay the host name), so a DNS
answer that changes between check and connect (rebinding) cannot redirect it. Redirects are re-checked hop by hop.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import ipaddress
import os
import re
import socket
import stat
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from idefix.errors import ImageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Only common formats reach Pillow (never EPS, which runs Ghostscript); "JPEG" also opens phone MPO files.
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URI = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),(.*)", re.DOTALL | re.IGNORECASE)
_BARE_BASE64 = re.compile(r"[A-Za-z0-9+/\s]{64,}={0,2}")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class MediaPolicy:
    """What `load_image` may read. The defaults suit a server that faces untrusted clients."""

    allow_urls: bool = True
    allow_private_urls: bool = False  # loopback / private / link-local / reserved / multicast / unspecified hosts
    allowed_local_paths: tuple[Path, ...] | None = ()  # None: any readable file; (): no local files at all
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    connect_timeout: float = 3.0  # seconds, per connection
    total_timeout: float = 10.0  # seconds for a whole fetch with its redirects, checked between reads
    max_redirects: int = 3

    @classmethod
    def trusted(cls) -> MediaPolicy:
        """For the user's own terminal or Python process: any local file, any URL including loopback."""
        return cls(allow_private_urls=True, allowed_local_paths=None)


def load_image(source: str | os.PathLike[str] | bytes | Image.Image, policy: MediaPolicy) -> Image.Image:
    """Return `source` as a fully loaded, EXIF-oriented PIL image (first frame); raise `ImageError` otherwise.

    A PIL image is checked and copied (its current frame); its mode is left as it is.
    """
    if isinstance(source, Image.Image):
        return _normalise(source, "PIL image", policy)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _decode(data, f"image bytes ({len(data)} bytes)", policy)
    if isinstance(source, os.PathLike):
        label = f"image path {_short(os.fspath(source))}"
        return _decode(_read_path(os.fspath(source), policy, label), label, policy)
    if not isinstance(source, str):
        raise ImageError(f"unsupported image source type {type(source).__name__}")
    label, data = _read_source(source, policy)
    return _decode(data, label, policy)


def image_digest(image: Image.Image) -> str:
    """Content hash for caches: equal digests mean equal pixels once converted to RGB."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    palette = image.getpalette()
    if palette is not None:
        digest.update(bytes(palette))
    if "transparency" in image.info:
        digest.update(repr(image.info["transparency"]).encode())
    return digest.hexdigest()


def _read_source(text: str, policy: MediaPolicy) -> tuple[str, bytes]:
    stripped = text.strip()
    if stripped[:5].lower() == "data:":
        return _read_data_uri(stripped, policy)
    scheme = _SCHEME.match(stripped)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            label = f"image URL {_short(stripped)}"
            return label, _fetch(stripped, policy, label)
        if name == "file":
            label = f"image path {_short(stripped)}"
            return label, _read_path(_file_url_path(stripped, label), policy, label)
        raise ImageError(f"image URL {_short(stripped)}: scheme {name!r} is not supported (use http or https)")
    if _BARE_BASE64.fullmatch(stripped):
        label = f"image base64 {_short(stripped)}"
        return label, _b64decode(stripped, label, policy)
    label = f"image path {_short(text)}"
    return label, _read_path(text, policy, label)


def _read_data_uri(uri: str, policy: MediaPolicy) -> tuple[str, bytes]:
    label = f"image data URI {_short(uri)}"
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise ImageError(f"{label}: malformed data URI (expected data:image/...;base64,...)")
    mime, params, payload = match.groups()
    if mime and not mime.strip().lower().startswith("image/"):
        raise ImageError(f"{label}: media type {mime.strip()!r} is not an image")
    if "base64" not in (p.strip().lower() for p in params.split(";")):
        raise ImageError(f"{label}: only base64 data URIs are supported")
    return label, _b64decode(payload, label, policy)


def _b64decode(text: str, label: str, policy: MediaPolicy) -> bytes:
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > policy.max_image_bytes + 3:
        raise ImageError(f"{label}: image is larger than {policy.max_image_bytes} bytes")
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label}: not valid base64") from None


def _file_url_path(url: str, label: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{label}: file URLs must name a local file (file:///path)")
    return url2pathname(parts.path)


def _read_path(text: str, policy: MediaPolicy, label: str) -> bytes:
    try:
        # Non-strict resolve: symlinks and `..` are resolved, and a refused path does not reveal whether it exists.
        resolved = Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise ImageError(f"{label}: cannot resolve path ({_one_line(exc)})") from exc
    if policy.allowed_local_paths is not None:
        if not policy.allowed_local_paths:
            raise ImageError(f"{label}: local image files are not allowed (--allowed-local-media-path)")
        if not any(resolved.is_relative_to(Path(d).resolve()) for d in policy.allowed_local_paths):
            raise ImageError(f"{label} is outside the allowed media directories (--allowed-local-media-path)")
    try:
        file = open(resolved, "rb", opener=_open_no_follow)  # noqa: SIM115 (closed just below)
    except OSError as exc:
        known = {errno.ENOENT: "no such file", errno.EISDIR: "is a directory", errno.EACCES: "permission denied"}
        raise ImageError(f"{label}: {known.get(exc.errno or 0) or f'cannot open ({_one_line(exc)})'}") from None
    with file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{label}: not a regular file")
        if info.st_size > policy.max_image_bytes:
            raise ImageError(f"{label}: file is larger than {policy.max_image_bytes} bytes")
        try:
            return file.read(policy.max_image_bytes + 1)
        except OSError as exc:
            raise ImageError(f"{label}: cannot read ({_one_line(exc)})") from exc


def _open_no_follow(path: str, flags: int) -> int:
    # O_NOFOLLOW: the checked path cannot be swapped for a symlink; O_NONBLOCK: opening a FIFO cannot hang.
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))


def _fetch(text: str, policy: MediaPolicy, label: str) -> bytes:
    if not policy.allow_urls:
        raise ImageError(f"{label}: image URLs are not allowed here")
    deadline = time.monotonic() + policy.total_timeout
    url, where = _parse_url(text, label), label
    try:
        # trust_env=False: no proxy variables or .netrc; redirects are ours to follow, each one re-checked.
        with httpx.Client(trust_env=False, follow_redirects=False) as client:
            for _ in range(policy.max_redirects + 1):
                with _stream(client, url, policy, deadline, where) as response:
                    if not response.is_redirect:
                        return _read_body(response, policy, deadline, where)
                    target = str(url.join(response.headers["location"]))
                where = f"{label} (redirected to {_short(target)})"
                url = _parse_url(target, where)
    except httpx.TimeoutException:
        raise ImageError(f"{where}: timed out (limit {policy.total_timeout:g} s)") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a malformed Location header
        raise ImageError(f"{where}: {_one_line(exc) or type(exc).__name__}") from exc
    raise ImageError(f"{label}: more than {policy.max_redirects} redirects")


def _parse_url(text: str, label: str) -> httpx.URL:
    if "\\" in text or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in text):
        raise ImageError(f"{label}: URL contains a backslash, space or control character")
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageError(f"{label}: invalid URL ({_one_line(exc)})") from None
    if url.scheme not in ("http", "https"):
        raise ImageError(f"{label}: scheme {url.scheme!r} is not supported (use http or https)")
    if url.userinfo:
        raise ImageError(f"{label}: URLs with user info (user@host) are not allowed")
    if not url.raw_host:
        raise ImageError(f"{label}: URL has no host")
    return url


def _stream(
    client: httpx.Client, url: httpx.URL, policy: MediaPolicy, deadline: float, where: str
) -> AbstractContextManager[httpx.Response]:
    address = _resolve(url, policy, where)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise httpx.ReadTimeout("deadline passed")
    timeout = httpx.Timeout(remaining, connect=min(policy.connect_timeout, remaining))
    host = url.raw_host.decode("ascii")
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return client.stream("GET", url.copy_with(host=address), headers=headers, timeout=timeout, extensions=extensions)


def _read_body(response: httpx.Response, policy: MediaPolicy, deadline: float, where: str) -> bytes:
    if not response.is_success:
        raise ImageError(f"{where}: HTTP {response.status_code} {response.reason_phrase}".rstrip())
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        raise ImageError(f"{where}: compressed responses (Content-Encoding) are not accepted")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_image_bytes:
        raise ImageError(f"{where}: response is larger than {policy.max_image_bytes} bytes")
    body = bytearray()
    for chunk in response.iter_raw(65536):
        body += chunk
        if len(body) > policy.max_image_bytes:
            raise ImageError(f"{where}: response is larger than {policy.max_image_bytes} bytes")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("deadline passed")
    return bytes(body)


def _resolve(url: httpx.URL, policy: MediaPolicy, where: str) -> str:
    """The one address the request will connect to, after checking every address the host has."""
    host = url.raw_host.decode("ascii")
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        if re.fullmatch(r"0x[0-9a-f]*|[0-9]+", host.rstrip(".").rsplit(".", 1)[-1].lower()):
            raise ImageError(f"{where}: host {host!r} is not a canonical IP address") from None
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
            raise ImageError(f"{where}: host {host!r} is not a valid host name") from None
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        except (OSError, UnicodeError, ValueError) as exc:
            raise ImageError(f"{where}: cannot resolve host {host!r} ({_one_line(exc)})") from None
    for address in addresses:
        kind = None if policy.allow_private_urls else _non_public_kind(address)
        if kind is not None:
            raise ImageError(f"{where}: host {host!r} is a {kind} address ({address}); only public hosts are allowed")
    return str(addresses[0])


def _non_public_kind(address: IPAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (kind := _non_public_kind(embedded)) is not None:
            return kind
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


def _decode(data: bytes, label: str, policy: MediaPolicy) -> Image.Image:
    if len(data) > policy.max_image_bytes:
        raise ImageError(f"{label}: image is larger than {policy.max_image_bytes} bytes")
    if not data:
        raise ImageError(f"{label}: image is empty")
    try:
        opened = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: image has too many pixels (over Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a supported image (PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    except Exception as exc:  # Pillow plugins raise many exception types on crafted input
        raise ImageError(f"{label}: cannot decode image ({_one_line(exc)})") from exc
    with opened:
        return _normalise(opened, label, policy)


def _normalise(image: Image.Image, label: str, policy: MediaPolicy) -> Image.Image:
    width, height = image.size  # known from the header alone: checked before any pixel is decoded
    if width * height > policy.max_pixels:
        raise ImageError(f"{label}: {width}x{height} image has more than {policy.max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageError(f"{label}: image is empty ({width}x{height})")
    try:
        image.load()
        return ImageOps.exif_transpose(image)  # always a new, loaded image with no file behind it
    except Exception as exc:  # truncated data, bad EXIF, decoder errors: all one kind of failure here
        raise ImageError(f"{label}: cannot decode image ({_one_line(exc)})") from exc


def _short(text: str, limit: int = 80) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
