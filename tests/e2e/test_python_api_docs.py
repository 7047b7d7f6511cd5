"""Every ```python example of docs/python-api.md, and of the README's Python section, runs as written
except for the model id (-> the small test checkpoint, or the demo model where it exists) and image URLs
(-> a local HTTP server)."""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from idefix import Runner, VisionModel

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "idefix" / "demo" / "images"
HAS_DEMO = (REPO / "idefix" / "demo" / "model" / "config.json").exists()
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
IMAGE_URL = re.compile(r"https?://[^\s\"']+")
HUB_IDS = ('"HuggingFaceTB/SmolVLM-256M-Instruct"', '"HuggingFaceM4/Idefics3-8B-Llama3"')


def _examples() -> list[Any]:
    params = []
    for path in (REPO / "docs" / "python-api.md", REPO / "README.md"):
        blocks = [m.group(1) for m in BLOCK.finditer(path.read_text())]
        blocks = [code for code in blocks if re.search(r"^(from|import) idefix", code, re.MULTILINE)]
        params += [pytest.param(code, id=f"{path.name}-{i}") for i, code in enumerate(blocks)]
    return params


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(IMAGES)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/shapes.png"
    server.shutdown()
    server.server_close()


def test_the_docs_have_examples() -> None:
    ids = [param.id for param in _examples()]
    assert sum(i.startswith("python-api.md") for i in ids) >= 6
    assert any(i.startswith("README.md") for i in ids)


@pytest.mark.parametrize("code", _examples())
def test_example_runs(
    code: str,
    small_checkpoint: Path,
    image_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(REPO)  # the examples name idefix/demo/images/... relative to the repository root
    for hub_id in HUB_IDS:
        code = code.replace(hub_id, repr(str(small_checkpoint)))
    if not HAS_DEMO:
        code = code.replace('"demo"', repr(str(small_checkpoint)))
    code = IMAGE_URL.sub(image_url, code)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    try:
        exec(compile(code, "example.py", "exec"), namespace)
    finally:
        _close_all(namespace.values())
    assert capsys.readouterr().out.strip(), "the example printed nothing"


def _close_all(values: Any) -> None:
    close: list[Callable[[], None]] = [v.close for v in values if isinstance(v, Runner | VisionModel)]
    for call in close:
        call()
