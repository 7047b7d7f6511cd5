"""The interactive chat, driven in a real pseudo-terminal (pexpect) as a user would type it.

The random small checkpoint answers random tokens, so these tests check mechanics (prompt, streaming,
commands, errors, Ctrl-C / Ctrl-D, history); the demo-model test at the end checks real answers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from idefix.hub import demo_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "idefix" / "demo" / "images"
# Escape sequences prompt_toolkit writes (CSI, charset and keypad modes) and cursor backspaces.
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]|[\x07\x08]")
PROMPT = r"(?:^|\n)>"


class Term:
    """A pexpect child whose output is searched with the escape sequences stripped, moving forward only."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.raw = ""
        self.text = ""
        self.pos = 0

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s; screen ends with {self.text[-600:]!r}")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=0.2)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                if not regex.search(self.text, self.pos):
                    raise AssertionError(f"exited before {pattern!r}; screen ends with {self.text[-600:]!r}") from None
            self.text = ANSI.sub("", self.raw).replace("\r", "")

    def line(self, text: str) -> None:
        """Type a line and press Enter (a terminal sends CR)."""
        self.child.send(text + "\r")

    def ask(self, text: str, timeout: float = 30) -> str:
        """Type a line, wait for the next prompt, return what was printed in between."""
        self.expect(PROMPT)
        self.line(text)
        start = self.pos
        self.expect(re.escape(text[-20:]))  # the echo of the typed line
        start = self.pos
        match = self.expect(PROMPT, timeout)
        self.pos = match.start()  # leave the prompt for the next ask()
        return self.text[start : match.start()]

    def finish(self, timeout: float = 20) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        return self.child.exitstatus


def spawn_chat(history: Path, *args: str) -> Term:
    env = {
        **os.environ,
        "IDEFIX_HISTORY": str(history),
        "PROMPT_TOOLKIT_NO_CPR": "1",  # no cursor-position queries the test would have to answer
        "TERM": "xterm",
    }
    child = pexpect.spawn(
        sys.executable, ["-m", "idefix", "chat", *args], env=env, cwd=ROOT, encoding="utf-8", dimensions=(50, 250)
    )
    term = Term(child)
    term.expect(r"quantization none · device cpu", timeout=60)
    return term


def stats(term: Term) -> dict[str, int]:
    out = term.ask("\\stats")
    m = re.search(r"prompt (\d+) tokens(?:, (\d+) cached)?.*answer (\d+) tokens", out)
    assert m, out
    return {"prompt": int(m[1]), "cached": int(m[2] or 0), "answer": int(m[3])}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_mechanics(small_checkpoint: Path, tmp_path: Path) -> None:
    history = tmp_path / "state" / "history"
    term = spawn_chat(history, "-m", str(small_checkpoint), "--max-tokens", "6", "--max-seq-len", "400")
    assert "\\image" in term.ask("\\help") and "\\save FILE" in term.text
    assert "no answer yet" in term.ask("\\stats")

    term.ask("hello")
    first = stats(term)
    assert 1 <= first["answer"] <= 6
    term.ask(f"\\image {IMAGES / 'shapes.png'} How many circles are there?")
    second = stats(term)
    assert second["prompt"] > first["prompt"] + first["answer"]  # the whole conversation, plus the image
    assert second["cached"] >= first["prompt"]  # turn 1 came from the prefix cache

    # Each error prints one line and keeps the session and its conversation.
    errors = {
        f"\\image {tmp_path / 'missing.png'} what is it?": "no such file",
        "what about missing.jpg?": "quote it",
        f"\\image http://127.0.0.1:{closed_port()}/x.png what is it?": "image URL",
        f"\\image {ROOT / 'README.md'} what is it?": "not a supported image",
        " ".join(["word"] * 500): "context",
        "\\temperature 7": "out of range",
        "\\topk many": "needs an integer",
        "\\clera": "did you mean \\clear",
    }
    for line, message in errors.items():
        out = term.ask(line)
        error_lines = [x for x in out.splitlines() if x.startswith("error:")]
        assert len(error_lines) == 1 and message in error_lines[0], out
    assert stats(term) == second

    save = tmp_path / "chat.json"
    assert "saved 4 messages" in term.ask(f"\\save {save}")
    body = json.loads(save.read_text())
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert body["messages"][2]["content"][0] == {"type": "image_url", "image_url": {"url": str(IMAGES / "shapes.png")}}
    assert body["messages"][2]["content"][1]["text"] == "How many circles are there?"

    assert "conversation cleared" in term.ask("\\clear")
    term.ask("hello")
    assert stats(term)["prompt"] == first["prompt"]  # nothing of the earlier turns is sent
    assert "system prompt set" in term.ask("\\system You answer in one word.")
    term.ask("hello")
    with_system = stats(term)
    term.ask(f"\\save {save}")
    saved = json.loads(save.read_text())["messages"]
    assert saved[0] == {"role": "system", "content": [{"type": "text", "text": "You answer in one word."}]}
    assert with_system["prompt"] > first["prompt"] + first["answer"] + 5  # the system prompt is in the prompt

    term.expect(PROMPT)
    term.child.sendcontrol("d")
    assert term.finish() == 0
    typed = history.read_text()
    assert "+hello" in typed and "+\\stats" in typed and "shapes.png How many circles" in typed


def test_ctrl_c_stops_the_answer_and_keeps_the_session(small_checkpoint: Path, tmp_path: Path) -> None:
    term = spawn_chat(tmp_path / "history", "-m", str(small_checkpoint), "--max-tokens", "3000")
    term.expect(PROMPT)
    term.line("tell me a very long story")
    term.expect(r"story\n.{10}", timeout=30)  # the answer is streaming
    term.child.sendintr()
    term.expect(r"\[stopped\]", timeout=10)
    stopped = stats(term)
    assert 0 < stopped["answer"] < 3000

    out = term.ask("and another", timeout=60)  # the next question works (3000 tokens at most: no cut-off)
    assert "error" not in out
    after = stats(term)
    assert after["cached"] > 0 and after["prompt"] > stopped["prompt"]

    term.expect(PROMPT)
    term.child.send("half a line")
    term.child.sendintr()  # Ctrl-C with text drops the text and stays
    term.line("\\stats")
    term.expect(r"time to first token")
    term.expect(PROMPT)
    term.child.sendintr()  # Ctrl-C on an empty line leaves
    assert term.finish() == 0


def test_piped_input_and_bad_model_exit_codes(small_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, "IDEFIX_HISTORY": str(tmp_path / "history")}
    cmd = [sys.executable, "-m", "idefix", "chat", "-m", str(small_checkpoint), "--max-tokens", "4"]
    out = subprocess.run(cmd, input="hello\n\\stats\n", capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "answer" in out.stdout and "tokens" in out.stdout.splitlines()[-1]

    bad = [sys.executable, "-m", "idefix", "chat", "-m", str(tmp_path / "nowhere")]
    out = subprocess.run(bad, input="", capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().startswith("idefix: error: model")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not (demo_model_dir() / "config.json").exists(), reason="the demo model is not built yet")
def test_demo_two_images_in_two_turns(tmp_path: Path) -> None:
    term = spawn_chat(tmp_path / "history")
    answers = [term.ask(f"\\image {IMAGES / 'shapes.png'} How many circles are there?", timeout=120)]
    answers.append(term.ask(f"\\image {IMAGES / 'crosses.png'} How many crosses are there?", timeout=120))
    answers.append(term.ask("Which image has more circles?", timeout=120))  # needs both turns' images
    assert stats(term)["cached"] > 0
    term.ask("\\clear")
    answers.append(term.ask(f"\\image {IMAGES / 'star.png'} What shape is shown?", timeout=120))
    answers.append(term.ask("What colour is it?", timeout=120))  # "it" is the earlier turn's star
    term.expect(PROMPT)
    term.child.sendcontrol("d")
    assert term.finish() == 0
