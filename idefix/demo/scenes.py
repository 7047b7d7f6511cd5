"""Seeded synthetic scenes with questions and short canonical answers, for the shipped demo model.

A scene is a few flat shapes laid out on a 3x3 grid: one object per cell, centred in it, upright, in one of
two sizes, so objects never overlap and every object has an unambiguous position name. The fixed placement is
what makes the scenes learnable for the tiny from-scratch vision tower: with objects jittered inside their
cells and rotated, it still could not tell the shapes apart after 2500 steps; centred, it finds 94% of them
in 3000 (the processor's global tile squeezes every image to a square, so each cell lands on the same pixels).
Question templates are few and fixed and every answer is one canonical string, so a tiny model can learn them
and evaluation can use exact match.
Pure Pillow + stdlib: the same code makes the training data, the held-out set and the bundled images.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Backgrounds are neutral so that every object colour except the background's own stays visible.
BACKGROUNDS = {"grey": (128, 128, 128), "white": (250, 250, 250), "black": (15, 15, 15)}
ROW_NAMES, COL_NAMES = ["top", "", "bottom"], ["left", "", "right"]
# Width:height ratios; the wide and tall ones make the processor tile 2x1 / 1x2, the others 2x2.
SIZES = (0.65, 0.9)  # small and large
ASPECTS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (2, 1), (1, 2)]
KINDS = ["shape", "colour", "count", "position", "presence", "colour_of_shape", "describe"]
ALL_KINDS = [*KINDS, "two_image", "multi_turn"]
CROSS = [(-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3), (-1, 1), (-3, 1), (-3, -1), (-1, -1)]


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int  # grid cell, 0..2 top to bottom
    col: int  # grid cell, 0..2 left to right
    scale: float  # size as a fraction of the cell's shorter side: one of SIZES


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    noise_seed: int | None  # None: plain background
    objects: tuple[Obj, ...]

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)


@dataclass(frozen=True)
class Example:
    """One conversation: images in the first user turn, then (question, answer) turns."""

    kind: str
    scenes: tuple[Scene, ...]
    turns: tuple[tuple[str, str], ...]


def position_name(obj: Obj) -> str:
    name = f"{ROW_NAMES[obj.row]} {COL_NAMES[obj.col]}".strip()
    return name or "centre"


def reading_order(scene: Scene) -> list[Obj]:
    """The objects row by row, left to right: the order `describe` names them in."""
    return sorted(scene.objects, key=lambda o: (o.row, o.col))


def describe(scene: Scene) -> str:
    parts = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape}" for o in reading_order(scene)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


# ---------------------------------------------------------------------------------------------- drawing


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        radii, n = [r], 3
    elif kind == "star":
        radii, n = [r, r * 0.45], 10
    else:  # cross: a plus sign with 12 corners; 1 stands for the half bar width a, 3 for the radius r
        a = r * 0.35
        k = {1: a, -1: -a, 3: r, -3: -r}
        return [(cx + k[x], cy + k[y]) for x, y in CROSS]
    step = 2 * math.pi / n
    start = -math.pi / 2  # a corner pointing up
    radius = [radii[i % len(radii)] for i in range(n)]
    return [
        (cx + radius[i] * math.cos(start + i * step), cy + radius[i] * math.sin(start + i * step)) for i in range(n)
    ]


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image; the same scene always gives the same pixels."""
    size = (scene.width, scene.height)
    image = Image.new("RGB", size, BACKGROUNDS[scene.background])
    if scene.noise_seed is not None:
        # Seeded bytes, not Image.effect_noise, whose C random source cannot be seeded.
        noise = random.Random(scene.noise_seed).randbytes(scene.width * scene.height)
        image = Image.blend(image, Image.frombytes("L", size, noise).convert("RGB"), 0.25)
    draw_objects(image, scene, lambda o: COLOURS[o.colour])
    return image


def draw_objects(image: Image.Image, scene: Scene, fill: Callable[[Obj], tuple[int, int, int]]) -> None:
    """Draw the objects of `scene` onto `image`, each in the colour `fill(obj)`."""
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = scene.width / 3, scene.height / 3
    for o in scene.objects:
        cx, cy = (o.col + 0.5) * cell_w, (o.row + 0.5) * cell_h
        r = o.scale * min(cell_w, cell_h) / 2
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill(o))
        elif o.shape == "square":
            s = r * 0.85  # a square of the same "radius" looks much bigger than the circle
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill(o))
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill(o))


# ---------------------------------------------------------------------------------------------- scenes


def _random_obj(rng: random.Random, shape: str, cell: int, colours: list[str]) -> Obj:
    return Obj(shape, rng.choice(colours), cell // 3, cell % 3, rng.choice(SIZES))


def random_scene(rng: random.Random, shapes: list[str]) -> Scene:
    """A scene with one object per entry of `shapes`, random colours, cells, sizes and background."""
    aspect = rng.choice(ASPECTS)
    longest = rng.randint(96, 192)
    k = longest / max(aspect)
    width, height = round(aspect[0] * k), round(aspect[1] * k)
    background = rng.choice(list(BACKGROUNDS))
    noise_seed = rng.randrange(2**31) if rng.random() < 0.4 else None
    colours = [c for c in COLOURS if c != background]
    cells = rng.sample(range(9), len(shapes))
    objects = tuple(_random_obj(rng, shape, cell, colours) for shape, cell in zip(shapes, cells, strict=True))
    return Scene(width, height, background, noise_seed, objects)


def _shapes_with(rng: random.Random, target: str, count: int, total: int) -> list[str]:
    """`count` copies of `target` plus other shapes up to `total` objects, shuffled."""
    others = [s for s in SHAPES if s != target]
    shapes = [target] * count + [rng.choice(others) for _ in range(total - count)]
    rng.shuffle(shapes)
    return shapes


def _unique(scene: Scene, key) -> list[Obj]:
    values = [key(o) for o in scene.objects]
    return [o for o, v in zip(scene.objects, values, strict=True) if values.count(v) == 1]


# ---------------------------------------------------------------------------------------------- questions


def _single_object(rng: random.Random) -> Scene:
    return random_scene(rng, [rng.choice(SHAPES)])


def _count_turn(rng: random.Random) -> tuple[Scene, tuple[str, str]]:
    if rng.random() < 0.25:
        scene = random_scene(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 6))])
        return scene, ("How many objects are there?", str(len(scene.objects)))
    target = rng.choice(SHAPES)
    count = rng.choice([0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6])
    scene = random_scene(rng, _shapes_with(rng, target, count, rng.randint(max(count, 1), 6)))
    return scene, (f"How many {PLURALS[target]} are there?", str(count))


def _position_turn(rng: random.Random) -> tuple[Scene, tuple[str, str]]:
    while True:
        scene = random_scene(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 4))])
        unique = _unique(scene, lambda o: (o.shape, o.colour))
        if unique:
            o = rng.choice(unique)
            return scene, (f"Where is the {o.colour} {o.shape}?", position_name(o))


def _presence_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        return f"Is there a {colour} {shape}?", "yes"
    # Half of the "no" cases share the shape or the colour with a drawn object, so both must be checked.
    ref_colour, ref_shape = rng.choice(sorted(present))
    while True:
        colour = ref_colour if rng.random() < 0.3 else rng.choice(list(COLOURS))
        shape = ref_shape if rng.random() < 0.3 else rng.choice(SHAPES)
        if (colour, shape) not in present:
            return f"Is there a {colour} {shape}?", "no"


def _presence_turn(rng: random.Random) -> tuple[Scene, tuple[str, str]]:
    scene = random_scene(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 5))])
    return scene, _presence_question(rng, scene)


def _colour_of_shape_turn(rng: random.Random) -> tuple[Scene, tuple[str, str]]:
    target = rng.choice(SHAPES)
    scene = random_scene(rng, _shapes_with(rng, target, 1, rng.randint(2, 5)))
    o = next(o for o in scene.objects if o.shape == target)
    return scene, (f"What colour is the {target}?", o.colour)


def single_turn(rng: random.Random, kind: str) -> tuple[Scene, tuple[str, str]]:
    """A scene and one (question, answer) of question type `kind` (one of KINDS)."""
    if kind == "shape":
        scene = _single_object(rng)
        return scene, ("What shape is shown?", scene.objects[0].shape)
    if kind == "colour":
        scene = _single_object(rng)
        return scene, ("What colour is the shape?", scene.objects[0].colour)
    if kind == "describe":
        scene = random_scene(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 3))])
        return scene, ("Describe the image.", describe(scene))
    makers = {
        "count": _count_turn,
        "position": _position_turn,
        "presence": _presence_turn,
        "colour_of_shape": _colour_of_shape_turn,
    }
    return makers[kind](rng)


def comparison(pair: tuple[Scene, ...], shape: str) -> tuple[str, str]:
    """The question "Which image has more circles?" about two scenes whose counts of `shape` differ, and its answer."""
    answer = "the first" if pair[0].count(shape) > pair[1].count(shape) else "the second"
    return f"Which image has more {PLURALS[shape]}?", answer


def compared_shape(question: str) -> str:
    """The shape a `comparison` question compares: "circle" for "Which image has more circles?"."""
    plural = question.removeprefix("Which image has more ").removesuffix("?")
    return next(shape for shape, name in PLURALS.items() if name == plural)


def two_image(rng: random.Random) -> Example:
    """Two scenes whose counts of one shape differ; the answer names the image with more."""
    target = rng.choice(SHAPES)
    first, second = rng.sample(range(5), 2)
    scenes = tuple(random_scene(rng, _shapes_with(rng, target, n, rng.randint(max(n, 1), 5))) for n in (first, second))
    return Example("two_image", scenes, (comparison(scenes, target),))


def multi_turn(rng: random.Random) -> Example:
    """A question, then a follow-up that refers back to the same object with "it"."""
    pattern = rng.randrange(3)
    if pattern == 0:
        scene = _single_object(rng)
        o = scene.objects[0]
        turns = (("What shape is shown?", o.shape), ("What colour is it?", o.colour))
    elif pattern == 1:
        scene, first = _colour_of_shape_turn(rng)
        o = next(o for o in scene.objects if o.colour == first[1] and first[0].endswith(f" {o.shape}?"))
        turns = (first, ("Where is it?", position_name(o)))
    else:
        scene, first = _position_turn(rng)
        o = next(o for o in scene.objects if first[0] == f"Where is the {o.colour} {o.shape}?")
        turns = ((f"Is there a {o.colour} {o.shape}?", "yes"), ("Where is it?", position_name(o)))
    return Example("multi_turn", (scene,), turns)


def _one_attribute_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """Presence of one attribute ("Is there a circle?", "Is there anything red?"): a stepping stone to the
    colour-and-shape questions, not a held-out question type."""
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        return f"Is there a {shape}?", "yes" if scene.count(shape) else "no"
    colour = rng.choice(list(COLOURS))
    return f"Is there anything {colour}?", "yes" if any(o.colour == colour for o in scene.objects) else "no"


def extra_turn(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """One more independent question about an existing scene; training packs several per image."""
    if rng.random() < 0.3:
        return _one_attribute_question(rng, scene)
    shapes = sorted({o.shape for o in scene.objects})
    choice = rng.randrange(5)
    if choice == 4:
        # Not a held-out question type: a whole-image property that trains attention onto the image.
        return "What colour is the background?", scene.background
    if choice == 0:
        target = rng.choice(SHAPES)
        return f"How many {PLURALS[target]} are there?", str(scene.count(target))
    if choice == 1:
        return _presence_question(rng, scene)
    unique = _unique(scene, lambda o: (o.shape, o.colour))
    if choice == 2 and unique:
        o = rng.choice(unique)
        return f"Where is the {o.colour} {o.shape}?", position_name(o)
    single = [o for o in scene.objects if scene.count(o.shape) == 1] or None
    if single:
        o = rng.choice(single)
        return f"What colour is the {o.shape}?", o.colour
    return f"How many {PLURALS[shapes[0]]} are there?", str(scene.count(shapes[0]))


def make_example(rng: random.Random, kind: str) -> Example:
    if kind == "two_image":
        return two_image(rng)
    if kind == "multi_turn":
        return multi_turn(rng)
    scene, turn = single_turn(rng, kind)
    return Example(kind, (scene,), (turn,))


def to_messages(example: Example, upto: int | None = None) -> list[dict]:
    """Chat messages in the transformers / OpenAI-content format; `upto` turns (all by default),
    the last assistant answer left out when `upto` is given so the model has to produce it."""
    turns = example.turns if upto is None else example.turns[:upto]
    messages: list[dict] = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"} for _ in example.scenes] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if upto is None or i < len(turns) - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
