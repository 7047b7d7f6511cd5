"""SIGTERM: the server stops accepting, lets the request in flight finish, and exits 0. Also `idefix serve` with
--port after the subcommand, and a port already in use reported in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, Server, start_server


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(small_checkpoint: Path, tmp_path: Path) -> None:
    server = start_server(small_checkpoint, [], tmp_path)
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Talk."}],
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    first_chunk = threading.Event()
    events: list[str] = []

    def read() -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_chunk.wait(30)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)  # no longer accepting
    reader.join(60)
    assert server.process.wait(30) == 0
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get("finish_reason")] == ["length"]
    assert "Traceback" not in server.stderr.read_text()


def test_serve_with_port_after_the_subcommand_on_a_busy_port(small_checkpoint: Path, open_server: Server) -> None:
    port = open_server.url.rsplit(":", 1)[1]  # taken: `serve ... --port PORT` must say so before loading anything
    command = [sys.executable, "-m", "idefix", "serve", "-m", str(small_checkpoint), "--port", port]
    busy = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert busy.returncode == 1
    message = f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port or --serve-ip"
    assert busy.stderr.strip().splitlines() == [f"idefix: error: {message}"]
    assert open_server.healthy()
