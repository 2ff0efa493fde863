"""Synthetic multi-task image-text mixture, written as WebDataset shards.

Every image is rendered with PIL: one to four flat shapes (circle, square, triangle) in one of
six colours on a white or black background. Because the generator knows exactly what it drew,
every answer is correct by construction, which makes this recipe the smallest end-to-end check
of the data path (shards -> chat template -> label masking -> loss) and a quick sanity task for
adapters, whose accuracy can be scored by exact match.

Shard sample contract (``mmpeft-shards/1``)::

    __key__    "color-000123"                       (no dots: webdataset splits keys on them)
    json       {"task": ..., "messages": [...], "id": <key>}
    img0.png   PNG bytes of the first {"type": "image"} part in the conversation
    img1.png   ... the second one, and so on.

``messages`` is a chat, a list of ``{"role": "user"|"assistant"|"system", "content": [parts]}``
with parts ``{"type": "text", "text": ...}`` or ``{"type": "image"}``.

Tasks (``SyntheticRecipe.tasks`` picks a subset; the first four are the default):

- ``color``   one shape, "What color is the shape?" -> "red". 20% continue with a second
  turn asking for the shape, so masking over several assistant turns gets exercised.
- ``shape``   one shape, "What shape is shown?" -> "circle". 20% continue asking the colour.
- ``count``   1-4 shapes of one kind (colours may differ), "How many shapes are there?" -> "3".
- ``caption`` 1-4 identical shapes, "Describe the image." -> "2 red circles on a white background."
- ``compare`` two images of one shape each, "Do these two images show the same shape?" ->
  "yes"/"no" (balanced); the only multi-image task, for the img{k} indexing path.

The index chooses each task's evaluation score (docs/evaluation.md): ``exact_match``, and ``yes_no``
for ``compare``.

Builds are deterministic: the same arguments give byte-identical shards (tar headers carry a
fixed mtime) as long as Python, Pillow and zlib are the same versions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image, ImageDraw

from mmpeft.data.build import Record, ShardRecipe, is_built, png_bytes

__all__ = ["SyntheticRecipe", "is_built"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (250, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

MAX_SHAPES = 4
"""Multi-shape images use a 2x2 grid of cells, one shape per cell, so shapes never touch."""
MIN_IMAGE_SIZE = 24
"""Below this a shape in a grid cell is under 7 px and triangles stop looking like triangles."""
FOLLOW_UP_RATE = 0.2
"""Fraction of ``color`` and ``shape`` samples that get a second user/assistant turn."""

PROMPTS: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the shape?",
        "What colour is the shape in the image?",
        "Which color is this shape?",
        "Name the color of the shape.",
    ),
    "shape": (
        "What shape is shown?",
        "What shape is this?",
        "Which shape appears in the image?",
        "Name the shape in the picture.",
    ),
    "count": (
        "How many shapes are there?",
        "Count the shapes in the image.",
        "How many shapes do you see?",
        "What is the number of shapes shown?",
    ),
    "caption": (
        "Describe the image.",
        "Write a short caption for this image.",
        "What does this image show?",
        "Give a one-sentence description of the picture.",
    ),
    "compare": (
        "Do these two images show the same shape?",
        "Is the shape in both images the same?",
        "Are these two shapes of the same kind?",
    ),
    "follow_up_shape": ("And what shape is it?", "What shape is it, then?", "And its shape?"),
    "follow_up_color": ("And what color is it?", "What color is it, then?", "And its colour?"),
}

Message = dict[str, Any]
Sample = tuple[list[Message], list[Image.Image]]


# ----------------------------------------------------------------------------- rendering


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, size: int, fill: tuple[int, int, int]) -> None:
    """Draw ``shape`` filling the box ``[x, x + size) x [y, y + size)``."""
    x1, y1 = x + size - 1, y + size - 1
    if shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _render(rng: random.Random, image_size: int, background: str, items: list[tuple[str, str]]) -> Image.Image:
    """Render ``items`` (``(shape, colour)`` pairs) without overlaps.

    A single shape gets the whole canvas (so colour/shape questions see a big, clear shape);
    several shapes each get a random cell of a 2x2 grid, which guarantees a gap between them
    and keeps counting unambiguous.
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    if len(items) == 1:
        cells = [(0, 0, image_size)]
    else:
        half = image_size // 2
        grid = [(cx * half, cy * half, half) for cy in range(2) for cx in range(2)]
        cells = rng.sample(grid, len(items))
    for (shape, colour), (cx, cy, cell) in zip(items, cells):
        # 1 px margin inside each cell so neighbouring shapes are separated by >= 2 px.
        room = cell - 2
        size = rng.randint(room * 13 // 20, room * 18 // 20)
        x = cx + 1 + rng.randint(0, room - size)
        y = cy + 1 + rng.randint(0, room - size)
        _draw_shape(draw, shape, x, y, size, COLORS[colour])
    return image


def _pick_background(rng: random.Random) -> str:
    # None of COLORS is white or black, so every colour/background pair is distinguishable.
    return rng.choice(sorted(BACKGROUNDS))


# ----------------------------------------------------------------------------- chat helpers


def _user(text: str, images: int = 0) -> Message:
    return {"role": "user", "content": [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


# ----------------------------------------------------------------------------- tasks


def _single_shape(rng: random.Random, image_size: int) -> tuple[str, str, Image.Image]:
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    image = _render(rng, image_size, _pick_background(rng), [(shape, colour)])
    return shape, colour, image


def _task_color(rng: random.Random, image_size: int) -> Sample:
    shape, colour, image = _single_shape(rng, image_size)
    messages = [_user(rng.choice(PROMPTS["color"]), images=1), _assistant(colour)]
    if rng.random() < FOLLOW_UP_RATE:
        messages += [_user(rng.choice(PROMPTS["follow_up_shape"])), _assistant(shape)]
    return messages, [image]


def _task_shape(rng: random.Random, image_size: int) -> Sample:
    shape, colour, image = _single_shape(rng, image_size)
    messages = [_user(rng.choice(PROMPTS["shape"]), images=1), _assistant(shape)]
    if rng.random() < FOLLOW_UP_RATE:
        messages += [_user(rng.choice(PROMPTS["follow_up_color"])), _assistant(colour)]
    return messages, [image]


def _task_count(rng: random.Random, image_size: int) -> Sample:
    n, shape = rng.randint(1, MAX_SHAPES), rng.choice(SHAPES)
    colours = [rng.choice(sorted(COLORS)) for _ in range(n)]
    image = _render(rng, image_size, _pick_background(rng), [(shape, c) for c in colours])
    return [_user(rng.choice(PROMPTS["count"]), images=1), _assistant(str(n))], [image]


def _task_caption(rng: random.Random, image_size: int) -> Sample:
    n, shape, colour = rng.randint(1, MAX_SHAPES), rng.choice(SHAPES), rng.choice(sorted(COLORS))
    background = _pick_background(rng)
    image = _render(rng, image_size, background, [(shape, colour)] * n)
    caption = f"{n} {colour} {_plural(shape, n)} on a {background} background."
    return [_user(rng.choice(PROMPTS["caption"]), images=1), _assistant(caption)], [image]


def _task_compare(rng: random.Random, image_size: int) -> Sample:
    first = rng.choice(SHAPES)
    # Decide the answer first so "yes" and "no" are balanced (a uniform second draw would give
    # "no" two thirds of the time and teach the model a prior instead of the task).
    same = rng.random() < 0.5
    second = first if same else rng.choice([s for s in SHAPES if s != first])
    images = []
    for shape in (first, second):
        colour = rng.choice(sorted(COLORS))
        images.append(_render(rng, image_size, _pick_background(rng), [(shape, colour)]))
    return [_user(rng.choice(PROMPTS["compare"]), images=2), _assistant("yes" if same else "no")], images


TASKS: dict[str, Callable[[random.Random, int], Sample]] = {
    "color": _task_color,
    "shape": _task_shape,
    "count": _task_count,
    "caption": _task_caption,
    "compare": _task_compare,
}


# ----------------------------------------------------------------------------- recipe


@dataclass(kw_only=True)
class SyntheticRecipe(ShardRecipe):
    """Generate a synthetic multi-task image-text mixture as WebDataset shards."""

    name: ClassVar[str] = "synthetic"
    metrics: ClassVar[dict[str, list[str]]] = {
        "color": ["exact_match"],
        "shape": ["exact_match"],
        "count": ["exact_match"],
        "caption": ["exact_match"],
        "compare": ["yes_no"],
    }

    samples: int = 1000
    """Total number of samples over all shards."""
    samples_per_shard: int = 250
    """Samples per tar shard; the last shard holds the remainder."""
    tasks: tuple[str, ...] = ("color", "shape", "count", "caption")
    """Tasks to mix, each getting an equal share (+-1) of ``samples``: color, shape, count, caption, compare."""
    image_size: int = 32
    """Width and height of the rendered square images, in pixels."""
    seed: int = 0
    """Seed for everything random: task order, shapes, colours, layouts and prompt wording."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, not the string {self.tasks!r}")
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(
                f"unknown task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(sorted(TASKS))}"
            )
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and without duplicates, got {self.tasks!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        # Exact balance (+-1 per task), then a global shuffle so every shard is a mixture.
        order = [self.tasks[i % len(self.tasks)] for i in range(self.samples)]
        random.Random(self.seed).shuffle(order)
        self._order = order

    def __len__(self) -> int:
        return self.samples

    def record(self, index: int) -> Record:
        # One generator per sample (seeded by a string, which Python hashes with SHA-512, not
        # PYTHONHASHSEED): any shard can be rebuilt alone, so interrupted builds resume.
        rng = random.Random(f"{self.seed}:{index}")
        task = self._order[index]
        messages, images = TASKS[task](rng, self.image_size)
        return Record(
            key=f"{task}-{index:06d}", task=task, messages=messages, images=[(png_bytes(im), "png") for im in images]
        )
