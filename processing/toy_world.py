"""A procedural toy world: images of coloured shapes with captions and question-answer pairs.

Built-in data for the demo and the tests (issue 5, item 5): every scene is drawn at run time from a
seed, so nothing is downloaded and the same seed always gives the same pixels, captions and
questions. The task is measurable: `check_answer` is a strict checker (a prediction that names two
candidate answers counts as wrong) and `chance_rate` gives the accuracy of a uniform guesser over the
answer set of each question kind, so "far above chance" can be stated as a number.
`dominant_color`, `classify_shape` and `foreground_position` are the checkers for generated images.

Example:

    >>> import random
    >>> from processing.toy_world import draw_scene, make_questions, check_answer
    >>> image, scene = draw_scene(seed=3)
    >>> qa = make_questions(scene, random.Random(0))[0]
    >>> check_answer(qa, qa.answer)
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated, well separated colours so that "dominant colour" survives a lossy tokenizer.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
# Words drawn into images for OCR; short and made of glyphs that stay distinct at small sizes.
WORDS: tuple[str, ...] = ("CAT", "SUN", "BOX", "RED", "MAP", "42", "17", "305", "GO", "ZEN", "AXE", "HUB")
QA_KINDS: tuple[str, ...] = ("count", "color", "shape", "position", "exists", "text")
DEFAULT_MAX_SHAPES = 4

_NUMBER_WORDS = {
    "zero": 0, "none": 0, "no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
_PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles", "shape": "shapes"}


@dataclass
class Shape:
    """One shape in a scene.

    Args:
        kind (`str`): one of `SHAPES`.
        color (`str`): a key of `COLORS`.
        bbox (`tuple[float, float, float, float]`): normalised (x0, y0, x1, y1), origin top left.
    """

    kind: str
    color: str
    bbox: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)

    @property
    def position(self) -> str:
        """Quadrant of the centre, e.g. "top left"."""
        cx, cy = self.center
        return f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


@dataclass
class Scene:
    """A drawn scene.

    Args:
        shapes (`list[Shape]`): the shapes, in drawing order (they never overlap).
        size (`int`): image side in pixels.
        seed (`int`): the seed the scene was drawn from.
        text (`str`, *optional*): a word drawn in the bottom band of the image, for OCR questions.
    """

    shapes: list[Shape]
    size: int
    seed: int
    text: str | None = None


@dataclass
class QA:
    """A question about a scene, its reference answer and its kind (a member of `QA_KINDS`)."""

    question: str
    answer: str
    kind: str


# Side of a shape as a fraction of the image side.
DEFAULT_SIDE_RANGE = (0.22, 0.36)


def _place_shapes(
    rng: random.Random, n: int, y_limit: float, side_range: tuple[float, float] = DEFAULT_SIDE_RANGE
) -> list[tuple[float, float, float, float]]:
    boxes: list[tuple[float, float, float, float]] = []
    gap = 0.04
    for _ in range(n):
        for _attempt in range(60):
            side = rng.uniform(*side_range)
            x0 = rng.uniform(0.02, 0.98 - side)
            y0 = rng.uniform(0.02, y_limit - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
                for b in boxes
            ):
                boxes.append(box)
                break
    return boxes


def sample_scene(
    seed: int,
    max_shapes: int = DEFAULT_MAX_SHAPES,
    with_text: bool = False,
    size: int = 64,
    side_range: tuple[float, float] = DEFAULT_SIDE_RANGE,
) -> Scene:
    """Draws the scene description only (no pixels); `draw_scene` renders it."""
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    low, high = side_range
    if not 0.05 <= low <= high <= 0.9:
        raise ValueError(f"side_range must satisfy 0.05 <= low <= high <= 0.9 (fractions of the side), got {side_range}")
    rng = random.Random(seed)
    n = rng.randint(1, max_shapes)
    # With text, shapes stay above a bottom band reserved for the word so OCR never sees overlaps.
    boxes = _place_shapes(rng, n, y_limit=0.74 if with_text else 0.98, side_range=side_range)
    shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), tuple(round(v, 4) for v in b)) for b in boxes]
    text = rng.choice(WORDS) if with_text else None
    return Scene(shapes=shapes, size=size, seed=seed, text=text)


def _font(px: int) -> ImageFont.ImageFont:
    # Pillow's bundled scalable font: identical glyphs on every machine, no system font needed.
    return ImageFont.load_default(size=px)


def render_scene(scene: Scene) -> Image.Image:
    """Renders a `Scene` to an RGB image of side `scene.size`."""
    s = scene.size
    image = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = (v * (s - 1) for v in shape.bbox)
        fill = COLORS[shape.color]
        if shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPES}")
    if scene.text:
        font = _font(max(8, int(s * 0.17)))
        left, top, right, bottom = draw.textbbox((0, 0), scene.text, font=font)
        x = (s - (right - left)) / 2 - left
        y = s * 0.87 - (bottom - top) / 2 - top
        draw.text((x, y), scene.text, fill=(245, 245, 245), font=font)
    return image


def draw_scene(
    seed: int,
    size: int = 64,
    max_shapes: int = DEFAULT_MAX_SHAPES,
    with_text: bool = False,
    side_range: tuple[float, float] = DEFAULT_SIDE_RANGE,
) -> tuple[Image.Image, Scene]:
    """Draws a scene of 1..`max_shapes` non-overlapping coloured shapes, deterministic by seed.

    Args:
        seed (`int`): the scene seed; equal seeds give equal images and scenes.
        size (`int`, *optional*, defaults to 64): image side in pixels (at least 16).
        max_shapes (`int`, *optional*, defaults to 4): upper bound on the number of shapes.
        with_text (`bool`, *optional*, defaults to `False`): also draw a short word (`Scene.text`) in a
            bottom band; use `size >= 96` if Tesseract has to read it.
        side_range (`tuple[float, float]`, *optional*, defaults to `(0.22, 0.36)`): range of a shape's side as a
            fraction of the image side. On very small images (16 px) the default draws 4-6 px shapes, at which a
            circle and a square differ by a few corner pixels.

    Returns:
        `tuple[PIL.Image.Image, Scene]`: the RGB image and its description.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    scene = sample_scene(seed, max_shapes=max_shapes, with_text=with_text, size=size, side_range=side_range)
    return render_scene(scene), scene


def _count_phrase(n: int, kind: str) -> str:
    return f"{n} {kind if n == 1 else _PLURAL[kind]}"


def make_questions(scene: Scene, rng: random.Random, max_shapes: int = DEFAULT_MAX_SHAPES) -> list[QA]:
    """Questions with unambiguous answers about a scene, in a random order.

    Colour questions are asked only about a shape kind present once, shape questions only about a colour
    present once, position questions only about a unique (colour, kind) whose centre is clearly inside a
    quadrant; "exists" questions are balanced yes/no.

    Args:
        scene (`Scene`): the scene.
        rng (`random.Random`): drives which questions are asked and their order.
        max_shapes (`int`, *optional*): unused beyond documenting the count range; kept for symmetry
            with `chance_rate`.
    """
    out: list[QA] = []
    kinds_present = [s.kind for s in scene.shapes]
    colors_present = [s.color for s in scene.shapes]

    kind = rng.choice(SHAPES)
    out.append(QA(f"How many {_PLURAL[kind]} are there?", str(kinds_present.count(kind)), "count"))
    out.append(QA("How many shapes are there?", str(len(scene.shapes)), "count"))

    unique_kinds = [k for k in SHAPES if kinds_present.count(k) == 1]
    if unique_kinds:
        k = rng.choice(unique_kinds)
        out.append(QA(f"What color is the {k}?", scene.shapes[kinds_present.index(k)].color, "color"))

    unique_colors = [c for c in COLORS if colors_present.count(c) == 1]
    if unique_colors:
        c = rng.choice(unique_colors)
        out.append(QA(f"What shape is the {c} object?", scene.shapes[colors_present.index(c)].kind, "shape"))

    pairs = [(s.color, s.kind) for s in scene.shapes]
    placeable = [
        s for s in scene.shapes
        if pairs.count((s.color, s.kind)) == 1 and min(abs(s.center[0] - 0.5), abs(s.center[1] - 0.5)) > 0.06
    ]
    if placeable:
        s = rng.choice(placeable)
        out.append(QA(f"Where is the {s.color} {s.kind}?", s.position, "position"))

    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        out.append(QA(f"Is there a {s.color} {s.kind}?", "yes", "exists"))
    else:
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in pairs]
        c, k = rng.choice(absent)
        out.append(QA(f"Is there a {c} {k}?", "no", "exists"))

    if scene.text:
        out.append(QA("What word is written in the image?", scene.text.lower(), "text"))
    rng.shuffle(out)
    return out


def caption(scene: Scene, positions: bool = False) -> str:
    """A one-sentence caption grouping shapes by colour and kind, e.g. "two red circles and a blue square".

    With `positions=True` every shape is named with its quadrant, top row first: "a blue square at the top right
    and a red circle at the bottom left" (a dense grounding signal for training).
    """
    if positions:
        ordered = sorted(scene.shapes, key=lambda s: POSITIONS.index(s.position))
        parts = [f"a {s.color} {s.kind} at the {s.position}" for s in ordered]
    else:
        groups: dict[tuple[str, str], int] = {}
        for s in scene.shapes:
            groups[(s.color, s.kind)] = groups.get((s.color, s.kind), 0) + 1
        number = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
        parts = [
            f"{number.get(n, str(n))} {color} {kind if n == 1 else _PLURAL[kind]}" for (color, kind), n in groups.items()
        ]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if scene.text:
        text += f", with the word {scene.text} written below"
    return text


def describe_scene(scene: Scene) -> str:
    """A plain-text rendering of the scene for text-only models: one line per shape, with quadrant and box."""
    lines = [f"A {scene.size}x{scene.size} picture with {_count_phrase(len(scene.shapes), 'shape')}:"]
    for s in scene.shapes:
        x0, y0, x1, y1 = s.bbox
        lines.append(f"- a {s.color} {s.kind} in the {s.position}, box ({x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f})")
    if scene.text:
        lines.append(f'- the word "{scene.text}" written at the bottom')
    return "\n".join(lines)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular(word: str) -> str:
    for kind, plural in _PLURAL.items():
        if word == plural:
            return kind
    return word


def check_answer(qa: QA, prediction: str) -> bool:
    """Whether `prediction` answers `qa`, after lower-casing and stripping punctuation.

    Honest by construction: the prediction must name the reference answer and no other candidate of the
    same kind ("red or blue" is wrong for "red"; "yes no" is wrong for "yes"). Counts accept digits or
    number words; the first number named is the answer. Positions need both the vertical and the
    horizontal word.
    """
    words = [_singular(w) for w in _words(prediction)]
    if qa.kind == "count":
        numbers = [int(w) if w.isdigit() else _NUMBER_WORDS[w] for w in words if w.isdigit() or w in _NUMBER_WORDS]
        return bool(numbers) and numbers[0] == int(qa.answer)
    if qa.kind == "color":
        named = {w for w in words if w in COLORS}
        return named == {qa.answer}
    if qa.kind == "shape":
        named = {w for w in words if w in SHAPES}
        return named == {qa.answer}
    if qa.kind == "exists":
        named = {w for w in words if w in ("yes", "no")}
        return named == {qa.answer}
    if qa.kind == "position":
        vertical = {w for w in words if w in ("top", "bottom")}
        horizontal = {w for w in words if w in ("left", "right")}
        want_v, want_h = qa.answer.split()
        return vertical == {want_v} and horizontal == {want_h}
    if qa.kind == "text":
        return qa.answer.lower() in words
    raise ValueError(f"unknown question kind {qa.kind!r}; expected one of {QA_KINDS}")


def chance_rate(kind: str, max_shapes: int = DEFAULT_MAX_SHAPES) -> float:
    """Accuracy of a guesser drawing uniformly from the answer set of `kind`.

    Counts range over 0..`max_shapes` (the count of a named kind can be 0).
    """
    rates = {
        "count": 1.0 / (max_shapes + 1),
        "color": 1.0 / len(COLORS),
        "shape": 1.0 / len(SHAPES),
        "position": 1.0 / len(POSITIONS),
        "exists": 0.5,
        "text": 1.0 / len(WORDS),
    }
    if kind not in rates:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {QA_KINDS}")
    return rates[kind]


# --- checkers for generated images -------------------------------------------------------------------


def _foreground(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    dist_bg = np.linalg.norm(rgb - np.array(BACKGROUND, dtype=np.float32), axis=-1)
    return rgb, dist_bg > 60.0


def dominant_color(image: Image.Image) -> str | None:
    """The palette colour most pixels are nearest to, ignoring background-like pixels; `None` if blank."""
    rgb, fg = _foreground(image)
    if fg.sum() < 0.01 * fg.size:
        return None
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    pixels = rgb[fg]
    nearest = np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1).argmin(axis=1)
    counts = np.bincount(nearest, minlength=len(COLORS))
    return list(COLORS)[int(counts.argmax())]


def classify_shape(image: Image.Image) -> str | None:
    """Classifies the largest foreground blob of an image as square, circle or triangle.

    Uses the fill ratio of the blob within its bounding box (square ~1, circle ~pi/4, triangle ~1/2)
    and, to separate a circle from a triangle, where the blob's mass sits vertically (a triangle is
    bottom heavy). Returns `None` for a blank image.
    """
    _, fg = _foreground(image)
    if fg.sum() < 0.01 * fg.size:
        return None
    ys, xs = np.nonzero(fg)
    # Robust box: trim stray pixels from a noisy decoder.
    x0, x1 = np.percentile(xs, [2, 98])
    y0, y1 = np.percentile(ys, [2, 98])
    h, w = max(y1 - y0, 1.0), max(x1 - x0, 1.0)
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    fill = inside.sum() / ((h + 1) * (w + 1))
    top_half = ((ys < (y0 + y1) / 2) & inside).sum() / max(inside.sum(), 1)
    if fill > 0.9:
        return "square"
    if top_half < 0.38:
        return "triangle"
    return "circle" if fill > 0.62 else "triangle"


def foreground_position(image: Image.Image) -> str | None:
    """Quadrant (one of `POSITIONS`) of the foreground's centre of mass; `None` for a blank image."""
    _, fg = _foreground(image)
    if fg.sum() < 0.01 * fg.size:
        return None
    ys, xs = np.nonzero(fg)
    h, w = fg.shape
    return f"{'top' if ys.mean() < h / 2 else 'bottom'} {'left' if xs.mean() < w / 2 else 'right'}"


def drawing_prompt(color: str, kind: str, position: str) -> str:
    """The instruction the toy generation task is trained and measured on, e.g. "draw a red square at the top left"."""
    for value, allowed, name in ((color, COLORS, "colour"), (kind, SHAPES, "shape"), (position, POSITIONS, "position")):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
    return f"draw a {color} {kind} at the {position}"


__all__ = [
    "BACKGROUND", "COLORS", "DEFAULT_SIDE_RANGE", "POSITIONS", "QA", "QA_KINDS", "SHAPES", "Scene", "Shape", "WORDS", "caption",
    "chance_rate", "check_answer", "classify_shape", "describe_scene", "dominant_color", "draw_scene", "drawing_prompt",
    "foreground_position", "make_questions", "render_scene", "sample_scene",
]
