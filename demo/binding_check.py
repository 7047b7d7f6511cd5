"""Where a demo model's colour-and-shape questions fail: presence and position accuracy split by what the scene
holds, on held-out questions (a larger sample than the evaluation's 72 of each).

    python demo/binding_check.py                      # the shipped model, 300 questions of each type
    python demo/binding_check.py --model runs/main --count 100

Presence answers are split by whether the asked colour and the asked shape are each in the scene (for a "no",
on other objects): a model that checks the shape alone fails exactly where the shape is drawn in another colour.
Position answers are split by the number of objects and by whether another object shares the colour or the
shape with the one asked about.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idefix.demo import scenes  # noqa: E402
from idefix.demo.evaluate import answer_all, held_out  # noqa: E402


def category(example: scenes.Example) -> str:
    question, answer = example.turns[-1]
    colour, shape = question.rstrip("?").split()[-2:]
    objects = example.scenes[0].objects
    if example.kind == "presence":
        drawn = [what for what, seen in (("colour", any(o.colour == colour for o in objects)),
                                         ("shape", any(o.shape == shape for o in objects))) if seen]  # fmt: skip
        return f"presence {answer}, in the scene: {' and '.join(drawn) or 'neither'}"
    others = [o for o in objects if (o.colour, o.shape) != (colour, shape)]
    sharing = any(o.colour == colour or o.shape == shape for o in others)
    return f"position, {len(objects)} objects, {'another shares colour or shape' if sharing else 'no sharing'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--count", type=int, default=300, help="questions of each of the two types")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    examples = held_out(args.seed, args.count * len(scenes.KINDS), 0, 0)
    examples = [e for e in examples if e.kind in ("presence", "position")]
    answers = answer_all(args.model, examples, None)
    cells: dict[str, list[int]] = {}
    for example, answer in zip(examples, answers, strict=True):
        cell = cells.setdefault(category(example), [0, 0])
        cell[0] += answer == example.turns[-1][1]
        cell[1] += 1
    print("| case | correct | total | accuracy |\n|---|---:|---:|---:|")
    for name in sorted(cells):
        right, total = cells[name]
        print(f"| {name} | {right} | {total} | {right / total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
