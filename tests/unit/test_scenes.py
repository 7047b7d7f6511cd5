"""The demo scene generator: deterministic per seed, answers that match what is drawn, every question type."""

from __future__ import annotations

import random

import pytest

from idefix.demo import scenes


def _examples(seed: int, n: int = 90) -> list[scenes.Example]:
    rng = random.Random(seed)
    return [scenes.make_example(rng, scenes.ALL_KINDS[i % len(scenes.ALL_KINDS)]) for i in range(n)]


def test_same_seed_same_examples_and_pixels() -> None:
    first, second = _examples(7, 18), _examples(7, 18)
    assert first == second
    for a, b in zip(first, second, strict=True):
        assert [scenes.render(s).tobytes() for s in a.scenes] == [scenes.render(s).tobytes() for s in b.scenes]


def test_different_seed_different_examples() -> None:
    assert _examples(1, 18) != _examples(2, 18)


def test_every_question_type_is_produced() -> None:
    assert {e.kind for e in _examples(3)} == set(scenes.ALL_KINDS)


def test_objects_use_distinct_cells_and_visible_colours() -> None:
    for example in _examples(4, 200):
        for scene in example.scenes:
            assert 0 <= len(scene.objects) <= 6
            assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
            assert all(o.colour != scene.background for o in scene.objects)


def test_render_draws_the_object_colour_at_its_centre() -> None:
    for example in _examples(5, 100):
        for scene in example.scenes:
            image = scenes.render(scene)
            assert image.size == (scene.width, scene.height)
            for o in scene.objects:
                if o.shape == "star":
                    continue  # a star's centre is inside it, but thin tips make the check flaky at tiny sizes
                x = int((o.col + 0.5) * scene.width / 3)
                y = int((o.row + 0.5) * scene.height / 3)
                assert image.getpixel((x, y)) == scenes.COLOURS[o.colour]


def _check_answer(scene: scenes.Scene, question: str, answer: str) -> None:
    objects = scene.objects
    if question == "What shape is shown?":
        assert len(objects) == 1 and answer == objects[0].shape
    elif question in ("What colour is the shape?", "What colour is it?"):
        assert len(objects) == 1 and answer == objects[0].colour
    elif question == "How many objects are there?":
        assert answer == str(len(objects))
    elif question.startswith("How many "):
        shape = next(s for s, p in scenes.PLURALS.items() if f" {p} " in question)
        assert answer == str(scene.count(shape))
    elif question.startswith("Is there anything "):
        colour = question.removeprefix("Is there anything ").removesuffix("?")
        assert answer == ("yes" if any(o.colour == colour for o in objects) else "no")
    elif question.removeprefix("Is there a ").removesuffix("?") in scenes.SHAPES:
        shape = question.removeprefix("Is there a ").removesuffix("?")
        assert answer == ("yes" if scene.count(shape) else "no")
    elif question.startswith("Is there a "):
        colour, shape = question.removeprefix("Is there a ").removesuffix("?").split()
        assert answer == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in objects) else "no")
    elif question == "What colour is the background?":
        assert answer == scene.background
    elif question.startswith("What colour is the "):
        shape = question.removeprefix("What colour is the ").removesuffix("?")
        assert [o.colour for o in objects if o.shape == shape] == [answer]
    elif question.startswith("Where is the "):
        colour, shape = question.removeprefix("Where is the ").removesuffix("?").split()
        assert [scenes.position_name(o) for o in objects if (o.colour, o.shape) == (colour, shape)] == [answer]
    elif question == "Describe the image.":
        assert answer == scenes.describe(scene) and scene.background in answer
    elif question != "Where is it?":
        pytest.fail(f"unknown question {question!r}")


def test_answers_match_the_scene() -> None:
    for example in _examples(6, 450):
        if example.kind == "two_image":
            ((question, answer),) = example.turns
            shape = next(s for s, p in scenes.PLURALS.items() if f" {p}?" in question)
            first, second = (s.count(shape) for s in example.scenes)
            assert first != second and answer == ("the first" if first > second else "the second")
            continue
        for question, answer in example.turns:
            _check_answer(example.scenes[0], question, answer)


def test_follow_up_refers_to_the_object_of_the_first_turn() -> None:
    for example in _examples(8, 200):
        if example.kind != "multi_turn" or example.turns[1][0] != "Where is it?":
            continue
        (first_q, first_a), (_, where) = example.turns
        scene = example.scenes[0]
        if first_q.startswith("Is there a "):
            colour, shape = first_q.removeprefix("Is there a ").removesuffix("?").split()
        else:
            colour, shape = first_a, first_q.removeprefix("What colour is the ").removesuffix("?")
        matches = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
        assert len(matches) == 1 and scenes.position_name(matches[0]) == where


def test_extra_turns_are_answerable() -> None:
    rng = random.Random(9)
    for example in _examples(9, 100):
        for _ in range(3):
            _check_answer(example.scenes[0], *scenes.extra_turn(rng, example.scenes[0]))


def test_describe_lists_objects_in_reading_order() -> None:
    objects = (
        scenes.Obj("star", "blue", 2, 0, 0.9),
        scenes.Obj("circle", "red", 0, 2, 0.9),
        scenes.Obj("square", "green", 0, 0, 0.9),
    )
    scene = scenes.Scene(96, 96, "grey", None, objects)
    assert scenes.describe(scene) == "A green square, a red circle and a blue star on a grey background."
    assert [scenes.position_name(o) for o in objects] == ["bottom left", "top right", "top left"]


def test_messages_put_images_in_the_first_user_turn() -> None:
    example = next(e for e in _examples(10) if e.kind == "two_image")
    messages = scenes.to_messages(example)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert [p["type"] for p in messages[0]["content"]] == ["image", "image", "text"]
    follow_up = next(e for e in _examples(10) if e.kind == "multi_turn")
    asked = scenes.to_messages(follow_up, upto=2)
    assert [m["role"] for m in asked] == ["user", "assistant", "user"]
    assert [p["type"] for p in asked[2]["content"]] == ["text"]
