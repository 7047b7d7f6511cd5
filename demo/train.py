"""Train the tiny Idefics3 demo model that ships in idefix/demo/model/.

    python demo/train.py                          # the shipped model's recipe: seeded, step-based, ~1-2 hours
    python demo/train.py --tower idefix/demo/model --out runs/again   # its stage 2 alone, on the shipped tower
    python demo/train.py --steps 200 --out runs/smoke

Builds the tokenizer and processor files first, then trains `transformers.Idefics3ForConditionalGeneration`
in two stages: the vision tower and connector alone on global tiles against demo/probe.py's targets
(`--vision-steps`, `--vision-lr`), then, with them frozen, the text model on conversations from
`idefix.demo.scenes`, encoded by the saved processor exactly as at inference time, with the loss on the
assistant answers and their `<end_of_utterance>` only (`--lr`, `--turns`). `--tower DIR` takes the vision tower
and connector of a trained model instead of stage 1 (stage 2 draws its own data stream, so on the tower that
stage 1 of the same command makes it trains what that command does).

`--retrieval W` adds W x -log of the attention that one text-model head (RETRIEVAL_HEAD) puts, from the position
that writes an answer, on the global-tile tokens of the objects the question names ("Where is the red star?",
"What colour is the circle?", each object of a description). Without it the text model learned to find an object
by its colour and shape late, and only in some runs (idefix/demo/model/README.md).

`--comparison W` does the same for another head (COMPARISON_HEAD), from the answer of "Which image has more
circles?" to every circle of both images; with it two-image questions went from 86.5% to 98.5%. `--two-turns N`
(off by default) asks each two-image conversation up to N more comparisons; both runs with `--two-turns 2` lost
the questions that bind a colour to a shape (presence 78-79%; idefix/demo/model/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoProcessor, Idefics3Config, Idefics3ForConditionalGeneration

# Runs from a checkout without installing: the repo root for `idefix`, this folder for `build`.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import build  # noqa: E402
import probe  # noqa: E402

from idefix.demo import scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The text model's (layer, head) that `--retrieval` teaches to attend from a question's answer to the object it
# names; layer 1 is the first whose queries can already hold the question's words, and one layer is left after it.
RETRIEVAL_HEAD = (1, 0)
# The head that `--comparison` teaches to attend from a two-image question's answer to every object of the compared
# shape in both images: in the other key group (2 key heads for 4), leaving RETRIEVAL_HEAD's keys to find objects
# by colour and shape together (whether sharing one head would hurt was only measured with --two-turns).
COMPARISON_HEAD = (1, 2)
# Counting and comparing are the hardest skills for a tiny model, so they get more of the data.
KIND_WEIGHTS = {
    "shape": 1,
    "colour": 1,
    "count": 3,
    "position": 1.5,
    "presence": 1.5,
    "colour_of_shape": 1.5,
    "describe": 1.5,
    "two_image": 2.5,
    "multi_turn": 1.5,
}


def answer_mask(input_ids: torch.Tensor, assistant: list[int], eos: int) -> torch.Tensor:
    """True on the tokens after each "Assistant:" up to and including the next <end_of_utterance>."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    n = len(assistant)
    for b, row in enumerate(input_ids.tolist()):
        inside = False
        for i, tok in enumerate(row):
            if inside:
                mask[b, i] = True
                inside = tok != eos
            elif i >= n and row[i - n + 1 : i + 1] == assistant:
                inside = True
    return mask


def referents(scene: scenes.Scene, turns: tuple[tuple[str, str], ...]) -> list[list[scenes.Obj]]:
    """For each turn, the objects its question names (by colour and shape, by a shape drawn once, or by "it"
    for the previous question's; every object, in reading order, for a description), or none: counts,
    one-attribute and background questions, and a "no"."""
    found: list[list[scenes.Obj]] = []
    for question, _ in turns:
        if question.endswith(" it?"):
            named = found[-1] if found else []
        elif m := re.fullmatch(r"(?:Where is the|Is there a) (\w+) (\w+)\?", question):
            named = [o for o in scene.objects if (o.colour, o.shape) == m.groups()]
        elif m := re.fullmatch(r"What colour is the (\w+)\?", question):
            named = [o for o in scene.objects if o.shape == m[1] or m[1] == "shape"]
        elif question in ("What shape is shown?", "Describe the image."):
            named = scenes.reading_order(scene)
        else:
            named = []
        found.append(named)
    return found


def colour_tokens(tokenizer) -> set[int]:
    """The token ids of the colour words as answers spell them (" red")."""
    ids = set()
    for colour in scenes.COLOURS:
        (token,) = tokenizer.encode(f" {colour}", add_special_tokens=False)
        ids.add(token)
    return ids


def global_tiles(row: torch.Tensor, marker: int) -> list[torch.Tensor]:
    """The positions of each image's global-tile tokens in one prompt: the IMAGE_SEQ_LEN after each `marker`
    (the <global-img> token)."""
    return [start + 1 + torch.arange(build.IMAGE_SEQ_LEN) for start in (row == marker).nonzero().flatten()]


def retrieval_targets(
    input_ids: torch.Tensor, answers: torch.Tensor, examples: list[scenes.Example], marker: int, colours: set[int]
) -> list[tuple[int, tuple[int, int], int, torch.Tensor]]:
    """(row, head, query, keys): for every answer (`answers`: answer_mask) whose question names objects, the position
    that writes the answer's first token, and the global-tile tokens (`global_tiles`) that hold those objects'
    centres, where demo/probe.py taught the tower to describe them, for RETRIEVAL_HEAD. A comparison of two
    images names every object of its shape in both, from the position that writes "first" or "second", for
    COMPARISON_HEAD. A description gets one per object instead: the position that writes its colour word (one of
    the token ids `colours`) and its token."""
    side = math.isqrt(build.IMAGE_SEQ_LEN)
    targets = []
    for b, example in enumerate(examples):
        tiles = global_tiles(input_ids[b], marker)
        zero = torch.zeros(1, dtype=torch.int)
        edges = torch.diff(answers[b].int(), prepend=zero, append=zero)
        spans = list(zip(*(x.nonzero().flatten().tolist() for x in (edges == 1, edges == -1)), strict=True))
        if len(example.scenes) == 2:
            for (question, _), (start, _) in zip(example.turns, spans, strict=True):
                shape = scenes.compared_shape(question)
                keys = [
                    int(tile[probe.centre_token(o, side)])
                    for tile, scene in zip(tiles, example.scenes, strict=True)
                    for o in scene.objects
                    if o.shape == shape
                ]
                targets.append((b, COMPARISON_HEAD, start, torch.tensor(keys)))
            continue
        for (question, _), named, (start, end) in zip(
            example.turns, referents(example.scenes[0], example.turns), spans, strict=True
        ):
            if question == "Describe the image.":
                words = [i for i in range(start, end) if int(input_ids[b, i]) in colours]
                queries = [(i - 1, [o]) for i, o in zip(words, named, strict=False)]
            else:
                queries = [(start - 1, named)] if named else []
            for query, objects in queries:
                targets.append((b, RETRIEVAL_HEAD, query, tiles[0][[probe.centre_token(o, side) for o in objects]]))
    return targets


def comparison_turns(
    rng: random.Random, pair: tuple[scenes.Scene, ...], asked: str, turns: int
) -> list[tuple[str, str]]:
    """Up to `turns` more "Which image has more ...?" questions about `pair`, on shapes other than `asked` whose
    counts differ between the two images."""
    shapes = [s for s in scenes.SHAPES if s != asked and pair[0].count(s) != pair[1].count(s)]
    return [scenes.comparison(pair, s) for s in rng.sample(shapes, min(turns, len(shapes)))]


def training_example(rng: random.Random, kinds: list[str], turns: int, two_turns: int) -> scenes.Example:
    """An example of a random kind; the single-image ones get `turns` extra questions about the same image,
    so that one image (80 tokens) feeds several answers (~14 tokens each), two-image ones up to `two_turns` more
    comparisons (`comparison_turns`)."""
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    example = scenes.make_example(rng, kind)
    if kind == "two_image" and two_turns:
        ((question, _),) = example.turns
        extra_two = comparison_turns(rng, example.scenes, scenes.compared_shape(question), two_turns)
        example = scenes.Example(kind, example.scenes, example.turns + tuple(extra_two))
    if kind in scenes.KINDS and turns:
        extra = [scenes.extra_turn(rng, example.scenes[0]) for _ in range(turns)]
        example = scenes.Example(kind, example.scenes, example.turns + tuple(extra))
    return example


def edge_stem(patch_embedding: torch.nn.Conv2d, seed: int) -> None:
    """Start the vision tower's patch embedding as oriented step-edge filters (16 directions x 4 offsets,
    on all colour channels alike) plus random flat colour filters. With the default N(0, 0.02) start the
    tower saw colours but no shapes for 2500 steps; with this stem shape accuracy left chance within 300.
    The filters are only a starting point: they are trained like every other weight."""
    out_channels, _, size, _ = patch_embedding.weight.shape
    weight = torch.zeros_like(patch_embedding.weight)
    centre = torch.arange(size) - (size - 1) / 2
    y, x = torch.meshgrid(centre, centre, indexing="ij")
    edges = [(direction, offset) for direction in range(16) for offset in (-0.3, -0.1, 0.1, 0.3)]
    for k, (direction, offset) in enumerate(edges[:out_channels]):
        angle = direction * math.pi / 8
        step = torch.tanh((x * math.cos(angle) + y * math.sin(angle) - offset * size) * 1.5)
        weight[k] = step / step.norm() / math.sqrt(3)
    generator = torch.Generator().manual_seed(seed)
    for k in range(len(edges), out_channels):
        weight[k] = torch.randn(3, 1, 1, generator=generator).expand(3, size, size) / size / math.sqrt(3)
    with torch.no_grad():
        patch_embedding.weight.copy_(weight)
        if patch_embedding.bias is not None:
            patch_embedding.bias.zero_()


def sincos_positions(embedding: torch.nn.Embedding) -> None:
    """Start the patch position embeddings as 2-D sine/cosine codes of (row, column), so that attention can
    tell near patches from far ones from the first step (N(0, 0.02) vectors carry no layout; measured: 50%
    shape accuracy came after 1300 steps instead of 1800)."""
    count, dim = embedding.weight.shape
    side, quarter = math.isqrt(count), dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")

    def code(values: torch.Tensor) -> torch.Tensor:
        angles = values.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    with torch.no_grad():
        embedding.weight.copy_(torch.cat([code(rows), code(cols)], dim=1))


def init_vision(model: Idefics3ForConditionalGeneration, seed: int) -> None:
    """The vision tower's start: an edge-filter stem, sine/cosine positions and Xavier-uniform encoder matrices.
    transformers' N(0, 0.02) leaves a 128-wide tower almost linear (GELU inputs ~0.2), and it never learned
    shapes here."""
    vision = model.model.vision_model
    edge_stem(vision.embeddings.patch_embedding, seed)
    sincos_positions(vision.embeddings.position_embedding)
    for module in vision.encoder.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)


def vision_batch(processor, rng: random.Random, size: int) -> tuple[torch.Tensor, list[scenes.Scene]]:
    """Global tiles ([size, 3, tile, tile]) of random scenes with 1-6 objects, and the scenes."""
    shapes = [[rng.choice(scenes.SHAPES) for _ in range(rng.randint(1, 6))] for _ in range(size)]
    scene_list = [scenes.random_scene(rng, s) for s in shapes]
    pixels = processor.image_processor([[scenes.render(s)] for s in scene_list], return_tensors="pt")["pixel_values"]
    return probe.global_tiles(pixels[probe.real_tiles(pixels)], pixels), scene_list


def train_vision(model, head: probe.GlobalTileProbe, optim, processor, rng: random.Random, args) -> None:
    """Stage 1: the vision tower and connector alone, on global tiles, against the probe's targets only. It is
    cheap (one tile per image, no text model) and leaves the text model an image that already says what is in it."""
    vision, connector, side = model.model.vision_model, model.model.connector, math.isqrt(build.IMAGE_SEQ_LEN)
    start, losses = time.time(), []
    for step in range(args.vision_steps):
        for group in optim.param_groups:
            group["lr"] = args.vision_lr * min(1.0, (step + 1) / args.warmup)
        pixels, scene_list = vision_batch(processor, rng, args.batch)
        features = connector(vision(pixel_values=pixels).last_hidden_state)
        loss = head(features, probe.targets(scene_list, build.TILE, side))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            recent = sum(losses[-args.log_every :]) / args.log_every
            print(f"vision step {step + 1} probe loss {recent:.4f} elapsed {time.time() - start:.0f}s", flush=True)


def make_batch(
    processor,
    rng: random.Random,
    size: int,
    assistant: list[int],
    eos: int,
    turns: int,
    two_turns: int,
) -> tuple[dict, list[tuple[int, tuple[int, int], int, torch.Tensor]]]:
    """A batch of conversations for the model (labels on the answers only) and its retrieval_targets."""
    # Two-image conversations are twice as long; batching them apart keeps padding small.
    two = rng.random() < KIND_WEIGHTS["two_image"] / sum(KIND_WEIGHTS.values())
    kinds = ["two_image"] if two else [k for k in KIND_WEIGHTS if k != "two_image"]
    examples = [training_example(rng, kinds, turns, two_turns) for _ in range(size)]
    texts = [processor.apply_chat_template(scenes.to_messages(e)) for e in examples]
    images = [[scenes.render(s) for s in e.scenes] for e in examples]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    answers = answer_mask(batch["input_ids"], assistant, eos)
    colours = colour_tokens(processor.tokenizer)
    marker = processor.tokenizer.convert_tokens_to_ids("<global-img>")
    targets = retrieval_targets(batch["input_ids"], answers, examples, marker, colours)
    return {**batch, "labels": batch["input_ids"].masked_fill(~answers, -100)}, targets


def text_step(
    model: nn.Module,
    batch: dict,
    params: list[nn.Parameter],
    optim: torch.optim.Optimizer,
    targets: list[tuple[int, tuple[int, int], int, torch.Tensor]] | None = None,
    weights: dict[tuple[int, int], float] | None = None,
) -> tuple[float, float]:
    """One optimizer step on a conversation batch (gradients clipped to norm 1). For each (layer, head) with a
    weight in `weights`, the loss adds that weight x the mean over its targets (retrieval_targets) of -log of the
    attention it puts on the target's keys (the model must run eager attention). Returns the answer loss and the
    mean of those attentions (0 without targets)."""
    weights = weights or {}
    heads = {h: [t for t in targets or [] if t[1] == h] for h, w in weights.items() if w}
    out = model(**batch, output_attentions=any(heads.values()))
    loss, shares = out.loss, []
    for (layer, head), chosen in heads.items():
        if chosen:
            found = torch.stack([out.attentions[layer][b, head, query, keys].sum() for b, _, query, keys in chosen])
            loss = loss - weights[layer, head] * (found + 1e-6).log().mean()
            shares.append(found)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return out.loss.item(), torch.cat(shares).mean().item() if shares else 0.0


def lr_at(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to zero as `progress` goes from 0 to 1."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def progress_at(step: int, args: argparse.Namespace, elapsed: float) -> float:
    # With --minutes the schedule follows the wall clock, so that on a shared, unevenly loaded machine the
    # run still ends annealed on time; without it the run is step-based and bit-for-bit reproducible.
    return elapsed / (60 * args.minutes) if args.minutes else step / args.steps


def save_weights(model: Idefics3ForConditionalGeneration, out: Path) -> None:
    # Plain safetensors with the hub's tensor names; save_pretrained would rewrite config.json in the
    # transformers-5 layout, and the shipped folder keeps the hub-era one.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def vision_optimizer(model: Idefics3ForConditionalGeneration, head: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Stage 1: AdamW on the vision tower, the connector and the probe, with weight decay on matrices only
    (not on embeddings, norms or the training-only probe)."""
    named = [*model.model.vision_model.named_parameters(), *model.model.connector.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay + list(head.parameters())}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def text_optimizer(
    model: Idefics3ForConditionalGeneration, lr: float
) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """Stage 2: freezes the vision tower and connector; AdamW (no weight decay) on everything else, and those
    parameters."""
    model.model.vision_model.requires_grad_(False)
    model.model.connector.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    build.build_folder(out, args.seed)
    processor = AutoProcessor.from_pretrained(out)
    config = Idefics3Config.from_pretrained(out)
    model = Idefics3ForConditionalGeneration(config)
    init_vision(model, args.seed)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    tok = processor.tokenizer
    assistant = tok.encode("Assistant:", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids(build.EOS)
    head = probe.GlobalTileProbe(model.config.text_config.hidden_size)
    model.train()
    start = time.time()
    if args.tower:
        trained = Idefics3ForConditionalGeneration.from_pretrained(args.tower).model
        model.model.vision_model.load_state_dict(trained.vision_model.state_dict())
        model.model.connector.load_state_dict(trained.connector.state_dict())
        print(f"vision tower and connector from {args.tower}; stage 1 skipped", flush=True)
    else:
        optim = vision_optimizer(model, head, args.vision_lr)
        train_vision(model, head, optim, processor, random.Random(args.seed), args)
    # Stage 2 trains the text model alone, on what the finished tower shows it. At the stage-1 rate (1.5e-3)
    # it never learned the questions that bind a colour to a shape (presence, colour of a shape, position
    # stayed at chance after 235k conversations, measured); at 5e-4 they came within 100k.
    params, optim = text_optimizer(model, args.lr)
    if args.retrieval or args.comparison:
        # Eager attention returns the attention weights that the attention losses train (it computes the same as
        # "sdpa"); the tower keeps "sdpa", as stage 1 trained the shipped one (eager there changes its rounding).
        model.model.text_model.set_attn_implementation("eager")
    # Its own data stream, so that stage 2 on a --tower from stage 1 of the same command is that command's.
    rng = random.Random(args.seed + 1)
    weights = {RETRIEVAL_HEAD: args.retrieval, COMPARISON_HEAD: args.comparison}
    losses: list[float] = []
    found: list[float] = []
    step = 0
    while (progress := progress_at(step, args, time.time() - start)) < 1.0:
        batch, targets = make_batch(processor, rng, args.batch, assistant, eos, args.turns, args.two_turns)
        for group in optim.param_groups:
            group["lr"] = lr_at(progress, step, args.lr, args.warmup)
        loss, share = text_step(model, batch, params, optim, targets, weights)
        losses.append(loss)
        found.append(share)
        step += 1
        if step % args.log_every == 0:
            recent, share = (sum(x[-args.log_every :]) / args.log_every for x in (losses, found))
            elapsed = time.time() - start
            print(
                f"step {step} loss {recent:.4f} retrieval {share:.3f} lr {group['lr']:.2e} elapsed {elapsed:.0f}s",
                flush=True,
            )
        if step % args.save_every == 0:
            save_weights(model, out)
    save_weights(model, out)
    vision_steps = 0 if args.tower else args.vision_steps
    summary = {"vision_steps": vision_steps, "steps": step, "seconds": round(time.time() - start)}
    print(json.dumps({**summary, "final_loss": losses[-1] if losses else None}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7500, help="the schedule's length, unless --minutes is given")
    parser.add_argument("--out", default=str(ROOT / "idefix" / "demo" / "model"))
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget; anneal by time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="stage 2 (the text model)")
    parser.add_argument("--vision-lr", type=float, default=1.5e-3, help="stage 1 (the vision tower)")
    parser.add_argument("--turns", type=int, default=6, help="extra questions per single-image conversation")
    parser.add_argument(
        "--comparison", type=float, default=0.3, help="weight of the loss teaching COMPARISON_HEAD the compared shapes"
    )
    parser.add_argument("--two-turns", type=int, default=0, help="most extra comparisons per two-image conversation")
    parser.add_argument(
        "--retrieval", type=float, default=0.3, help="weight of the loss teaching RETRIEVAL_HEAD the named objects"
    )
    parser.add_argument("--tower", default=None, help="a trained model whose vision tower to reuse (skips stage 1)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--vision-steps", type=int, default=10000, help="stage 1: the vision tower alone, first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=100)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
