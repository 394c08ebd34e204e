"""Synthetic captioning data written by the tests: coloured shapes with captions that describe them.

``write_shapes_dataset(root, count, seed)`` draws ``count`` images, each holding two shapes of
different colours, one above the other or side by side, and writes them as PNG files with a COCO
captions JSON (``images`` + ``annotations``, two phrasings per image), e.g.

    "a red circle above a blue square"      "a blue square below a red circle"

The caption depends on what a frame encoder must see: two colours, two shapes and where they sit
relative to each other; a constant caption can only get the frequent words right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "SHAPES", "write_shapes_dataset"]

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
_OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def write_shapes_dataset(
    root: str | Path, count: int, seed: int = 0, size: int = 32, file_name: str = "captions.json"
) -> Path:
    """Write ``count`` images under ``root/images/`` and their captions as ``root/<file_name>``.

    Each image (``size`` x ``size``, dark grey background with noise) holds two shapes of different
    colours, the first ``above`` / ``below`` / ``left of`` / ``right of`` the second. Returns the
    JSON path; image ids are 1..count.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour_names = list(COLOURS)
    images, annotations = [], []
    half, shape_size = size // 2, size * 3 // 8
    for image_id in range(1, count + 1):
        c1, c2 = rng.choice(len(colour_names), size=2, replace=False)
        s1, s2 = rng.integers(len(SHAPES), size=2)
        relation = ("above", "below", "left of", "right of")[rng.integers(4)]
        # The first shape's half of the image, then a random spot for each shape within its half.
        first_half = {"above": (0, 0), "below": (0, half), "left of": (0, 0), "right of": (half, 0)}[relation]
        second_half = {"above": (0, half), "below": (0, 0), "left of": (half, 0), "right of": (0, 0)}[
            relation
        ]
        vertical = relation in ("above", "below")
        pixels = rng.normal(40, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for (hx, hy), colour, shape in ((first_half, c1, s1), (second_half, c2, s2)):
            span_x, span_y = (size, half) if vertical else (half, size)
            x = hx + int(rng.integers(0, span_x - shape_size + 1))
            y = hy + int(rng.integers(0, span_y - shape_size + 1))
            _draw(
                draw,
                SHAPES[shape],
                (x, y, x + shape_size - 1, y + shape_size - 1),
                COLOURS[colour_names[colour]],
            )
        name = f"{image_id:05d}.png"
        image.save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        first = f"{colour_names[c1]} {SHAPES[s1]}"
        second = f"{colour_names[c2]} {SHAPES[s2]}"
        for caption in (f"a {first} {relation} a {second}", f"a {second} {_OPPOSITE[relation]} a {first}"):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    path = root / file_name
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path
