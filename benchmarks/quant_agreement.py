"""How far ISQ moves a model's next-token choices: greedy top-1 agreement with the unquantized model.

    python -m benchmarks.quant_agreement --random-shape smolvlm-256m --isq Q8_0 Q6K Q4K
    python -m benchmarks.quant_agreement -m HuggingFaceTB/SmolVLM-256M-Instruct --isq Q8_0

The unquantized model (fp32) answers each prompt greedily (`--tokens` new tokens, EOS ignored); then every model
reads that same conversation, teacher-forced (the prompt up to the image in one pass, as it is prefilled, then
token by token, as decode reads it), and at each position after the image its most likely next token is
compared with the unquantized model's. Prompts: an image (random pixels, one per prompt) plus a question.
Random-weight checkpoints have nearly flat next-token distributions (N(0, 0.02) weights), so a tiny change can
flip a near-tie: the table also gives the share of positions whose top-2 margin is below 0.1 logit, where
disagreement is expected to concentrate. A second row per type runs the same quantized weights through plain
dequantize-then-matmul in fp32 (no fast kernel): the agreement the GGML format itself allows, so that the gap
between the two rows is what idefix's decode kernels cost.
"""

from __future__ import annotations

import argparse
from unittest import mock

import numpy as np
import torch
from PIL import Image

from idefix.bench.checkpoint import random_checkpoint
from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import LoadedModel, load
from idefix.model.attention import AttentionBatch
from idefix.request import PreparedPrompt
from idefix.sampling import SamplingParams

QUESTIONS = ["Describe this image in detail.", "What colours do you see?", "Is there any text in the picture?"]


def prompt_logits(
    loaded: LoadedModel, prompt: PreparedPrompt, token_ids: list[int], decode_from: int | None = None
) -> torch.Tensor:
    """Logits [len(token_ids), vocab] for `token_ids` (prompt.images encoded first): the positions before
    `decode_from` (default: all of them) read in one pass, as a prompt is prefilled, and the rest one token at a
    time, as decode reads them (so that decode's kernels are the ones measured there)."""
    model, ids = loaded.model, torch.tensor(token_ids)
    split = len(ids) if decode_from is None else decode_from
    with torch.inference_mode():
        features = None
        if prompt.images is not None:
            features = model.encode_images(prompt.images.pixel_values, prompt.images.pixel_attention_mask)
        cache = model.new_cache(1, len(ids))
        embeds = model.embed(ids, features)
        logits = [model.logits(model(embeds[:split], cache, AttentionBatch.single(0, 0, split)))]
        for j in range(split, len(ids)):
            logits.append(model.logits(model(embeds[j : j + 1], cache, AttentionBatch.single(0, j, 1))))
        return torch.cat(logits).float()


def conversations(reference: LoadedModel, count: int, tokens: int) -> list[tuple[PreparedPrompt, list[int], int]]:
    """(prompt, prompt + greedy answer ids, index of the first text position after the image) per prompt."""
    engine = Engine(reference)
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (384, 384, 3), dtype=np.uint8)
        content = [{"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": QUESTIONS[i % 3]}]
        messages = [{"role": "user", "content": content}]
        prompt = engine.prepare(messages)
        answer = generate(engine, messages, greedy).token_ids
        image_id = reference.model.config.image_token_id
        after_image = max(j for j, t in enumerate(prompt.token_ids) if t == image_id) + 1
        out.append((prompt, [*prompt.token_ids, *answer], after_image))
    return out


def load_quantized(model: str, isq: str, plain: bool) -> LoadedModel:
    """The model under ISQ; `plain`: every QuantLinear on the exact, slow path that non-CPU devices take."""
    if not plain:
        return load(model, dtype="fp32", isq=isq, progress=False)
    with mock.patch("idefix.quant.linear.pick_kernel", lambda *_: "dequant"):
        return load(model, dtype="fp32", isq=isq, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model", help="a checkpoint folder or hub id")
    source.add_argument("--random-shape", help="a random-weight checkpoint of this shape (idefix.bench.checkpoint)")
    parser.add_argument("--isq", nargs="+", default=["Q8_0", "Q6K", "Q4K"])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or str(random_checkpoint(args.random_shape))
    reference = load(model, dtype="fp32", progress=False)
    convs = conversations(reference, args.prompts, args.tokens)
    expected = [prompt_logits(reference, p, ids, start)[start:] for p, ids, start in convs]
    top2 = [e.topk(2, dim=-1).values for e in expected]
    near_tie = torch.cat([(t[:, 0] - t[:, 1] < 0.1) for t in top2]).float().mean().item()
    positions = sum(len(e) for e in expected)
    print(f"model {model}: {args.prompts} prompts, {positions} positions after the image, fp32 reference")
    print(f"positions whose fp32 top-2 margin is below 0.1 logit: {near_tie:.1%}\n")
    print("| ISQ | top-1 agreement | agreement where the margin is >= 0.1 | max abs logit diff |")
    print("|---|---:|---:|---:|")
    for isq in args.isq:
        for label, plain in [(isq, False), (f"{isq}, dequantize-then-matmul", True)]:
            quant = load_quantized(model, isq, plain)
            same = clear = clear_total = 0
            worst = 0.0
            for (prompt, ids, start), ref, t in zip(convs, expected, top2, strict=True):
                got = prompt_logits(quant, prompt, ids, start)[start:]
                agree = got.argmax(-1) == ref.argmax(-1)
                margin_ok = t[:, 0] - t[:, 1] >= 0.1
                same += int(agree.sum())
                clear += int(agree[margin_ok].sum())
                clear_total += int(margin_ok.sum())
                worst = max(worst, (got - ref).abs().max().item())
            print(f"| {label} | {same / positions:.2%} | {clear / max(clear_total, 1):.2%} | {worst:.3f} |")
            del quant


if __name__ == "__main__":
    main()
