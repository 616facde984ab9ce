"""Per-image measurements summed up: means over prompt sets, a per-group breakdown, bootstrap intervals over seeds.

A *measurement* maps a prompt to one value per seed (its ``samples`` images come from the seeds
``seed``, ``seed + 1``...): an accuracy is 1.0 / 0.0 per image, a CLIP score or an SSIM a number,
``NaN`` where a value is undefined (a colour shift without foreground) and ``inf`` for the PSNR of
identical images. A prompt a measurement does not cover (a classifier without labels for it) is
absent. Means over a set of prompts are over all its images with a finite value, so every image
weighs the same; with the same number of images per prompt that is the mean of the per-prompt means.

Intervals are percentile bootstrap intervals over seeds: the seeds are resampled with replacement
(:data:`BOOTSTRAP_RESAMPLES` times, ``numpy.random.default_rng(BOOTSTRAP_SEED)``), every prompt keeping
its images of the drawn seeds, and the interval holds the central :data:`BOOTSTRAP_LEVEL` of the
statistic over the resamples.

Example:
    >>> accuracy = {"a red circle": np.array([1.0, 0.0, 1.0]), "a blue star": np.array([1.0, 1.0, 1.0])}
    >>> finite_mean(accuracy, ["a red circle", "a blue star"])
    0.8333333333333334
    >>> bootstrap_interval(per_seed(accuracy, list(accuracy)))
    (0.5, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import InvalidArgumentError

#: Per prompt, one value per seed.
Measurement = Mapping[str, np.ndarray]

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def finite_mean(measurement: Measurement, prompts: Sequence[str]) -> float | None:
    """Mean of the finite values of ``prompts``' images (``None`` when there is none)."""
    arrays = [measurement[prompt] for prompt in prompts if prompt in measurement]
    values = np.concatenate(arrays) if arrays else np.empty(0)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def per_seed(measurement: Measurement, prompts: Sequence[str]) -> np.ndarray | None:
    """``[seeds]``: at each seed, the mean over the covered ``prompts`` (a measurement defined on every image)."""
    arrays = [measurement[prompt] for prompt in prompts if prompt in measurement]
    return np.stack(arrays).mean(axis=0) if arrays else None


def _mean(values: np.ndarray) -> float:
    return float(values.mean())


def bootstrap_interval(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = _mean,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)``, resampling the rows (seeds) of ``values``.

    ``values`` is ``[seeds]`` or ``[seeds, ...]``; ``statistic`` maps such an array to a number (default:
    the mean). Deterministic for a given ``seed``.

    Example:
        >>> bootstrap_interval(np.array([0.2, 0.4, 0.3, 0.5]))
        (0.25, 0.45)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or len(values) == 0:
        raise InvalidArgumentError("the bootstrap needs at least one value")
    if not 0.0 < level < 1.0:
        raise InvalidArgumentError(f"the interval level must be in (0, 1), got {level}")
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    statistics = np.array([statistic(values[rows]) for rows in draws])
    low, high = np.quantile(statistics, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def summary(measurements: Mapping[str, Measurement], prompts: Sequence[str]) -> dict[str, float | None]:
    """The :func:`finite_mean` of every measurement over ``prompts``."""
    return {name: finite_mean(measurement, prompts) for name, measurement in measurements.items()}


def accuracy_drop(before: float | None, after: float | None) -> float | None:
    """``before - after`` in points of accuracy (100 points = all images), ``None`` if one is unmeasured."""
    return None if before is None or after is None else 100.0 * (before - after)


def breakdown(measurements: Mapping[str, Measurement], groups: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Per group: its number of prompts, the :func:`summary` of its prompts, and ``drop`` (points).

    ``drop`` compares the measurements ``accuracy_before`` and ``accuracy_after`` (``None`` without them).
    """
    rows = {}
    for name, prompts in groups.items():
        row = summary(measurements, prompts)
        rows[name] = {"prompts": len(prompts), **row,
                      "drop": accuracy_drop(row.get("accuracy_before"), row.get("accuracy_after"))}
    return rows


def worst_drop(before: Measurement, after: Measurement, groups: Mapping[str, Sequence[str]],
               *, interval: bool = True) -> dict:
    """The largest accuracy drop (points) of any group, which group, and its bootstrap interval over seeds.

    Returns ``{"value", "group", "ci95"}``, all ``None`` when no group is covered; ``ci95`` is ``None``
    without ``interval``. The interval is that of the statistic itself: each resample takes the
    largest drop of its own, so it accounts for the choice of the worst group.
    """
    names, drops = [], []
    for name, prompts in groups.items():
        first, second = per_seed(before, prompts), per_seed(after, prompts)
        if first is not None and second is not None:
            names.append(name)
            drops.append(first - second)
    if not names:
        return {"value": None, "group": None, "ci95": None}
    matrix = np.stack(drops, axis=1)  # [seeds, groups]

    def largest(rows: np.ndarray) -> float:
        return 100.0 * float(rows.mean(axis=0).max())

    return {"value": largest(matrix), "group": names[int(matrix.mean(axis=0).argmax())],
            "ci95": list(bootstrap_interval(matrix, largest)) if interval else None}
