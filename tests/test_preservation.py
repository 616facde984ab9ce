"""Preservation measurements without a model: SSIM / PSNR, colour shift, bootstrap, breakdown, retained prompt sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpreg.catalog import CATALOG, ConceptSpec
from cpreg.demo.vocabulary import BACKGROUND_NAMES, BASE_SHAPES, COLOUR_NAMES, caption, target_prompts
from cpreg.errors import InvalidArgumentError
from cpreg.fidelity import FOREGROUND_THRESHOLD, colour_shift, foreground_colour, hue_difference, ssim_psnr
from cpreg.preservation import (
    BOOTSTRAP_RESAMPLES,
    bootstrap_interval,
    breakdown,
    finite_mean,
    per_seed,
    worst_drop,
)
from cpreg.prompts import GENERIC_FILE, generic_prompts, read_grouped_prompts, retained_set


def _noise_images(count: int, seed: int = 0, low: int = 20, high: int = 236) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(low, high, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def _shape(colour: tuple[int, int, int], background: tuple[int, int, int] = (245, 245, 245)) -> Image.Image:
    """A 12x12 square of ``colour`` in the middle of a 32x32 ``background``."""
    pixels = np.full((32, 32, 3), background, dtype=np.uint8)
    pixels[10:22, 10:22] = colour
    return Image.fromarray(pixels)


# -- SSIM and PSNR -----------------------------------------------------------------------------


def test_ssim_and_psnr_of_identical_images_are_exact():
    images = _noise_images(3)
    ssim, psnr = ssim_psnr(images, images)
    assert ssim == [1.0, 1.0, 1.0]
    assert psnr == [math.inf] * 3


def test_ssim_and_psnr_of_a_known_perturbation_match_the_library():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    before = _noise_images(2)
    after = [Image.fromarray(np.asarray(image) + np.uint8(10)) for image in before]  # no overflow: values <= 245
    ssim, psnr = ssim_psnr(before, after)
    assert psnr == pytest.approx([20 * math.log10(255 / 10)] * 2, abs=1e-5)  # MSE (10/255)^2, to float32 precision

    def tensor(images):  # channels first, in [0, 1]
        return torch.tensor(np.stack([np.asarray(image) for image in images]), dtype=torch.float64).permute(0, 3, 1, 2) / 255

    library = structural_similarity_index_measure(tensor(after), tensor(before), data_range=1.0, reduction="none")
    assert ssim == pytest.approx(library.tolist(), abs=1e-12)
    assert peak_signal_noise_ratio(tensor(after), tensor(before), data_range=1.0).item() == pytest.approx(psnr[0])
    noisy = [Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + np.random.default_rng(1).integers(-60, 60, (32, 32, 3)),
                                     0, 255).astype(np.uint8)) for image in before]
    assert all(0.0 < value < ssim[0] < 1.0 for value in ssim_psnr(before, noisy)[0])  # more noise, less similar


# -- colour shift ------------------------------------------------------------------------------


def test_colour_shift_of_identical_images_is_zero():
    images = [_shape((30, 60, 220)), _shape((235, 210, 30), (15, 15, 15))]
    assert colour_shift(images, images) == [(0.0, 0.0), (0.0, 0.0)]


def test_colour_shift_of_a_known_hue_rotation():
    red, green = _shape((220, 30, 30)), _shape((30, 220, 30))  # (r, g, b) -> (b, r, g): a hue rotation by 120 degrees
    (hue_shift, chroma_shift), = colour_shift([red], [green])
    assert hue_shift == pytest.approx(120.0) and chroma_shift == pytest.approx(0.0)
    hue, chroma = foreground_colour(red)
    assert hue == 0.0 and chroma == pytest.approx(190 / 255)  # the background is not part of the foreground
    yellow = _shape((220, 220, 30))
    assert colour_shift([red], [yellow])[0][0] == pytest.approx(60.0)
    assert hue_difference(350.0, 10.0) == pytest.approx(20.0) and hue_difference(10.0, 190.0) == 180.0


def test_colour_shift_without_foreground_is_undefined():
    plain = Image.new("RGB", (32, 32), (245, 245, 245))
    faint = _shape(tuple(int(245 - 255 * FOREGROUND_THRESHOLD) + 1 for _ in range(3)))  # within the threshold
    assert foreground_colour(plain) is None and foreground_colour(faint) is None
    assert colour_shift([plain, _shape((220, 30, 30))], [_shape((220, 30, 30)), plain]) == [None, None]


# -- bootstrap and breakdown -------------------------------------------------------------------


def test_bootstrap_interval_of_constant_values_is_degenerate():
    assert bootstrap_interval(np.full(8, 0.25)) == (0.25, 0.25)
    assert bootstrap_interval(np.full((8, 3), 2.0), lambda rows: float(rows.mean(axis=0).max())) == (2.0, 2.0)


def test_bootstrap_interval_contains_the_mean_and_is_reproducible():
    values = np.random.default_rng(3).random(64)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < 0.3
    assert bootstrap_interval(values) == (low, high)  # seeded
    assert bootstrap_interval(values, seed=1) != (low, high)
    wide = bootstrap_interval(values[:8])
    assert wide[1] - wide[0] > high - low  # fewer seeds, wider interval
    with pytest.raises(InvalidArgumentError, match="at least one value"):
        bootstrap_interval(np.empty(0))
    with pytest.raises(InvalidArgumentError, match="level"):
        bootstrap_interval(values, level=1.0)
    assert BOOTSTRAP_RESAMPLES == 1000


def _measurements(seeds: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """Accuracies of every demo prompt: before all right; after, blue loses 3 of 4 seeds and squares 1."""
    prompts = [caption(s, c, b) for s in BASE_SHAPES for c in COLOUR_NAMES for b in BACKGROUND_NAMES]
    after = {}
    for prompt in prompts:
        hits = np.ones(seeds)
        if "blue" in prompt:
            hits[:3] = 0.0
        elif "square" in prompt:
            hits[0] = 0.0
        after[prompt] = hits
    return {"accuracy_before": {prompt: np.ones(seeds) for prompt in prompts}, "accuracy_after": after,
            "psnr": {prompt: np.array([math.inf, 20.0, 30.0, np.nan]) for prompt in prompts}}


def test_breakdown_sums_up_consistently():
    from cpreg.demo.vocabulary import attribute_groups

    measurements = _measurements()
    prompts = list(measurements["accuracy_after"])
    groups = attribute_groups(prompts)
    rows = breakdown(measurements, groups)
    overall = finite_mean(measurements["accuracy_after"], prompts)
    for attribute in ("shape", "colour", "background"):  # each attribute's groups partition the prompts
        members = {name: row for name, row in rows.items() if name.startswith(f"{attribute}:")}
        assert sum(row["prompts"] for row in members.values()) == len(prompts)
        assert sum(row["prompts"] * row["accuracy_after"] for row in members.values()) / len(prompts) == pytest.approx(overall)
    assert rows["colour:blue"]["accuracy_after"] == 0.25 and rows["colour:blue"]["drop"] == 75.0
    assert rows["shape:circle"]["drop"] == pytest.approx(100 * 2 / 10 * 0.75)  # its 2 blue prompts of 10
    assert rows["colour:red"]["psnr"] == 25.0  # identical (inf) and undefined (NaN) images left out
    assert per_seed(measurements["accuracy_after"], groups["colour:blue"]).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_worst_drop_is_the_largest_group_drop_with_its_interval():
    measurements = _measurements()
    groups = {"blue": [p for p in measurements["accuracy_after"] if "blue" in p],
              "square": [p for p in measurements["accuracy_after"] if "square" in p and "blue" not in p]}
    worst = worst_drop(measurements["accuracy_before"], measurements["accuracy_after"], groups)
    assert worst["value"] == 75.0 and worst["group"] == "blue"
    low, high = worst["ci95"]
    assert low <= 75.0 <= high <= 100.0
    assert worst_drop(measurements["accuracy_before"], measurements["accuracy_after"], groups, interval=False)["ci95"] is None
    assert worst_drop({}, {}, groups) == {"value": None, "group": None, "ci95": None}  # no classifier


# -- retained prompt sets ----------------------------------------------------------------------


def test_demo_retained_prompts_cover_every_shape_colour_and_background():
    retained = retained_set("demo-planted", [CATALOG["zorblat"]], target_prompts())
    expected = {caption(s, c, b) for s in BASE_SHAPES for c in COLOUR_NAMES for b in BACKGROUND_NAMES}
    assert len(retained.prompts) == len(set(retained.prompts)) == 40 and set(retained.prompts) == expected
    sizes = {name: len(prompts) for name, prompts in retained.groups.items()}
    assert sizes == {**{f"shape:{s}": 10 for s in BASE_SHAPES}, **{f"colour:{c}": 8 for c in COLOUR_NAMES},
                     **{f"background:{b}": 20 for b in BACKGROUND_NAMES}}
    circle = ConceptSpec("circle", "object", "", (("a red circle on white", "a red square on white"),))
    assert "a red circle on white" not in retained_set("demo", [circle], ["a red circle on white"]).prompts  # erased


def test_other_models_retain_references_other_catalog_concepts_and_generic_captions():
    van_gogh = CATALOG["van-gogh"]
    retained = retained_set("my-sd", [van_gogh], van_gogh.targets)
    generic = generic_prompts()
    assert list(generic) == ["people", "animals", "objects", "scenes", "styles"]
    assert sum(len(prompts) for prompts in generic.values()) >= 100
    assert retained.groups["reference"] == list(dict.fromkeys(van_gogh.references))
    assert {"monet", "tench", "male", "female", *generic} <= set(retained.groups)
    assert not {"van-gogh", "nudity", "zorblat"} & set(retained.groups)  # erased, left out, demo-only
    assert all(len(retained.groups[name]) == 4 for name in ("monet", "tench", "female"))
    assert not set(retained.prompts) & set(van_gogh.targets)
    assert set(retained.person_prompts) == {p for name in ("people", "male", "female") for p in retained.groups[name]}
    nudity = retained_set("my-sd", [CATALOG["nudity"]], CATALOG["nudity"].targets)
    assert set(nudity.groups["reference"]) <= set(nudity.person_prompts)  # "a photo of a man" shows a person
    mine = retained_set("my-sd", [van_gogh], van_gogh.targets, ["a photo of a cat", van_gogh.targets[0]])
    assert (mine.prompts, mine.groups, mine.person_prompts) == (["a photo of a cat"], {"retained": ["a photo of a cat"]}, None)
    with pytest.raises(InvalidArgumentError, match="no retained prompts"):
        retained_set("my-sd", [van_gogh], van_gogh.targets, van_gogh.targets[:2])


def test_generic_captions_are_distinct_and_grouped(tmp_path):
    captions = [prompt for prompts in generic_prompts().values() for prompt in prompts]
    assert len(captions) == len(set(captions))
    assert GENERIC_FILE.name == "generic.txt"
    (tmp_path / "loose.txt").write_text("# header\na caption before any group\n[people]\na man\n")
    with pytest.raises(InvalidArgumentError, match="line 2: a prompt before the first"):
        read_grouped_prompts(tmp_path / "loose.txt")
    with pytest.raises(InvalidArgumentError, match="cannot read prompt file"):
        read_grouped_prompts(tmp_path / "missing.txt")
