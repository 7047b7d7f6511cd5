"""Held-out exact-match accuracy of the demo model, per question type, as a markdown table.

    python demo/evaluate.py                          # idefix/demo/model, seed 12345
    python demo/evaluate.py --model runs/main --limit 100

The held-out conversations come from `idefix.demo.scenes` with a seed the training never uses. Answers are
produced by `answer(messages)`, greedy; today it wraps transformers' `generate`, and any engine with the same
signature (messages in, answer text out) can be plugged in instead via `evaluate(answer, ...)`.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idefix.demo import scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Answer = Callable[[list[dict]], str]


def transformers_answerer(folder: str | Path, max_new_tokens: int = 32) -> Answer:
    """`answer(messages)` backed by `Idefics3ForConditionalGeneration.generate`, greedy.

    `messages` use the chat-template content format, with each image given as
    `{"type": "image", "image": PIL.Image}` in the order the images appear."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = Idefics3ForConditionalGeneration.from_pretrained(folder).eval()

    def answer(messages: list[dict]) -> str:
        images = [part["image"] for m in messages for part in m["content"] if part["type"] == "image"]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], images=[images], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    return answer


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


def evaluate(answer: Answer, examples: list[scenes.Example], show_errors: int = 0) -> dict[str, list[int]]:
    """Per kind: [correct, total]. Multi-turn examples are scored on the last answer, with the earlier
    turns given with their reference answers."""
    scores: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for example in examples:
        messages = with_images(example, scenes.to_messages(example, upto=len(example.turns)))
        expected = example.turns[-1][1]
        got = answer(messages)
        ok = got == expected
        scores[example.kind][0] += ok
        scores[example.kind][1] += 1
        if not ok and show_errors > 0:
            show_errors -= 1
            print(f"[{example.kind}] {example.turns[-1][0]!r}: expected {expected!r}, got {got!r}", file=sys.stderr)
    return dict(scores)


def table(scores: dict[str, list[int]]) -> str:
    rows = ["| question type | correct | total | accuracy |", "|---|---:|---:|---:|"]

    def row(name: str, correct: int, total: int) -> str:
        return f"| {name} | {correct} | {total} | {100 * correct / max(total, 1):.1f}% |"

    for kind in scenes.ALL_KINDS:
        if kind in scores:
            rows.append(row(kind, *scores[kind]))
    single = [scores[k] for k in scenes.KINDS if k in scores]
    rows.append(row("**all single-image**", sum(c for c, _ in single), sum(t for _, t in single)))
    rows.append(row("**all**", sum(c for c, _ in scores.values()), sum(t for _, t in scores.values())))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "idefix" / "demo" / "model"))
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--single", type=int, default=504, help="single-image questions (72 per type)")
    parser.add_argument("--two", type=int, default=200)
    parser.add_argument("--multi", type=int, default=150)
    parser.add_argument("--limit", type=float, default=1.0, help="fraction of each set, for quick checks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-errors", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    counts = [round(n * args.limit) for n in (args.single, args.two, args.multi)]
    examples = held_out(args.seed, *counts)
    print(table(evaluate(transformers_answerer(args.model), examples, args.show_errors)))


if __name__ == "__main__":
    main()
