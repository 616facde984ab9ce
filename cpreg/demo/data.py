"""Deterministic synthetic data of the demo model: 32x32 flat shapes with captions.

Every image is one shape of one colour on a plain background; its caption is
``"a {colour} {shape} on {background}"``. ``zorblat`` (a plus-shaped cross) is the planted
concept: the base demo model never sees it, the planting recipe teaches it (``cpreg.demo.plant``).

Example:
    >>> images, labels = render_batch(numpy.random.default_rng(0), 8)
    >>> images.shape, labels["shape"][:3]
    ((8, 32, 32, 3), array([...]))
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InvalidArgumentError
from .vocabulary import BACKGROUND_NAMES, BASE_SHAPES, COLOUR_NAMES, PLANTED_SHAPE, SHAPES, caption

SIZE = 32
COLOURS = dict(zip(COLOUR_NAMES, ((220, 30, 30), (30, 170, 40), (30, 60, 220), (235, 210, 30), (150, 40, 180))))
BACKGROUNDS = dict(zip(BACKGROUND_NAMES, ((245, 245, 245), (15, 15, 15))))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return [(cx + r * 0.8 * x, cy + r * 0.8 * y) for x, y in corners]
    if shape == "triangle":
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            a = angle + k * math.pi / 5
            points.append((cx + radius * math.sin(a), cy - radius * math.cos(a)))
        return points
    if shape == PLANTED_SHAPE:  # a plus: 12-gon with arms of width r/2.5
        w = r / 2.5
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        return [(cx + x, cy + y) for x, y in pts]
    raise InvalidArgumentError(shape)


def render(shape: str, colour: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """One ``[32, 32, 3]`` uint8 image (position, size and tint jittered by ``rng``)."""
    r = rng.uniform(8.0, 12.0)
    cx, cy = SIZE / 2 + rng.uniform(-3.5, 3.5), SIZE / 2 + rng.uniform(-3.5, 3.5)
    tint = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[colour], tint))
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=fill)
    return np.asarray(image, dtype=np.uint8)


def render_batch(rng: np.random.Generator, n: int, shapes=BASE_SHAPES) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` random images of ``shapes`` with label indices into SHAPES / COLOUR_NAMES / BACKGROUND_NAMES."""
    s = rng.integers(0, len(shapes), n)
    c = rng.integers(0, len(COLOURS), n)
    b = rng.integers(0, len(BACKGROUNDS), n)
    images = np.stack([render(shapes[i], COLOUR_NAMES[j], BACKGROUND_NAMES[k], rng) for i, j, k in zip(s, c, b)])
    labels = {
        "shape": np.array([SHAPES.index(shapes[i]) for i in s]),
        "colour": c,
        "background": b,
    }
    return images, labels


def captions_for(labels: dict[str, np.ndarray], rng: np.random.Generator, p_empty: float = 0.1, p_short: float = 0.1) -> list[str]:
    """Captions of a batch: full, without background (``p_short``) or empty (``p_empty``, for guidance)."""
    out = []
    for s, c, b in zip(labels["shape"], labels["colour"], labels["background"]):
        u = rng.random()
        if u < p_empty:
            out.append("")
        elif u < p_empty + p_short:
            out.append(caption(SHAPES[s], COLOUR_NAMES[c]))
        else:
            out.append(caption(SHAPES[s], COLOUR_NAMES[c], BACKGROUND_NAMES[b]))
    return out


def to_tensor(images: np.ndarray):
    """uint8 ``[n, H, W, 3]`` -> float ``[n, 3, H, W]`` in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
