"""Classifier-free fidelity of an edited image to the base image of the same seed: SSIM, PSNR, colour shift.

SSIM and PSNR are ``torchmetrics``' (``structural_similarity_index_measure``: 11x11 Gaussian window,
sigma 1.5, k1 0.01, k2 0.03; ``peak_signal_noise_ratio``), per image pair, on RGB in [0, 1] (data
range 1). Identical images have SSIM 1 and PSNR ``inf``.

The colour shift is meant for flat shapes on a plain background (the demo images):

- background colour: the per-channel median of the image's one-pixel border;
- foreground: the pixels that differ from it by more than :data:`FOREGROUND_THRESHOLD` in some channel;
- foreground colour: the mean RGB of the foreground, as HSV hue (degrees) and chroma (max - min
  channel, in [0, 1]; a grey foreground has chroma 0 and, by ``colorsys``' convention, hue 0);
- shift of a pair: the circular hue difference in [0, 180] degrees and the absolute chroma
  difference of the two foreground colours; undefined (``None``) when either image has no foreground.

Example:
    >>> ssim, psnr = ssim_psnr(base_images, edited_images)
    >>> hue_shift, chroma_shift = colour_shift(base_images, edited_images)[0]
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

#: A pixel is foreground when one of its channels differs from the background colour by more than this.
FOREGROUND_THRESHOLD = 0.25


def image_array(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` float64 RGB in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _batch(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([image_array(image) for image in images])).permute(0, 3, 1, 2)


def ssim_psnr(before: Sequence[Image.Image], after: Sequence[Image.Image]) -> tuple[list[float], list[float]]:
    """SSIM and PSNR (dB) of each pair ``(before[i], after[i])`` of equally sized images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    target, preds = _batch(before), _batch(after)
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return ssim.tolist(), psnr.tolist()


def foreground_colour(image: Image.Image) -> tuple[float, float] | None:
    """HSV hue (degrees) and chroma of the mean foreground colour, or ``None`` without foreground."""
    pixels = image_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    foreground = np.abs(pixels - background).max(axis=2) > FOREGROUND_THRESHOLD
    if not foreground.any():
        return None
    red, green, blue = pixels[foreground].mean(axis=0)
    hue, _, _ = colorsys.rgb_to_hsv(red, green, blue)
    return 360.0 * hue, float(max(red, green, blue) - min(red, green, blue))


def hue_difference(first: float, second: float) -> float:
    """The circular difference of two hues in degrees, in [0, 180]."""
    difference = abs(first - second) % 360.0
    return min(difference, 360.0 - difference)


def colour_shift(before: Sequence[Image.Image], after: Sequence[Image.Image]) -> list[tuple[float, float] | None]:
    """Per pair: ``(hue shift in degrees, absolute chroma shift)`` of the foreground, or ``None`` (no foreground)."""
    shifts: list[tuple[float, float] | None] = []
    for first, second in zip(before, after, strict=True):
        colours = foreground_colour(first), foreground_colour(second)
        if None in colours:
            shifts.append(None)
        else:
            (hue_a, chroma_a), (hue_b, chroma_b) = colours
            shifts.append((hue_difference(hue_a, hue_b), abs(chroma_a - chroma_b)))
    return shifts
