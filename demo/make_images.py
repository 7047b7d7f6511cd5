"""Write the bundled example images (idefix/demo/images/) and their README from fixed scenes.

    python demo/make_images.py

The scenes are spelled out here (not drawn at random) so that the questions and answers in the README
stay true by construction; the answers come from the same functions that label the training data.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idefix.demo.scenes import PLURALS, SIZES, Obj, Scene, describe, position_name, render  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "idefix" / "demo" / "images"


def obj(shape: str, colour: str, row: int, col: int, scale: float = SIZES[1]) -> Obj:
    return Obj(shape, colour, row, col, scale)


IMAGES = {
    "shapes.png": Scene(
        160,
        160,
        "grey",
        None,
        (
            obj("circle", "red", 0, 0),
            obj("circle", "blue", 0, 2),
            obj("square", "green", 1, 1),
            obj("circle", "yellow", 2, 0),
            obj("triangle", "purple", 2, 2),
        ),
    ),
    "star.png": Scene(160, 120, "white", None, (obj("star", "orange", 1, 1),)),
    "wide.png": Scene(192, 96, "black", 1234, (obj("cross", "white", 1, 0), obj("triangle", "red", 0, 2))),
    "crosses.png": Scene(
        120,
        160,
        "white",
        4321,
        (
            obj("cross", "blue", 0, 1),
            obj("cross", "red", 1, 0),
            obj("circle", "green", 2, 2),
            obj("cross", "black", 2, 1),
        ),
    ),
}


def questions(name: str, scene: Scene) -> list[tuple[str, str]]:
    """Questions the demo model was trained to answer, with the generator's canonical answers."""
    qa = [("Describe the image.", describe(scene))] if len(scene.objects) <= 3 else []
    for shape in sorted({o.shape for o in scene.objects}):
        qa.append((f"How many {PLURALS[shape]} are there?", str(scene.count(shape))))
    if len(scene.objects) == 1:
        only = scene.objects[0]
        qa += [("What shape is shown?", only.shape), ("What colour is the shape?", only.colour)]
    for o in scene.objects:
        if scene.count(o.shape) == 1:
            qa.append((f"What colour is the {o.shape}?", o.colour))
        qa.append((f"Where is the {o.colour} {o.shape}?", position_name(o)))
    return qa


def readme() -> str:
    lines = [
        "# Demo images",
        "",
        "Drawn by `idefix.demo.scenes` (`python demo/make_images.py`). The shipped demo model was trained",
        "on images like these; each question below has exactly this canonical answer.",
        "",
    ]
    for name, scene in IMAGES.items():
        lines += [f"## {name}", "", "| question | answer |", "|---|---|"]
        lines += [f"| {q} | {a} |" for q, a in questions(name, scene)]
        lines.append("")
    first, second = IMAGES["shapes.png"], IMAGES["crosses.png"]
    more = "the first" if first.count("circle") > second.count("circle") else "the second"
    lines += [
        "## Two images: shapes.png, then crosses.png",
        "",
        "| question | answer |",
        "|---|---|",
        f"| Which image has more circles? | {more} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, scene in IMAGES.items():
        render(scene).save(OUT / name, optimize=True)
    (OUT / "README.md").write_text(readme())


if __name__ == "__main__":
    main()
