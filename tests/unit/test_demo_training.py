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


def test_a_run_that_grows_the_text_model_writes_a_deeper_model_idefix_loads(tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, str(ROOT / "demo" / "train.py"), "--steps", "4", "--vision-steps", "1", "--batch", "2"]
    command += ["--grow-at", "0.5", "--grow-layers", "2", "--hard", "0.5", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2: text model grown to 5 layers" in result.stdout
    model = load(str(out), progress=False)
    assert model.model.config.text.num_hidden_layers == 5
    answer = generate(Engine(model), [{"role": "user", "content": "What shape is shown?"}])
    assert answer.usage.completion_tokens >= 1


def test_grown_layers_start_as_the_identity() -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config.from_pretrained(ROOT / "idefix" / "demo" / "model")
    model = Idefics3ForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        added = train.deepen(model, 2)
        after = model(input_ids=ids).logits
    assert len(model.model.text_model.layers) == config.text_config.num_hidden_layers == 5
    assert added and all(p.requires_grad for p in added)
    assert torch.equal(before, after)


def test_hard_turns_ask_binding_questions_with_the_right_answers() -> None:
    objects = (
        scenes.Obj("circle", "red", 0, 0, scenes.SIZES[1]),
        scenes.Obj("square", "green", 0, 2, scenes.SIZES[1]),
        scenes.Obj("circle", "green", 2, 2, scenes.SIZES[0]),
    )
    scene = scenes.Scene(128, 128, "white", None, objects)
    present = {(o.colour, o.shape) for o in objects}
    rng = random.Random(0)
    turns = [t for t in (train.hard_turn(rng, scene) for _ in range(300)) if t]
    assert len(turns) > 200
    for question, answer in turns:
        if question.startswith("Is there a "):
            colour, shape = question.removeprefix("Is there a ").rstrip("?").split()
            assert answer == ("yes" if (colour, shape) in present else "no")
        else:
            colour, shape = question.removeprefix("Where is the ").rstrip("?").split()
            (obj,) = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
            assert answer == scenes.position_name(obj)
    # Every "no" is a case a shape-only reader gets wrong: it names a shape drawn in the scene, in another colour.
    noes = [q for q, a in turns if a == "no"]
    assert noes and all(q.endswith(("circle?", "square?")) for q in noes)


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
    targets = train.retrieval_targets(ids, answers, examples, processor.image_token_id, train.colour_tokens(tok))
    global_tile = (ids[0] == processor.image_token_id).nonzero().flatten()[-16:]
    # The position answer, the description's two objects (at their colour words) and the circle's colour; not
    # the "no", the count, nor the two-image question.
    expected = [(" bottom", 12), (" blue", 3), (" red", 12), (" blue", 3)]
    assert [(tok.decode(ids[b, query + 1]), keys.tolist()) for b, query, keys in targets] == [
        (word, [int(global_tile[token])]) for word, token in expected
    ]
    assert all(b == 0 for b, _, _ in targets)


def test_a_run_on_a_trained_tower_with_the_retrieval_loss_writes_a_model_idefix_loads(tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, str(ROOT / "demo" / "train.py"), "--steps", "3", "--batch", "4", "--log-every", "1"]
    command += ["--tower", str(ROOT / "idefix" / "demo" / "model"), "--retrieval", "0.3", "--out", str(out)]
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
