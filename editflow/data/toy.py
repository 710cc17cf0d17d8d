"""Procedural toy edits: the embedded default dataset.

A scene is a plain or gradient background with 1-3 coloured shapes sitting on
the cells of a 3x3 grid. An edit (recolour, add, remove, move, background) is
rendered exactly, so every sample carries its ground truth: the target image,
the changed-region mask and both scene descriptions. Rendering has no
anti-aliasing, so the same seed gives the same bytes on every machine.

Positions live on the grid and every object is named unambiguously, so the
target is fully determined by (source, instruction): a model can in principle
score a perfect edit, and the evaluation can measure how far it is from that.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
    "black": (20, 20, 20),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light gray": (200, 200, 200),
    "beige": (235, 220, 190),
    "sky blue": (170, 210, 240),
    "pale green": (190, 230, 190),
    "lavender": (215, 200, 240),
    "dark gray": (70, 70, 70),
    "navy": (30, 40, 90),
}
SHAPES = ("circle", "square", "triangle", "diamond")
EDIT_KINDS = ("recolor", "add", "remove", "move", "background")

# 3x3 grid cells (row, col) and the ways English names them: where a new object goes ...
CELL_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the top left", "in the upper left"),
    (0, 1): ("at the top", "at the top center", "in the middle of the top edge"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right"),
    (1, 0): ("on the left", "at the left side", "in the middle of the left edge"),
    (1, 1): ("in the center", "in the middle", "right in the centre"),
    (1, 2): ("on the right", "at the right side", "in the middle of the right edge"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left"),
    (2, 1): ("at the bottom", "at the bottom center", "in the middle of the bottom edge"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
# ... and where an object is moved to.
DESTINATION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("to the top left corner", "to the upper left", "into the top left corner"),
    (0, 1): ("to the top", "to the top center", "up to the middle of the top edge"),
    (0, 2): ("to the top right corner", "to the upper right", "into the top right corner"),
    (1, 0): ("to the left", "to the left side", "over to the left"),
    (1, 1): ("to the center", "to the middle", "into the centre"),
    (1, 2): ("to the right", "to the right side", "over to the right"),
    (2, 0): ("to the bottom left corner", "to the lower left", "down to the bottom left"),
    (2, 1): ("to the bottom", "to the bottom center", "down to the middle of the bottom edge"),
    (2, 2): ("to the bottom right corner", "to the lower right", "down to the bottom right"),
}
CELLS = tuple(CELL_PHRASES)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": (
        "Make the {obj} {color}.",
        "Change the color of the {obj} to {color}.",
        "Paint the {obj} {color}.",
        "Recolor the {obj} so that it is {color}.",
        "Turn the {obj} {color}.",
        "Can you make the {obj} {color}?",
        "The {obj} should be {color} instead.",
    ),
    "add": (
        "Add {a} {color} {shape} {where}.",
        "Put {a} {color} {shape} {where}.",
        "Place {a} {color} {shape} {where}.",
        "Draw {a} {color} {shape} {where}.",
        "Insert {a} {color} {shape} {where}, please.",
        "There should be {a} {color} {shape} {where}.",
    ),
    "remove": (
        "Remove the {obj}.",
        "Delete the {obj}.",
        "Get rid of the {obj}.",
        "Erase the {obj} from the picture.",
        "Take away the {obj}.",
        "Please remove the {obj}.",
    ),
    "move": (
        "Move the {obj} {dest}.",
        "Shift the {obj} {dest}.",
        "Slide the {obj} {dest}.",
        "Relocate the {obj} {dest}.",
        "Could you move the {obj} {dest}?",
    ),
    "background": (
        "Change the background to {bg}.",
        "Make the background {bg}.",
        "Replace the background with a plain {bg} one.",
        "Set the background color to {bg}.",
        "Paint the background {bg}.",
    ),
    "background_gradient": (
        "Make the background a gradient from {a} at the top to {b} at the bottom.",
        "Replace the background with a {a} to {b} gradient, top to bottom.",
        "Make the background a gradient from {a} on the left to {b} on the right.",
        "Replace the background with a {a} to {b} gradient, left to right.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    cell: tuple[int, int]

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "cell": list(self.cell)}


@dataclasses.dataclass(frozen=True)
class Background:
    """Plain when `end` is None, else a linear gradient along `direction` ("vertical" or "horizontal")."""

    start: str
    end: str | None = None
    direction: str = "vertical"

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "direction": self.direction}


@dataclasses.dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[Shape, ...]

    def to_json(self) -> dict:
        return {"background": self.background.to_json(), "shapes": [s.to_json() for s in self.shapes]}


@dataclasses.dataclass
class ToyEdit:
    key: str
    source: Image.Image
    target: Image.Image
    mask: Image.Image  # "L": 255 where source and target differ
    instruction: str
    meta: dict


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    return sum(abs(x - y) for x, y in zip(a, b))


def _visible_colors(background: Background) -> list[str]:
    """Shape colours that stand out against every colour of the background."""
    bg = [BACKGROUND_COLORS[background.start]]
    if background.end:
        bg.append(BACKGROUND_COLORS[background.end])
    return [name for name, rgb in SHAPE_COLORS.items() if all(_contrast(rgb, c) >= 150 for c in bg)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene at `size` x `size` pixels, deterministically and without anti-aliasing."""
    bg = scene.background
    start = np.array(BACKGROUND_COLORS[bg.start], dtype=np.float64)
    if bg.end is None:
        pixels = np.broadcast_to(start, (size, size, 3))
    else:
        end = np.array(BACKGROUND_COLORS[bg.end], dtype=np.float64)
        ramp = np.linspace(0.0, 1.0, size)[:, None]
        line = start * (1 - ramp) + end * ramp  # (size, 3)
        pixels = line[:, None, :] if bg.direction == "vertical" else line[None, :, :]
        pixels = np.broadcast_to(pixels, (size, size, 3))
    image = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cell = size / 3
    radius = cell * 0.34
    for s in scene.shapes:
        cy, cx = (s.cell[0] + 0.5) * cell, (s.cell[1] + 0.5) * cell
        fill = SHAPE_COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif s.shape == "square":
            r = radius * 0.85
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=fill)
        elif s.shape == "diamond":
            draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.shape!r}")
    return image


def _name(obj: Shape, scene: Scene, rng: random.Random) -> str:
    """'the red circle', or 'the circle' when it is the only circle (half the time)."""
    if sum(s.shape == obj.shape for s in scene.shapes) == 1 and rng.random() < 0.5:
        return obj.shape
    return f"{obj.color} {obj.shape}"


def _random_background(rng: random.Random, gradient_p: float = 0.3) -> Background:
    names = list(BACKGROUND_COLORS)
    start = rng.choice(names)
    if rng.random() < gradient_p:
        end = rng.choice([n for n in names if n != start])
        return Background(start, end, rng.choice(("vertical", "horizontal")))
    return Background(start)


def _random_scene(rng: random.Random) -> Scene:
    while True:
        background = _random_background(rng)
        colors = _visible_colors(background)
        if len(colors) >= 3:
            break
    cells = rng.sample(CELLS, rng.randint(1, 3))
    shapes: list[Shape] = []
    for cell in cells:
        while True:
            candidate = Shape(rng.choice(SHAPES), rng.choice(colors), cell)
            if all((candidate.shape, candidate.color) != (s.shape, s.color) for s in shapes):
                break
        shapes.append(candidate)
    return Scene(background, tuple(shapes))


def _edit(scene: Scene, kind: str, rng: random.Random) -> tuple[Scene, str, dict]:
    """Apply one edit of `kind`; returns (target scene, instruction, edit details)."""
    shapes = list(scene.shapes)
    free_cells = [c for c in CELLS if all(s.cell != c for s in shapes)]
    taken = {(s.shape, s.color) for s in shapes}
    visible = _visible_colors(scene.background)
    if kind == "recolor":
        i = rng.randrange(len(shapes))
        obj = shapes[i]
        choices = [c for c in visible if c != obj.color and (obj.shape, c) not in taken]
        color = rng.choice(choices)
        text = rng.choice(TEMPLATES[kind]).format(obj=_name(obj, scene, rng), color=color)
        shapes[i] = dataclasses.replace(obj, color=color)
        details = {"object": obj.to_json(), "new_color": color}
    elif kind == "add":
        options = [(sh, c) for sh in SHAPES for c in visible if (sh, c) not in taken]
        shape, color = rng.choice(options)
        cell = rng.choice(free_cells)
        article = "an" if color[0] in "aeiou" else "a"
        where = rng.choice(CELL_PHRASES[cell])
        text = rng.choice(TEMPLATES[kind]).format(a=article, color=color, shape=shape, where=where)
        new = Shape(shape, color, cell)
        shapes.append(new)
        details = {"object": new.to_json()}
    elif kind == "remove":
        obj = shapes.pop(rng.randrange(len(shapes)))
        text = rng.choice(TEMPLATES[kind]).format(obj=_name(obj, scene, rng))
        details = {"object": obj.to_json()}
    elif kind == "move":
        i = rng.randrange(len(shapes))
        obj = shapes[i]
        cell = rng.choice(free_cells)
        dest = rng.choice(DESTINATION_PHRASES[cell])
        text = rng.choice(TEMPLATES[kind]).format(obj=_name(obj, scene, rng), dest=dest)
        shapes[i] = dataclasses.replace(obj, cell=cell)
        details = {"object": obj.to_json(), "to_cell": list(cell)}
    elif kind == "background":
        used = {s.color for s in shapes}
        while True:
            if rng.random() < 0.25:
                start, end = rng.sample(list(BACKGROUND_COLORS), 2)
                template = rng.choice(TEMPLATES["background_gradient"])
                direction = "horizontal" if "left" in template else "vertical"
                background = Background(start, end, direction)
                text = template.format(a=start, b=end)
            else:
                background = Background(rng.choice(list(BACKGROUND_COLORS)))
                text = rng.choice(TEMPLATES[kind]).format(bg=background.start)
            # The shapes must stay visible and the background must really change.
            if background != scene.background and used <= set(_visible_colors(background)):
                break
        details = {"background": background.to_json()}
        return Scene(background, tuple(shapes)), text, details
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return Scene(scene.background, tuple(shapes)), text, details


SIZE_RULE = "a multiple of 8 and at least 24"  # the sizes the toy renders (the config and the CLI check it too)


def valid_size(size: int) -> bool:
    return size >= 24 and size % 8 == 0


def weighted_kinds(weights: Mapping[str, int] | None) -> tuple[str, ...]:
    """The cycle of edit kinds for `weights` (kind -> how many of each cycle; unnamed kinds count 1, 0 drops
    one): {"recolor": 2} makes recolor two in six. None: every kind once."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(EDIT_KINDS))
    if unknown:
        raise ValueError(f"unknown edit kind(s) {unknown}; the toy's kinds are {list(EDIT_KINDS)}")
    bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"edit kind weights must be whole numbers >= 0, got {bad}")
    cycle = tuple(kind for kind in EDIT_KINDS for _ in range(weights.get(kind, 1)))
    if not cycle:
        raise ValueError("every edit kind has weight 0: at least one must be >= 1")
    return cycle


def make_edit(index: int, seed: int = 0, size: int = 64, kinds: tuple[str, ...] = EDIT_KINDS) -> ToyEdit:
    """Sample number `index` of the toy stream for `seed`: independent of every other index."""
    if not valid_size(size):
        raise ValueError(f"toy image size must be {SIZE_RULE}, got {size}")
    rng = random.Random(f"editflow-toy:{seed}:{index}")
    source_scene = _random_scene(rng)
    kind = kinds[index % len(kinds)]  # kinds in a fixed cycle (balanced by default; see weighted_kinds)
    target_scene, instruction, details = _edit(source_scene, kind, rng)
    source, target = render(source_scene, size), render(target_scene, size)
    changed = np.any(np.asarray(source) != np.asarray(target), axis=-1)
    mask = Image.fromarray((changed * 255).astype(np.uint8), "L")
    meta = {
        "instruction": instruction,
        "dataset": "toy",
        "task": kind,
        "edit": details,
        "source_scene": source_scene.to_json(),
        "target_scene": target_scene.to_json(),
        "source_size": [size, size],
        "target_size": [size, size],
        "changed_fraction": float(changed.mean()),
        "seed": seed,
        "index": index,
    }
    return ToyEdit(f"toy{seed:04d}_{index:07d}", source, target, mask, instruction, meta)


def generate(num: int, seed: int = 0, size: int = 64, start: int = 0) -> Iterator[ToyEdit]:
    for index in range(start, start + num):
        yield make_edit(index, seed=seed, size=size)
