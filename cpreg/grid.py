"""Seeded image generation and labelled image grids (base, edited, control... side by side).

Example:
    >>> images = generate_images(pipe, ["a red circle"], samples=2, seed=0, steps=25)
    >>> labelled_grid({"base": images}, ["a red circle"], per_prompt=2).save("grid.png")
    >>> before_after_grid(pipe, mask, ["a photo of a naked man"], seed=0, steps=25).save("grid.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw

from .editors import ConceptMask, apply_mask

LABEL_HEIGHT = 12
#: Prompts longer than this are cut in the grid's row labels.
PROMPT_LABEL_CHARS = 60


def generate_images(
    pipe,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
) -> dict[str, list[Image.Image]]:
    """``samples`` images per prompt; sample ``i`` of every prompt starts from the noise of seed ``seed + i``.

    The noise comes from seeded CPU generators, so every device and batch size draws the same.
    """
    jobs = [(prompt, seed + i) for prompt in prompts for i in range(samples)]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        images += pipe(prompt=[p for p, _ in chunk], generator=generators, num_inference_steps=steps,
                       guidance_scale=guidance_scale).images
    return {prompt: images[i * samples : (i + 1) * samples] for i, prompt in enumerate(prompts)}


def labelled_grid(
    columns: Mapping[str, Mapping[str, Sequence[Image.Image]]], prompts: Sequence[str], per_prompt: int = 1
) -> Image.Image:
    """One labelled column per entry of ``columns`` ({label: {prompt: images}}), one row per prompt.

    Each cell holds the first ``per_prompt`` images of that prompt; the prompt is written above its row.
    """
    labels = list(columns)
    width, height = next(iter(columns.values()))[prompts[0]][0].size
    block = per_prompt * width + 4
    grid = Image.new("RGB", (len(labels) * block, LABEL_HEIGHT + len(prompts) * (height + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * block + 2, 0), label, fill="black")
        for r, prompt in enumerate(prompts):
            y = LABEL_HEIGHT + r * (height + LABEL_HEIGHT)
            if c == 0:
                draw.text((2, y), prompt[:PROMPT_LABEL_CHARS], fill="gray")
            for i, image in enumerate(columns[label][prompt][:per_prompt]):
                grid.paste(image, (c * block + i * width, y + LABEL_HEIGHT))
    return grid


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
    run = {"seed": seed, "steps": steps, "guidance_scale": guidance_scale, "batch_size": len(prompts)}
    before = generate_images(pipe, prompts, **run)
    with apply_mask(pipe, mask):
        after = generate_images(pipe, prompts, **run)
    return labelled_grid(dict(zip(labels, (before, after))), prompts)
