"""Whether a demo model finds an object by its colour and shape: where the text model's attention goes when it
answers "Where is the red star?", on held-out position questions.

    python demo/retrieval_check.py                      # the shipped model, 72 questions
    python demo/retrieval_check.py --model runs/main --count 200

For every layer and head, the attention of the position that writes the answer's first token, averaged over
questions whose first answer token is right and over those where it is wrong: on the named object's centre
token in the global tile (where demo/probe.py taught the tower to describe that object; 1/16 would be an even
spread over the global tile), on the other objects' centre tokens, on the whole global tile and on the local
tiles. A head that puts far more than 1/16 on the named object is one that retrieves it; the shipped model has
one, and a run with none had not learned to locate objects (idefix/demo/model/README.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import AutoProcessor, Idefics3ForConditionalGeneration

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import build  # noqa: E402
import probe  # noqa: E402

from idefix.demo import scenes  # noqa: E402
from idefix.demo.evaluate import held_out  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLACES = ("named object", "other objects", "global tile", "local tiles")


def attention_shares(model, processor, example: scenes.Example) -> tuple[bool, torch.Tensor]:
    """Whether the greedy first answer token is right, and [layers, heads, PLACES] attention shares."""
    scene, (question, answer) = example.scenes[0], example.turns[0]
    named = next(o for o in scene.objects if question == f"Where is the {o.colour} {o.shape}?")
    text = processor.apply_chat_template(scenes.to_messages(example, upto=1), add_generation_prompt=True)
    batch = processor(text=[text], images=[[scenes.render(scene)]], return_tensors="pt")
    images = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    global_tile = images[-build.IMAGE_SEQ_LEN :]  # the global tile comes last
    side = math.isqrt(build.IMAGE_SEQ_LEN)
    others = [global_tile[probe.centre_token(o, side)] for o in scene.objects if o is not named]
    places = [[global_tile[probe.centre_token(named, side)]], others, global_tile, images[: -build.IMAGE_SEQ_LEN]]
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    first = processor.tokenizer.decode(out.logits[0, -1].argmax()).strip()
    last = torch.stack(out.attentions)[:, 0, :, -1]  # [layers, heads, keys]
    shares = torch.stack([last[..., torch.as_tensor(place, dtype=torch.long)].sum(-1) for place in places], -1)
    return bool(first) and answer.startswith(first), shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "idefix" / "demo" / "model"))
    parser.add_argument("--count", type=int, default=72, help="held-out position questions")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Idefics3ForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
    examples = [e for e in held_out(args.seed, len(scenes.KINDS) * args.count, 0, 0) if e.kind == "position"]
    results: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for example in examples:
        right, shares = attention_shares(model, processor, example)
        results[right].append(shares)
    print("| answer | layer | head | " + " | ".join(PLACES) + " |")
    print("|---|---:|---:|" + "---:|" * len(PLACES))
    for right, rows in results.items():
        if not rows:
            continue
        mean = torch.stack(rows).mean(0)
        label = f"right ({len(rows)})" if right else f"wrong ({len(rows)})"
        for layer, heads in enumerate(mean.tolist()):
            for head, shares in enumerate(heads):
                print(f"| {label} | {layer} | {head} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
