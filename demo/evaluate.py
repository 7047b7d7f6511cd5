"""Held-out exact-match accuracy of the demo model answered by transformers (the reference), per question type.

idefix's own evaluation is `python -m idefix.demo.evaluate` (same questions, same scoring, on idefix's engine);
this script answers them with transformers' `generate` instead, to compare the two.

    python demo/evaluate.py                          # idefix/demo/model, seed 12345
    python demo/evaluate.py --model runs/main --limit 100

The held-out conversations come from `idefix.demo.scenes` with a seed the training never uses. Answers are
produced by `answer(messages)`, greedy; today it wraps transformers' `generate`, and any engine with the same
signature (messages in, answer text out) can be plugged in instead via `evaluate(answer, ...)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idefix.demo import scenes  # noqa: E402
from idefix.demo.evaluate import held_out, questions, score, table  # noqa: E402

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


def evaluate(answer: Answer, examples: list[scenes.Example], show_errors: int = 0) -> dict[str, list[int]]:
    """Per kind: [correct, total], answering one example at a time with `answer`."""
    return score(examples, [answer(questions(example)[0]) for example in examples], show_errors)


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
