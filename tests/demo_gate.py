"""One gate for tests that assert the shipped demo model's *answers*.

The demo model's held-out evaluation (`python -m idefix.demo.evaluate --json idefix/demo/model/eval.json`)
records its accuracy next to the weights. While that report says the model is below issue 4's targets, a
wrong answer is an expected failure (xfail, reported as such); once the report meets the targets, every
answer check is a hard assertion. Mechanics around the answers (the API answers what the engine answers,
usage, finish reasons) are asserted unconditionally by the tests themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DEMO_MODEL = Path(__file__).resolve().parents[1] / "idefix" / "demo" / "model"
REPORT = DEMO_MODEL / "eval.json"
TARGETS = {"single_image": 0.95, "count": 0.85, "two_image": 0.90}  # issue 4


def demo_meets_targets() -> bool:
    try:
        accuracy = json.loads(REPORT.read_text())["accuracy"]
        return all(accuracy[group] >= floor for group, floor in TARGETS.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def expect_demo_answer(answer: str, expected: str) -> None:
    """Assert the demo model answered `expected` (case and a final full stop aside); see the module doc."""

    def normal(text: str) -> str:
        return text.strip().rstrip(".").lower()

    if normal(answer) == normal(expected):
        return
    message = f"the demo model answered {answer.strip()!r}, expected {expected!r}"
    if demo_meets_targets():
        pytest.fail(message)
    pytest.xfail(f"{message}; its eval report ({REPORT.name}) is below issue 4's targets")
