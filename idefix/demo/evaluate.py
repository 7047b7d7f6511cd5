"""Held-out exact-match accuracy of the demo model, per question type, on idefix's own engine.

    python -m idefix.demo.evaluate                                   # the shipped model, seed 12345
    python -m idefix.demo.evaluate --model runs/main --limit 0.2     # a quick look at a training run
    python -m idefix.demo.evaluate --isq Q4K                         # the same questions, quantized
    python -m idefix.demo.evaluate --json idefix/demo/model/eval.json

The conversations come from `idefix.demo.scenes` with a seed training never uses; every question is
answered greedily, all of them batched through one Engine. `--json` writes the accuracies (the tests read
`idefix/demo/model/eval.json` to know whether the shipped model meets its targets).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from idefix.demo import scenes

TARGETS = {"single_image": 0.95, "count": 0.85, "two_image": 0.90}


def with_images(example: scenes.Example, messages: list[dict]) -> list[dict]:
    """Attach the rendered images to the image placeholders of the first user turn."""
    images = iter(scenes.render(s) for s in example.scenes)
    first = messages[0]
    content = [{"type": "image", "image": next(images)} if p["type"] == "image" else p for p in first["content"]]
    return [{**first, "content": content}, *messages[1:]]


def held_out(seed: int, single: int, two: int, multi: int) -> list[scenes.Example]:
    """`single` single-image questions spread evenly over the kinds, then two-image and multi-turn ones."""
    rng = random.Random(seed)
    kinds = [scenes.KINDS[i % len(scenes.KINDS)] for i in range(single)]
    kinds += ["two_image"] * two + ["multi_turn"] * multi
    return [scenes.make_example(rng, kind) for kind in kinds]


def questions(example: scenes.Example) -> tuple[list[dict], str]:
    """The messages to answer (earlier turns carry their reference answers) and the expected last answer."""
    return with_images(example, scenes.to_messages(example, upto=len(example.turns))), example.turns[-1][1]


def answer_all(model: str, examples: list[scenes.Example], isq: str | None, max_tokens: int = 32) -> list[str]:
    """Greedy answers to every example, batched through one engine."""
    from idefix.config import EngineConfig
    from idefix.engine.engine import Engine
    from idefix.loading import load
    from idefix.sampling import SamplingParams

    engine = Engine(load(model, progress=False, isq=isq), EngineConfig(max_num_seqs=32, max_waiting=len(examples)))
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ids = [engine.add(engine.prepare(questions(example)[0]), params) for example in examples]
    texts: dict[str, str] = dict.fromkeys(ids, "")
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
    return [texts[i].strip() for i in ids]


def score(examples: list[scenes.Example], answers: list[str], show_errors: int = 0) -> dict[str, list[int]]:
    """Per kind: [correct, total]."""
    scores: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for example, got in zip(examples, answers, strict=True):
        expected = questions(example)[1]
        ok = got == expected
        scores[example.kind][0] += ok
        scores[example.kind][1] += 1
        if not ok and show_errors > 0:
            show_errors -= 1
            print(f"[{example.kind}] {example.turns[-1][0]!r}: expected {expected!r}, got {got!r}", file=sys.stderr)
    return dict(scores)


def _groups(scores: dict[str, list[int]]) -> dict[str, list[int]]:
    """[correct, total] per kind, plus `single_image` (all single-image kinds) and `all`."""
    single = [scores[k] for k in scenes.KINDS if k in scores]
    groups = {k: scores[k] for k in scenes.ALL_KINDS if k in scores}
    groups["single_image"] = [sum(c for c, _ in single), sum(t for _, t in single)]
    groups["all"] = [sum(c for c, _ in scores.values()), sum(t for _, t in scores.values())]
    return groups


def accuracy(scores: dict[str, list[int]]) -> dict[str, float]:
    return {name: correct / max(total, 1) for name, (correct, total) in _groups(scores).items()}


def table(scores: dict[str, list[int]]) -> str:
    rows = ["| question type | correct | total | accuracy |", "|---|---:|---:|---:|"]
    for name, (correct, total) in _groups(scores).items():
        label = f"**{name}**" if name in ("single_image", "all") else name
        rows.append(f"| {label} | {correct} | {total} | {100 * correct / max(total, 1):.1f}% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model folder or id (default: the shipped demo model)")
    parser.add_argument("--isq", default=None, help="quantize first, e.g. Q8_0, Q6K, Q4K")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--single", type=int, default=504, help="single-image questions (72 per type)")
    parser.add_argument("--two", type=int, default=200)
    parser.add_argument("--multi", type=int, default=150)
    parser.add_argument("--limit", type=float, default=1.0, help="fraction of each set, for quick checks")
    parser.add_argument("--show-errors", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the accuracies here")
    args = parser.parse_args(argv)
    counts = [round(n * args.limit) for n in (args.single, args.two, args.multi)]
    examples = held_out(args.seed, *counts)
    scores = score(examples, answer_all(args.model, examples, args.isq), args.show_errors)
    print(table(scores))
    acc = accuracy(scores)
    met = all(acc.get(group, 0.0) >= floor for group, floor in TARGETS.items())
    print(f"targets {TARGETS}: {'met' if met else 'NOT met'}")
    if args.json is not None:
        report: dict[str, Any] = {"model": args.model, "isq": args.isq, "seed": args.seed, "counts": counts}
        args.json.write_text(json.dumps({**report, "accuracy": acc, "scores": scores}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
