"""`idefix run`: one question on a bundled image, plain and `--json`, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idefix.hub import demo_model_dir
from tests.demo_gate import expect_demo_answer

ROOT = Path(__file__).resolve().parents[2]
SHAPES = str(ROOT / "idefix" / "demo" / "images" / "shapes.png")


def idefix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idefix", *args], capture_output=True, text=True, timeout=120)


def test_run_json_carries_text_and_usage(small_checkpoint: Path) -> None:
    out = idefix("run", "-m", str(small_checkpoint), "--image", SHAPES, "--max-tokens", "5", "--json", "How many?")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["text"] == body["choices"][0]["text"] and body["model"] == str(small_checkpoint)
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] == len(body["choices"][0]["token_ids"]) <= 5
    assert usage["prompt_tokens"] > 20  # the image's tokens are in the prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["time_to_first_token"] > 0 and usage["avg_prompt_tok_per_sec"] > 0


def test_run_prints_the_answer_and_errors_are_one_line(small_checkpoint: Path, tmp_path: Path) -> None:
    out = idefix("run", "-m", str(small_checkpoint), "--image", SHAPES, "--max-tokens", "3", "How many?")
    assert out.returncode == 0 and out.stdout.endswith("\n") and len(out.stdout.splitlines()) <= 4
    missing = idefix("run", "-m", str(small_checkpoint), "--image", str(tmp_path / "no.png"), "How many?")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"idefix: error: image path {tmp_path / 'no.png'}: no such file"]
    long = idefix("run", "-m", str(small_checkpoint), "--max-seq-len", "8", "--max-tokens", "4", "a b c d e f g h")
    assert long.returncode == 1 and "context" in long.stderr and len(long.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not (demo_model_dir() / "config.json").exists(), reason="the demo model is not built yet")
def test_run_demo_answers_correctly() -> None:
    start = time.perf_counter()
    out = idefix("run", "--image", SHAPES, "How many circles are there?")
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    print(f"idefix run on the demo model: {seconds:.1f} s wall")
    body = json.loads(idefix("run", "--image", SHAPES, "--json", "What colour is the square?").stdout)
    assert body["finish_reason"] == "stop"
    expect_demo_answer(out.stdout, "3")
    expect_demo_answer(body["text"], "green")
