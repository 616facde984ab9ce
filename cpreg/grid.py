"""Before/after image grids: the base model and the edited model, same prompts, same seeds.

Example:
    >>> image = before_after_grid(pipe, mask, ["a photo of a naked man"], seed=0, steps=25)
    >>> image.save("grid.png")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from .editors import ConceptMask, apply_mask

LABEL_HEIGHT = 14


def _generate(pipe, prompts: Sequence[str], seed: int, steps: int, guidance_scale: float) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]
    return pipe(prompt=list(prompts), generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale).images


def before_after_grid(
    pipe,
    mask: ConceptMask,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    labels: tuple[str, str] = ("base", "edited"),
) -> Image.Image:
    """One row per prompt: the base image left, the edited image right (same seed)."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe, prompts, seed, steps, guidance_scale)
    with apply_mask(pipe, mask):
        after = _generate(pipe, prompts, seed, steps, guidance_scale)
    width, height = before[0].size
    grid = Image.new("RGB", (2 * width, LABEL_HEIGHT + len(prompts) * height), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * width + 2, 1), label, fill="black")
    for row, (left, right) in enumerate(zip(before, after)):
        grid.paste(left, (0, LABEL_HEIGHT + row * height))
        grid.paste(right, (width, LABEL_HEIGHT + row * height))
    return grid
