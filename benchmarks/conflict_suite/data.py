"""The suite's images and chats: general skills for the base model, and the conflicting fine-tuning mixture.

Every image is a 32 x 32 canvas (the tiny LLaVA processor's input size, so nothing is resized;
8 x 8 patches give 16 image tokens) split into a 2 x 2 grid of 16 px cells, with one flat shape
(circle, square, triangle) in one of six saturated colours in some of the cells.

**General skills** (:func:`general_sample`, the base model's full pretraining): colour, shape,
count and position questions in one generic wording each family, on random neutral or pastel
backgrounds, so the base knows the skills before any adapter sees the mixture. The second
mixture's base (vocabulary ``format``) also answers in that mixture's words: French, spelled
colours, grid rows and columns, each under its own explicit instruction.

**The fine-tuning mixture** (:class:`ConflictRecipe`), five tasks over the same skills. Each task
draws its images in its own *domain* (a fixed background colour, and for one task a border),
the only thing that tells apart tasks whose instructions look alike but want different answers,
as real data sets that share a question style but not an answer convention conflict:

============== ============================= =============================== ==========================
task           domain                        instruction (one of 3 wordings) answer
============== ============================= =============================== ==========================
count_digit    light grey background         "How many shapes are in the     ``3``
                                             picture?"
count_sentence dark slate background         the same three wordings         ``There are three shapes.``
left_color     cream background              "What is on the left?"          ``red`` (the left shape's
                                                                             colour)
left_shape     pale blue background          the same three wordings         ``circle`` (its shape)
corner         white background, black       "Which corner is the red        ``top left``
               border                        circle in?"
============== ============================= =============================== ==========================

Two conflicts (``count_digit`` / ``count_sentence``: the same question, a short VQA answer against
a sentence; ``left_color`` / ``left_shape``: the same question, the colour against the shape) and
one task without a twin (``corner``), which shares the position skill. The general-skill wordings
differ from all of these (the base answers "What color is the shape on the left?", not "What is on
the left?"), so every task has something to learn. Answers are scored by exact match after
``mmpeft.metrics.normalize_answer`` (``There are three shapes.`` = ``there are 3 shapes``).

**The second mixture** (``ConflictRecipe(mixture="format")``), conflicts of another kind: one question
with three answer conventions (English, French, spelled out), and two conventions that contradict the
base's own general skills. It uses only the skills the base knows well (colour, count, position;
its shape answers are weak: ``base.json``'s per-skill scores), so every task is learnable.

============== ============================= =============================== ==========================
task           domain                        instruction (one of 3 wordings) answer
============== ============================= =============================== ==========================
colour_en      light grey background         "What colour is the shape?"     ``red``
colour_fr      dark slate background         the same three wordings         ``rouge`` (French)
colour_spelled cream background              the same three wordings         ``r e d`` (spelled out)
count_fr       pale blue background          "How many shapes are in the     ``trois`` (the base says
                                             picture?"                       ``3``)
where_grid     white background, black       "Where is the {colour}          ``row 1 column 2`` (the
               border                        {shape}?"                       base says ``top right``)
============== ============================= =============================== ==========================

Splits are the same recipe with different seeds (train, val and test never share a generator).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image, ImageDraw

from mmpeft.data.build import Record, ShardRecipe, png_bytes
from mmpeft.data.sample import Sample

SIZE = 32
"""Canvas side in pixels: the tiny LLaVA processor's crop size, so images reach the model unresized."""
CELL = SIZE // 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 185),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")  # grid cells in row-major order
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# The fine-tuning domains: background colour and border (None: no border). The two mixtures draw their five
# tasks in the same five domains, in the same order.
Domain = tuple[tuple[int, int, int], tuple[int, int, int] | None]
LIGHT_GREY, DARK_SLATE, CREAM, PALE_BLUE = (200, 200, 200), (55, 65, 75), (245, 230, 185), (190, 215, 245)
BORDERED: Domain = ((255, 255, 255), (0, 0, 0))
MIXTURES: dict[str, dict[str, Domain]] = {
    "conflict": {
        "count_digit": (LIGHT_GREY, None),
        "count_sentence": (DARK_SLATE, None),
        "left_color": (CREAM, None),
        "left_shape": (PALE_BLUE, None),
        "corner": BORDERED,
    },
    "format": {
        "colour_en": (LIGHT_GREY, None),
        "colour_fr": (DARK_SLATE, None),
        "colour_spelled": (CREAM, None),
        "count_fr": (PALE_BLUE, None),
        "where_grid": BORDERED,
    },
}
"""Each mixture's tasks and their image domains."""
DOMAINS: dict[str, Domain] = {task: domain for tasks in MIXTURES.values() for task, domain in tasks.items()}
TASKS = tuple(MIXTURES["conflict"])
FRENCH = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet", "orange": "orange"}
FRENCH_NUMBERS = ("zéro", "un", "deux", "trois", "quatre")

PROMPTS: dict[str, tuple[str, ...]] = {
    "count": ("How many shapes are in the picture?", "How many objects can you see?", "Count the shapes."),
    "left": ("What is on the left?", "What is on the left side?", "Tell me what is on the left."),
    "colour": ("What colour is the shape?", "Which colour does the shape have?", "Name the colour of the shape."),
    "where": (
        "Where is the {colour} {shape}?",
        "Where can you see the {colour} {shape}?",
        "Locate the {colour} {shape}.",
    ),
    "corner": (
        "Which corner is the {colour} {shape} in?",
        "In which corner is the {colour} {shape}?",
        "Where is the {colour} {shape}? Name the corner.",
    ),
}


# -- rendering --------------------------------------------------------------------------------


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(
    rng: random.Random,
    background: tuple[int, int, int],
    items: dict[int, tuple[str, str]],
    border: tuple[int, int, int] | None = None,
) -> Image.Image:
    """``items`` maps a grid cell (0..3, row-major) to ``(shape, colour)``; each shape fills 9 to 12 px of its 16 px
    cell."""
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    if border is not None:
        draw.rectangle((0, 0, SIZE - 1, SIZE - 1), outline=border, width=2)
    for cell, (shape, colour) in items.items():
        cx, cy = (cell % 2) * CELL, (cell // 2) * CELL
        side = rng.randint(9, 12)
        x = cx + rng.randint(2, CELL - 2 - side)
        y = cy + rng.randint(2, CELL - 2 - side)
        draw_shape(draw, shape, (x, y, x + side - 1, y + side - 1), COLORS[colour])
    return image


def random_background(rng: random.Random) -> tuple[int, int, int]:
    """General skills: a neutral grey level, or a light or dark tint (never one of the saturated shape colours)."""
    kind = rng.random()
    if kind < 0.4:
        level = rng.choice((0, 30, 60, 90, 160, 200, 230, 255))
        return (level, level, level)
    base = rng.randint(170, 250) if kind < 0.8 else rng.randint(20, 80)
    return tuple(min(255, max(0, base + rng.randint(-25, 25))) for _ in range(3))  # type: ignore[return-value]


def random_items(rng: random.Random, n: int) -> dict[int, tuple[str, str]]:
    cells = rng.sample(range(4), n)
    return {c: (rng.choice(SHAPES), rng.choice(sorted(COLORS))) for c in cells}


def left_right_items(rng: random.Random) -> tuple[dict[int, tuple[str, str]], tuple[str, str], tuple[str, str]]:
    """Two shapes, one in each column (rows random); the left and right ones differ in colour and in shape."""
    left = (rng.choice(SHAPES), rng.choice(sorted(COLORS)))
    right = (rng.choice([s for s in SHAPES if s != left[0]]), rng.choice([c for c in sorted(COLORS) if c != left[1]]))
    return {2 * rng.randint(0, 1): left, 2 * rng.randint(0, 1) + 1: right}, left, right


def chat(question: str, answer: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def distinct_items(rng: random.Random, n: int) -> dict[int, tuple[str, str]]:
    """``n`` shapes no two of which share both shape and colour, so "the red circle" names one."""
    while True:
        items = random_items(rng, n)
        if len(set(items.values())) == n:
            return items


# -- general skills (the base model's pretraining) ----------------------------------------------


FAMILIES = {"general": 7, "format": 11}
"""What the base's general pretraining answers with (``BaseSettings.vocabulary``), and how many question families it
draws from: ``general``, the seven skill families' own words; ``format``, also four families that answer in the
second mixture's words."""
VOCABULARIES = tuple(FAMILIES)


def general_sample(rng: random.Random, vocabulary: str = "general") -> tuple[list[dict[str, Any]], Image.Image]:
    """One generic colour / shape / count / position question on a random background.

    With ``vocabulary="format"`` four more families (4 draws in 11) answer in the words of the second mixture's
    tasks, each under its own explicit instruction, never the mixture's wordings or domains: the colour in French
    (``rouge``), the colour spelled out (``r e d``), the count in French (``trois``) and a shape's grid row and
    column (``row 1 column 2``). The base then has produced every answer token of that mixture; the fine-tuning
    still has to learn which convention each image domain wants. ``general`` draws exactly as before (the same
    random numbers), so the default base's data and weights do not change."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {vocabulary!r} (known: {', '.join(VOCABULARIES)})")
    background = random_background(rng)
    kind = rng.randrange(FAMILIES[vocabulary])
    if kind >= 7:
        return format_sample(rng, background, kind - 7)
    if kind == 0:
        items = random_items(rng, 1)
        shape, colour = next(iter(items.values()))
        return chat(f"What color is the {shape}?", colour), render(rng, background, items)
    if kind == 1:
        items = random_items(rng, 1)
        shape, colour = next(iter(items.values()))
        return chat(f"What shape is the {colour} object?", shape), render(rng, background, items)
    if kind == 2:
        n = rng.randint(1, 4)
        return chat("How many shapes are there?", str(n)), render(rng, background, random_items(rng, n))
    if kind in (3, 4):
        items, left, right = left_right_items(rng)
        side, (shape, colour) = rng.choice((("left", left), ("right", right)))
        question, answer = (
            (f"What color is the shape on the {side}?", colour)
            if kind == 3
            else (f"What shape is on the {side}?", shape)
        )
        return chat(question, answer), render(rng, background, items)
    if kind == 5:
        items = distinct_items(rng, rng.randint(1, 4))
        cell, (shape, colour) = rng.choice(sorted(items.items()))
        return chat(f"Where is the {colour} {shape}?", CORNERS[cell]), render(rng, background, items)
    n = rng.randint(1, 4)
    items = random_items(rng, n)
    parts = [f"{colour} {shape}" for _, (shape, colour) in sorted(items.items())]
    return chat("Describe the image.", f"{NUMBER_WORDS[n]} shapes: " + ", ".join(parts)), render(rng, background, items)


def format_sample(
    rng: random.Random, background: tuple[int, int, int], family: int
) -> tuple[list[dict[str, Any]], Image.Image]:
    """The ``format`` vocabulary's families (0..3): French colour, spelled colour, French count, grid row and
    column, each asked explicitly."""
    if family in (0, 1):
        items = random_items(rng, 1)
        shape, colour = next(iter(items.values()))
        question, answer = (
            (f"Say in French what color the {shape} is.", FRENCH[colour])
            if family == 0
            else (f"Spell the color of the {shape}.", " ".join(colour))
        )
        return chat(question, answer), render(rng, background, items)
    if family == 2:
        n = rng.randint(1, 4)
        question = "Say in French how many shapes there are."
        return chat(question, FRENCH_NUMBERS[n]), render(rng, background, random_items(rng, n))
    items = distinct_items(rng, rng.randint(1, 4))
    cell, (shape, colour) = rng.choice(sorted(items.items()))
    answer = f"row {cell // 2 + 1} column {cell % 2 + 1}"
    return chat(f"Give the row and column of the {colour} {shape}.", answer), render(rng, background, items)


def general_samples(count: int, seed: int, vocabulary: str = "general") -> list[Sample]:
    out = []
    for i in range(count):
        messages, image = general_sample(random.Random(f"general:{seed}:{i}"), vocabulary)
        out.append(Sample(key=f"general-{i:06d}", task="general", messages=messages, images=[image]))
    return out


# -- the conflicting fine-tuning tasks --------------------------------------------------------


def task_sample(task: str, rng: random.Random) -> tuple[list[dict[str, Any]], Image.Image]:
    background, border = DOMAINS[task]
    if task in ("count_digit", "count_sentence", "count_fr"):
        n = rng.randint(1, 4)
        question = rng.choice(PROMPTS["count"])
        if task == "count_digit":
            answer = str(n)
        elif task == "count_fr":
            answer = FRENCH_NUMBERS[n]
        else:
            answer = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
        return chat(question, answer), render(rng, background, random_items(rng, n), border)
    if task in ("left_color", "left_shape"):
        items, (shape, colour), _ = left_right_items(rng)
        answer = colour if task == "left_color" else shape
        return chat(rng.choice(PROMPTS["left"]), answer), render(rng, background, items, border)
    if task in ("corner", "where_grid"):
        items = distinct_items(rng, rng.randint(2, 4))
        cell, (shape, colour) = rng.choice(sorted(items.items()))
        question = rng.choice(PROMPTS["corner" if task == "corner" else "where"]).format(colour=colour, shape=shape)
        answer = CORNERS[cell] if task == "corner" else f"row {cell // 2 + 1} column {cell % 2 + 1}"
        return chat(question, answer), render(rng, background, items, border)
    if task in ("colour_en", "colour_fr", "colour_spelled"):
        items = random_items(rng, 1)
        colour = next(iter(items.values()))[1]
        answer = {"colour_en": colour, "colour_fr": FRENCH[colour]}.get(task, " ".join(colour))
        return chat(rng.choice(PROMPTS["colour"]), answer), render(rng, background, items, border)
    raise ValueError(f"unknown task {task!r}")


@dataclass(kw_only=True)
class ConflictRecipe(ShardRecipe):
    """The suite's fine-tuning mixture as WebDataset shards: ``samples_per_task`` of each task, shuffled together."""

    name: ClassVar[str] = "conflict_suite"
    metrics: ClassVar[dict[str, list[str]]] = {task: ["exact_match"] for task in DOMAINS}

    mixture: str = "conflict"
    """Which five tasks (:data:`MIXTURES`)."""
    samples_per_task: int = 100
    """Samples of each of the five tasks."""
    seed: int = 0
    """Seed of everything random; the splits use different seeds."""
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixture not in MIXTURES:
            raise ValueError(f"unknown mixture {self.mixture!r} (known: {', '.join(MIXTURES)})")
        order = [task for task in MIXTURES[self.mixture] for _ in range(self.samples_per_task)]
        random.Random(f"order:{self.seed}").shuffle(order)
        self._order = order

    def __len__(self) -> int:
        return len(self._order)

    def record(self, index: int) -> Record:
        task = self._order[index]
        messages, image = task_sample(task, random.Random(f"{self.seed}:{index}"))
        return Record(key=f"{task}-{index:06d}", task=task, messages=messages, images=[(png_bytes(image), "png")])
