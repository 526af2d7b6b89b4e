"""Toy world: determinism, geometry, question validity, the strict answer checker and image checkers."""

import random

import numpy as np
import pytest

from processing.toy_world import (
    COLORS,
    QA,
    QA_KINDS,
    SHAPES,
    caption,
    chance_rate,
    check_answer,
    classify_shape,
    describe_scene,
    dominant_color,
    draw_scene,
    drawing_prompt,
    foreground_position,
    make_questions,
)


def test_same_seed_same_scene_and_pixels():
    a_img, a = draw_scene(7, with_text=True, size=96)
    b_img, b = draw_scene(7, with_text=True, size=96)
    assert a == b
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert make_questions(a, random.Random(1)) == make_questions(b, random.Random(1))
    c_img, _ = draw_scene(8, with_text=True, size=96)
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))


def test_shapes_do_not_overlap_and_stay_inside():
    for seed in range(50):
        image, scene = draw_scene(seed, size=64, max_shapes=4)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 1 <= len(scene.shapes) <= 4
        for i, s in enumerate(scene.shapes):
            assert s.kind in SHAPES and s.color in COLORS
            x0, y0, x1, y1 = s.bbox
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            for t in scene.shapes[i + 1 :]:
                assert x1 <= t.bbox[0] or t.bbox[2] <= x0 or y1 <= t.bbox[1] or t.bbox[3] <= y0


def test_answers_match_the_scene():
    for seed in range(40):
        _, scene = draw_scene(seed)
        for qa in make_questions(scene, random.Random(seed)):
            assert qa.kind in QA_KINDS
            assert check_answer(qa, qa.answer)
            if qa.question == "How many shapes are there?":
                assert int(qa.answer) == len(scene.shapes)
            if qa.kind == "color":
                kind = qa.question.split()[-1].rstrip("?")
                assert [s.color for s in scene.shapes if s.kind == kind] == [qa.answer]
            if qa.kind == "exists":
                color, kind = qa.question.rstrip("?").split()[-2:]
                present = any(s.color == color and s.kind == kind for s in scene.shapes)
                assert qa.answer == ("yes" if present else "no")


def test_exists_questions_are_balanced():
    answers = [
        qa.answer for seed in range(200) for qa in make_questions(draw_scene(seed)[1], random.Random(seed))
        if qa.kind == "exists"
    ]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


@pytest.mark.parametrize(
    "qa, prediction, expected",
    [
        (QA("How many circles are there?", "2", "count"), "There are two circles.", True),
        (QA("How many circles are there?", "2", "count"), "3", False),
        (QA("How many circles are there?", "0", "count"), "none", True),
        (QA("How many circles are there?", "2", "count"), "", False),
        (QA("What color is the square?", "red", "color"), "Red.", True),
        (QA("What color is the square?", "red", "color"), "red or blue", False),
        (QA("What shape is the red object?", "circle", "shape"), "a circle", True),
        (QA("What shape is the red object?", "circle", "shape"), "circles and squares", False),
        (QA("Is there a red circle?", "yes", "exists"), "Yes!", True),
        (QA("Is there a red circle?", "yes", "exists"), "yes no", False),
        (QA("Where is the red circle?", "top left", "position"), "in the top-left corner", True),
        (QA("Where is the red circle?", "top left", "position"), "top left or top right", False),
        (QA("Where is the red circle?", "top left", "position"), "left", False),
        (QA("What word is written in the image?", "cat", "text"), "CAT", True),
    ],
)
def test_checker_is_strict(qa, prediction, expected):
    assert check_answer(qa, prediction) is expected


def test_checker_and_chance_reject_unknown_kinds():
    with pytest.raises(ValueError, match="unknown question kind"):
        check_answer(QA("?", "x", "smell"), "x")
    with pytest.raises(ValueError, match="unknown question kind"):
        chance_rate("smell")


def test_chance_rates():
    assert chance_rate("exists") == 0.5
    assert chance_rate("color") == pytest.approx(1 / len(COLORS))
    assert chance_rate("shape") == pytest.approx(1 / 3)
    assert chance_rate("count") == pytest.approx(1 / 5)
    assert chance_rate("position") == pytest.approx(1 / 4)


def test_caption_and_description_name_every_shape():
    _, scene = draw_scene(11, with_text=True, size=96)
    text, description = caption(scene), describe_scene(scene)
    for s in scene.shapes:
        assert s.color in text and s.color in description and s.position in description
    assert scene.text in text and scene.text in description
    assert len(description.splitlines()) == len(scene.shapes) + 2


def test_caption_with_positions_names_each_shape_where_it_is():
    from processing.toy_world import Scene, Shape

    scene = Scene(
        shapes=[
            Shape("circle", "red", (0.6, 0.6, 0.8, 0.8)), Shape("circle", "red", (0.1, 0.6, 0.3, 0.8)),
            Shape("square", "blue", (0.6, 0.1, 0.8, 0.3)),
        ],
        size=64, seed=0,
    )  # fmt: skip
    assert caption(scene) == "two red circles and a blue square"
    assert caption(scene, positions=True) == (
        "a blue square at the top right, a red circle at the bottom left and a red circle at the bottom right"
    )


def test_image_checkers_recover_single_shapes():
    hits = 0
    for seed in range(60):
        image, scene = draw_scene(seed, size=32, max_shapes=1)
        shape = scene.shapes[0]
        hits += dominant_color(image) == shape.color and classify_shape(image) == shape.kind
    assert hits >= 57


def test_position_checker_recovers_the_quadrant():
    # Shapes centred near a midline can straddle it; count only those clearly inside a quadrant.
    checked = hits = 0
    for seed in range(80):
        image, scene = draw_scene(seed, size=32, max_shapes=1)
        shape = scene.shapes[0]
        if min(abs(shape.center[0] - 0.5), abs(shape.center[1] - 0.5)) > 0.06:
            checked += 1
            hits += foreground_position(image) == shape.position
    assert checked >= 40 and hits == checked


def test_drawing_prompt_names_all_three_attributes_and_rejects_unknown_ones():
    assert drawing_prompt("red", "square", "top left") == "draw a red square at the top left"
    with pytest.raises(ValueError, match="position 'middle'"):
        drawing_prompt("red", "square", "middle")
    with pytest.raises(ValueError, match="colour 'pink'"):
        drawing_prompt("pink", "square", "top left")


def test_image_checkers_on_blank_image():
    from PIL import Image

    blank = Image.new("RGB", (32, 32), (24, 24, 24))
    assert dominant_color(blank) is None and classify_shape(blank) is None and foreground_position(blank) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        draw_scene(0, size=8)
    with pytest.raises(ValueError, match="max_shapes"):
        draw_scene(0, max_shapes=0)
    with pytest.raises(ValueError, match="side_range"):
        draw_scene(0, side_range=(0.5, 0.3))


def test_side_range_sets_shape_size():
    for seed in range(30):
        _, scene = draw_scene(seed, size=16, max_shapes=1, side_range=(0.3, 0.42))
        x0, y0, x1, y1 = scene.shapes[0].bbox
        assert 0.3 - 1e-3 <= x1 - x0 <= 0.42 + 1e-3 and abs((x1 - x0) - (y1 - y0)) < 1e-3
    # Default scenes keep their sizes, so seeds drawn before the option existed give the same scenes.
    assert draw_scene(3)[1] == draw_scene(3, side_range=(0.22, 0.36))[1]
