"""The demo model's training script runs end to end (a few steps), and its training-only pieces are right:
the probe's targets line up with the global tile's tokens, the edge stem is what it says, and the retrieval
check reads attention where it says."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoProcessor, Idefics3ForConditionalGeneration

from idefix.demo import scenes
from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "demo"))
import probe  # noqa: E402
import retrieval_check  # noqa: E402
import train  # noqa: E402


def test_a_short_training_run_writes_a_model_idefix_loads(tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, str(ROOT / "demo" / "train.py"), "--steps", "3", "--vision-steps", "2", "--batch", "2"]
    command += ["--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"steps": 3' in result.stdout
    engine = Engine(load(str(out), progress=False))
    answer = generate(engine, [{"role": "user", "content": "What shape is shown?"}])
    assert answer.usage.completion_tokens >= 1


def test_probe_targets_line_up_with_the_global_tile() -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ROOT / "idefix" / "demo" / "model")
    objects = (
        scenes.Obj("circle", "red", 0, 0, scenes.SIZES[1]),
        scenes.Obj("square", "green", 1, 1, scenes.SIZES[1]),
        scenes.Obj("circle", "blue", 2, 2, scenes.SIZES[0]),
    )
    wide, square = scenes.Scene(192, 96, "black", None, objects), scenes.Scene(128, 128, "white", 7, objects[:1])
    pixels = processor.image_processor([[scenes.render(wide)], [scenes.render(square)]], return_tensors="pt")
    # The wide image has 2 tiles + global, the square one 4 + global: the probe must read each one's last tile.
    tiles = torch.arange(8 * 16).view(8, 16, 1).float()
    chosen = probe.global_tiles(tiles[:8], pixels["pixel_values"])
    assert torch.equal(chosen, tiles[[2, 7]])
    targets = probe.targets([wide, square], tile=64, side=4)
    # Cells (row, col) (0, 0), (1, 1), (2, 2) have their centres in tokens (0, 0), (2, 2), (3, 3) of the 4x4 grid.
    centres = targets["centre_shape"][0]
    assert centres.nonzero().flatten().tolist() == [0, 10, 15]
    assert centres[[0, 10, 15]].tolist() == [scenes.SHAPES.index(s) + 1 for s in ("circle", "square", "circle")]
    assert targets["counts"][0].tolist() == [2, 1, 0, 0, 0] and targets["bg"].tolist() == [2, 1]
    assert targets["cells"][0].sum() == 3 and targets["cells"][1].sum() == 1
    # Where the processor's global tile shows green, the cover target says "green" (up to resampling edges).
    global_tile = pixels["pixel_values"][0, 2] * 0.5 + 0.5  # un-normalise: mean 0.5, std 0.5
    green = torch.tensor(scenes.COLOURS["green"]) / 255
    is_green = ((global_tile - green[:, None, None]).abs().amax(0) < 0.05).float()
    seen = torch.nn.functional.avg_pool2d(is_green[None], 16).flatten()
    target = targets["cover_colour"][0, :, list(scenes.COLOURS).index("green") + 1]
    assert (seen - target).abs().max() < 0.1 and target.max() > 0.1
    assert torch.allclose(targets["cover_shape"].sum(-1), torch.ones(2, 16))


def test_edge_stem_filters_are_unit_edges_and_flat_colours() -> None:
    conv = torch.nn.Conv2d(3, 128, 8, 8)
    train.edge_stem(conv, seed=0)
    w = conv.weight.detach()
    edges = w[:64].flatten(1)
    assert torch.allclose(edges.norm(dim=1), torch.ones(64), atol=1e-5)  # unit norm over the 3 x 8 x 8 inputs
    assert torch.allclose(w[:64, 0], w[:64, 1]) and torch.allclose(w[:64, 1], w[:64, 2])  # colour-blind edges
    assert torch.allclose(w[64:].amax(dim=(2, 3)), w[64:].amin(dim=(2, 3)))  # flat colour filters
    assert conv.bias is not None and not conv.bias.any()


def test_two_image_conversations_get_more_comparisons_with_the_right_answers() -> None:
    def scene(*shapes: str) -> scenes.Scene:
        return scenes.Scene(96, 96, "white", None, tuple(scenes.Obj(s, "red", 1, 1, scenes.SIZES[0]) for s in shapes))

    # Circles 2 vs 1 (the question asked), squares 0 vs 2, stars 1 vs 0, crosses 1 vs 1 (no winner: never asked).
    pair = (scene("circle", "circle", "star", "cross"), scene("circle", "square", "square", "cross"))
    rng = random.Random(0)
    asked = [dict(train.comparison_turns(rng, pair, "circle", 3)) for _ in range(20)]
    assert all(
        turns == {"Which image has more squares?": "the second", "Which image has more stars?": "the first"}
        for turns in asked
    )
    assert {len(train.comparison_turns(rng, pair, "circle", 1)) for _ in range(20)} == {1}
    # Through training_example: the asked comparison first, then up to two more, none repeated.
    for _ in range(50):
        example = train.training_example(rng, ["two_image"], 6, 2)
        questions = [q for q, _ in example.turns]
        assert 1 <= len(questions) <= 3 and len(set(questions)) == len(questions)
        assert all(q.startswith("Which image has more ") for q in questions)


def test_retrieval_check_reads_the_global_tile_at_the_named_objects_token() -> None:
    model_dir = ROOT / "idefix" / "demo" / "model"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    named = scenes.Obj("star", "red", 2, 0, scenes.SIZES[1])
    other = scenes.Obj("circle", "blue", 0, 2, scenes.SIZES[1])
    scene = scenes.Scene(128, 128, "grey", None, (other, named))
    example = scenes.Example("position", (scene,), (("Where is the red star?", "bottom left"),))
    _, shares = retrieval_check.attention_shares(model, processor, example)
    config = model.config.text_config
    assert shares.shape == (config.num_hidden_layers, config.num_attention_heads, len(retrieval_check.PLACES))
    named_share, others, global_tile, local_tiles = shares.unbind(-1)
    # The named object's and the other object's tokens are two different tokens of the global tile.
    assert torch.all(named_share + others <= global_tile + 1e-6)
    assert torch.all(global_tile + local_tiles <= 1 + 1e-6)
    # The centre of cell (2, 0) lies in token (3, 0) of the 4x4 grid: the probe's own index, checked here apart.
    assert probe.centre_token(named, 4) == 12 and probe.centre_token(other, 4) == 3


def test_retrieval_targets_point_each_answer_at_the_tokens_of_the_objects_it_names() -> None:
    processor = AutoProcessor.from_pretrained(ROOT / "idefix" / "demo" / "model")
    tok = processor.tokenizer
    star = scenes.Obj("star", "red", 2, 0, scenes.SIZES[1])  # centre in token (3, 0) of the 4x4 global tile
    circle = scenes.Obj("circle", "blue", 0, 2, scenes.SIZES[1])  # token (0, 3)
    scene = scenes.Scene(128, 96, "grey", None, (star, circle))
    turns = (
        ("Where is the red star?", "bottom left"),
        ("Is there a blue star?", "no"),
        ("Describe the image.", "A blue circle and a red star on a grey background."),
        ("How many stars are there?", "1"),
        ("What colour is the circle?", "blue"),
    )
    examples = [
        scenes.Example("position", (scene,), turns),
        scenes.Example("two_image", (scene, scene), (("Which image has more stars?", "the first"),)),
    ]
    texts = [processor.apply_chat_template(scenes.to_messages(e)) for e in examples]
    images = [[scenes.render(s) for s in e.scenes] for e in examples]
    ids = processor(text=texts, images=images, padding=True, return_tensors="pt")["input_ids"]
    answers = train.answer_mask(
        ids, tok.encode("Assistant:", add_special_tokens=False), tok.convert_tokens_to_ids("<end_of_utterance>")
    )
    marker = tok.convert_tokens_to_ids("<global-img>")
    targets = train.retrieval_targets(ids, answers, examples, marker, train.colour_tokens(tok))
    image = (ids == processor.image_token_id).nonzero().tolist()
    # An image's global tile is its last 16 image tokens; row 1 shows the same image twice.
    tokens = {b: [i for row, i in image if row == b] for b in (0, 1)}
    half = len(tokens[1]) // 2
    first, second, alone = tokens[1][half - 16 : half], tokens[1][-16:], tokens[0][-16:]
    # The position answer, the description's two objects (at their colour words) and the circle's colour; not
    # the "no" nor the count.
    expected = [(" bottom", [alone[12]]), (" blue", [alone[3]]), (" red", [alone[12]]), (" blue", [alone[3]])]
    assert [(tok.decode(ids[b, query + 1]), keys.tolist()) for b, _, query, keys in targets if b == 0] == expected
    assert all(head == train.RETRIEVAL_HEAD for b, head, _, _ in targets if b == 0)
    # The comparison names the star in both images' global tiles, from the position that writes "first".
    ((b, head, query, keys),) = [t for t in targets if t[0] == 1]
    assert head == train.COMPARISON_HEAD
    assert tok.decode(ids[1, query + 1]) == " first"
    assert keys.tolist() == [first[12], second[12]]


def test_a_run_on_a_trained_tower_with_the_retrieval_loss_writes_a_model_idefix_loads(tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, str(ROOT / "demo" / "train.py"), "--steps", "3", "--batch", "4", "--log-every", "1"]
    command += ["--tower", str(ROOT / "idefix" / "demo" / "model"), "--retrieval", "0.3", "--out", str(out)]
    command += ["--comparison", "0.3", "--two-turns", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage 1 skipped" in result.stdout and '"vision_steps": 0, "steps": 3' in result.stdout
    # The head's attention on the named objects is logged; batches of single-image conversations have targets.
    shares = [
        float(line.split(" retrieval ")[1].split()[0]) for line in result.stdout.splitlines() if " retrieval " in line
    ]
    assert len(shares) == 3 and all(0 <= s <= 1 for s in shares) and any(s > 0 for s in shares)
    shipped = Idefics3ForConditionalGeneration.from_pretrained(ROOT / "idefix" / "demo" / "model")
    trained = Idefics3ForConditionalGeneration.from_pretrained(out).model.vision_model.state_dict()
    for name, value in shipped.model.vision_model.state_dict().items():
        assert torch.equal(value, trained[name])
    answer = generate(Engine(load(str(out), progress=False)), [{"role": "user", "content": "What shape is shown?"}])
    assert answer.usage.completion_tokens >= 1


def test_text_step_supervises_each_head_on_its_own_targets_only() -> None:
    model_dir = ROOT / "idefix" / "demo" / "model"
    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    assistant, eos = tok.encode("Assistant:", add_special_tokens=False), tok.convert_tokens_to_ids("<end_of_utterance>")
    rng = random.Random(0)
    while True:  # a batch of two-image conversations: comparison targets only
        batch, targets = train.make_batch(processor, rng, 2, assistant, eos, 1, 2)
        if targets and all(head == train.COMPARISON_HEAD for _, head, _, _ in targets):
            break
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager")
    with torch.no_grad():
        attention = model(**batch, output_attentions=True).attentions
    layer, head = train.COMPARISON_HEAD
    expected = torch.stack([attention[layer][b, head, q, keys].sum() for b, _, q, keys in targets]).mean().item()
    params, optim = train.text_optimizer(model, 0.0)  # a zero rate: the step leaves the weights as they were
    _, share = train.text_step(model, batch, params, optim, targets, {train.RETRIEVAL_HEAD: 0.3})
    assert share == 0.0  # no target is RETRIEVAL_HEAD's
    _, share = train.text_step(model, batch, params, optim, targets, {train.COMPARISON_HEAD: 0.3})
    assert abs(share - expected) < 1e-5
