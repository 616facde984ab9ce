"""Selection and mask algebra: derive_mask against a literal argsort selection, select_ratio,
union, overlap and argument validation, on synthetic statistics (fast, exact)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cpreg.editors import (
    ActivationStats,
    CalibrationConfig,
    ConceptMask,
    LayerMask,
    check_compatible,
    derive_mask,
    overlap,
    skill_counts,
    union,
)

SHAPES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (16, 64),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (24, 128),
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": (8, 100),
}
STEPS = 6


def synthetic_stats(seed: int, steps: int = STEPS, fingerprint: str = "sha256:synthetic") -> ActivationStats:
    generator = torch.Generator().manual_seed(seed)

    def sums(shape):
        # positive sums of squares with a heavy tail, so a few columns stand out as in real layers
        return torch.rand(steps, shape[1], generator=generator).pow(4) * 50

    return ActivationStats(
        target={name: sums(shape) for name, shape in SHAPES.items()},
        reference={name: sums(shape) for name, shape in SHAPES.items()},
        config=CalibrationConfig(num_inference_steps=20, tau=steps, batch_size=2),
        component="unet",
        layer_shapes=dict(SHAPES),
        num_target_prompts=4,
        num_reference_prompts=4,
        fingerprint=fingerprint,
        component_params=10_000,
    )


@pytest.fixture(scope="module")
def weights():
    generator = torch.Generator().manual_seed(123)
    return {name: torch.randn(shape, generator=generator) / math.sqrt(shape[1]) for name, shape in SHAPES.items()}


@pytest.mark.parametrize(
    "skill_ratio, tau, select_ratio",
    [(0.05, STEPS, 0.0), (0.1, STEPS, 0.5), (0.3, 3, 0.0), (0.3, STEPS, 0.34), (1.0, STEPS, 0.0), (0.07, 1, 0.0), (0.02, STEPS, 0.0)],
)
def test_derive_mask_equals_literal_selection(weights, literal_selection, skill_ratio, tau, select_ratio):
    stats = synthetic_stats(0)
    mask = derive_mask(stats, weights, skill_ratio=skill_ratio, tau=tau, select_ratio=select_ratio)
    expected = literal_selection(stats, weights, skill_ratio, tau, select_ratio)
    assert mask.layers.keys() == SHAPES.keys()
    for name, layer in mask.layers.items():
        dense, counts = expected[name]
        assert layer.shape == SHAPES[name]
        assert torch.equal(layer.dense(), dense), name
        assert torch.equal(layer.skill_counts.to(torch.int64), counts.view(-1)[layer.indices]), name
        assert bool((layer.skill_counts >= 1).all()) and bool((layer.skill_counts <= tau).all())
    assert mask.params == {"skill_ratio": skill_ratio, "tau": tau, "select_ratio": select_ratio}
    assert (mask.hook, mask.component, mask.fingerprint) == ("ffn_out", "unet", "sha256:synthetic")
    assert mask.fraction == mask.num_masked / 10_000


def test_skill_counts_respects_k_and_the_reference_condition(weights):
    stats = synthetic_stats(1)
    name = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"  # in_features 100
    weight, target, reference = weights[name], stats.target_norms()[name], stats.reference_norms()[name]
    for skill_ratio in (0.025, 0.05, 0.129):
        k = math.floor(skill_ratio * 100)  # 2, 5, 12
        for step in range(STEPS):
            counts = skill_counts(weight, target[step : step + 1], reference[step : step + 1], skill_ratio)
            assert counts.dtype == torch.uint8 and counts.shape == weight.shape
            assert int(counts.sum(1).max()) <= k  # at most k skilled weights per row and step
            skilled = counts.bool()
            # every skilled weight scores higher on the target than on the reference...
            assert bool((target[step] > reference[step]).expand_as(skilled)[skilled].all())
        # when the target never scores higher than the reference, nothing is skilled
        never = skill_counts(weight, reference[:1], reference[:1] * 2, skill_ratio)
        assert int(never.sum()) == 0
    assert int(skill_counts(weight, target, reference, 0.009).sum()) == 0  # k = floor(0.9) = 0


def test_lower_precision_weights_are_scored_in_fp32(weights):
    stats = synthetic_stats(2)
    half = {name: weight.to(torch.bfloat16) for name, weight in weights.items()}
    exact = {name: weight.float() for name, weight in half.items()}
    assert derive_mask(stats, half, skill_ratio=0.1).equals(derive_mask(stats, exact, skill_ratio=0.1))


@pytest.mark.parametrize("select_ratio", [0.0, 0.1, 0.2, 1 / 3, 0.5, 0.7, 0.9, 0.99])
def test_with_select_ratio_equals_deriving_with_it(weights, select_ratio):
    stats = synthetic_stats(3)
    loose = derive_mask(stats, weights, skill_ratio=0.2)
    strict = derive_mask(stats, weights, skill_ratio=0.2, select_ratio=select_ratio)
    later = loose.with_select_ratio(select_ratio)
    assert later.equals(strict)
    assert later.params == strict.params
    assert strict.num_masked <= loose.num_masked


def test_with_select_ratio_only_tightens_and_validates(weights):
    mask = derive_mask(synthetic_stats(3), weights, skill_ratio=0.2, select_ratio=0.5)
    with pytest.raises(ValueError, match="stricter"):
        mask.with_select_ratio(0.2)
    for bad in (1.0, 1.5, -0.1):  # the same range derive_mask accepts
        with pytest.raises(ValueError, match="select_ratio"):
            mask.with_select_ratio(bad)
    with pytest.raises(ValueError, match="tau"):
        union([mask, mask]).with_select_ratio(0.6)


def test_select_ratio_zero_is_the_union_over_steps(weights):
    stats = synthetic_stats(4)
    all_steps = derive_mask(stats, weights, skill_ratio=0.1)
    per_step = [derive_mask(stats, weights, skill_ratio=0.1, tau=1)]
    for step in range(1, STEPS):  # the mask of step `step` alone: shift the statistics
        shifted = synthetic_stats(4)
        shifted.target = {n: v[step : step + 1] for n, v in stats.target.items()}
        shifted.reference = {n: v[step : step + 1] for n, v in stats.reference.items()}
        per_step.append(derive_mask(shifted, weights, skill_ratio=0.1))
    for name in SHAPES:
        dense = torch.stack([mask.layers[name].dense() for mask in per_step])
        assert torch.equal(all_steps.layers[name].dense(), dense.any(0))
        expected_steps = dense.sum(0).view(-1)[all_steps.layers[name].indices]
        assert torch.equal(all_steps.layers[name].skill_counts.to(torch.int64), expected_steps)


@pytest.fixture(scope="module")
def three_masks(weights):
    return [derive_mask(synthetic_stats(seed), weights, skill_ratio=0.15) for seed in (10, 11, 12)]


def test_union_is_order_independent_and_equals_the_dense_or(three_masks):
    results = [union(list(order)) for order in itertools.permutations(three_masks)]
    for result in results[1:]:
        assert result.equals(results[0])
    merged = results[0]
    for name in SHAPES:
        dense = torch.stack([mask.layers[name].dense() for mask in three_masks])
        assert torch.equal(merged.layers[name].dense(), dense.any(0))
        steps = torch.zeros(SHAPES[name], dtype=torch.uint8).view(-1)
        for mask in three_masks:  # each position keeps its largest step count
            layer = mask.layers[name]
            steps[layer.indices] = torch.maximum(steps[layer.indices], layer.skill_counts)
        assert torch.equal(merged.layers[name].skill_counts, steps[merged.layers[name].indices])
    assert merged.num_masked >= max(mask.num_masked for mask in three_masks)
    assert union([three_masks[0]]).equals(three_masks[0])
    assert union([three_masks[0], three_masks[0]]).equals(three_masks[0])


def test_union_and_overlap_refuse_incompatible_masks(weights, three_masks):
    other_model = derive_mask(synthetic_stats(10, fingerprint="sha256:other"), weights, skill_ratio=0.15)
    with pytest.raises(ValueError, match="fingerprint"):
        union([three_masks[0], other_model], ["nudity", "van gogh"])
    with pytest.raises(ValueError, match="van gogh"):
        union([three_masks[0], other_model], ["nudity", "van gogh"])
    fewer_layers = ConceptMask(
        layers={name: layer for name, layer in three_masks[1].layers.items() if name.startswith("mid")},
        hook="ffn_out",
        component="unet",
        fingerprint="sha256:synthetic",
        component_params=10_000,
    )
    with pytest.raises(ValueError, match="layers"):
        overlap(three_masks[0], fewer_layers)
    other_hook = ConceptMask(**{**three_masks[1].__dict__, "hook": "ffn_in"})
    with pytest.raises(ValueError, match="hook"):
        check_compatible([three_masks[0], other_hook])
    with pytest.raises(ValueError, match="no masks"):
        union([])


def test_overlap_matches_a_dense_computation(three_masks):
    a, b, _ = three_masks
    result = overlap(a, b)
    total_both = total_either = 0
    for name in SHAPES:
        dense_a, dense_b = a.layers[name].dense(), b.layers[name].dense()
        both, either = int((dense_a & dense_b).sum()), int((dense_a | dense_b).sum())
        row = result["layers"][name]
        assert (row["a"], row["b"], row["both"]) == (int(dense_a.sum()), int(dense_b.sum()), both)
        assert row["iou"] == pytest.approx(both / either)
        total_both, total_either = total_both + both, total_either + either
    assert result["both"] == total_both and result["iou"] == pytest.approx(total_both / total_either)
    assert 0 < result["iou"] < 1
    assert overlap(a, a)["iou"] == 1.0
    empty = ConceptMask(
        layers={name: LayerMask(shape, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.uint8)) for name, shape in SHAPES.items()},
        hook="ffn_out",
        component="unet",
        fingerprint="sha256:synthetic",
        component_params=10_000,
    )
    assert overlap(a, empty)["iou"] == 0.0 and overlap(empty, empty)["iou"] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(skill_ratio=0.0), "skill_ratio"),
        (dict(skill_ratio=-0.1), "skill_ratio"),
        (dict(skill_ratio=1.01), "skill_ratio"),
        (dict(skill_ratio=0.1, tau=STEPS + 1), "tau"),
        (dict(skill_ratio=0.1, tau=0), "tau"),
        (dict(skill_ratio=0.1, select_ratio=1.0), "select_ratio"),
        (dict(skill_ratio=0.1, select_ratio=-0.01), "select_ratio"),
    ],
)
def test_derive_mask_validates_arguments(weights, kwargs, match):
    with pytest.raises(ValueError, match=match):
        derive_mask(synthetic_stats(0), weights, **kwargs)


def test_derive_mask_needs_matching_weights(weights):
    stats = synthetic_stats(0)
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    with pytest.raises(ValueError, match=name):
        derive_mask(stats, {n: w for n, w in weights.items() if n != name}, skill_ratio=0.1)
    with pytest.raises(ValueError, match=name):
        derive_mask(stats, {**weights, name: weights[name].t()}, skill_ratio=0.1)


def test_layer_mask_validation():
    with pytest.raises(ValueError, match="increasing"):
        LayerMask((2, 3), torch.tensor([3, 1]), torch.tensor([1, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="increasing"):
        LayerMask((2, 3), torch.tensor([0, 6]), torch.tensor([1, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="int64"):
        LayerMask((2, 3), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.uint8))
    layer = LayerMask.from_counts(torch.tensor([[0, 2, 1], [3, 0, 0]], dtype=torch.uint8), threshold=1)
    assert layer.indices.tolist() == [1, 3] and layer.skill_counts.tolist() == [2, 3]
    rows, cols = layer.rows_cols()
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_identical_target_and_reference_statistics_give_an_empty_mask(weights):
    """Skilled means ``S* > S`` strictly: a concept indistinguishable from its reference prunes nothing."""
    stats = synthetic_stats(0)
    same = ActivationStats(**{**vars(stats), "reference": {name: sums.clone() for name, sums in stats.target.items()}})
    for skill_ratio in (0.02, 0.3, 1.0):
        assert derive_mask(same, weights, skill_ratio=skill_ratio).num_masked == 0


def test_identical_prompts_calibrate_to_an_empty_mask():
    """End to end on the tiny pipeline: the same prompts as targets and references give no skilled weight.

    One prompt per batch, as the reference code runs: then both sides see bit-identical computations
    (larger batches differ by float rounding only, about 1e-7 relative).
    """
    from cpreg.editors import calibrate, hooked_layers
    from cpreg.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd")
    prompts = ["a photo of a cat", "a red car on a road", "a dog"]
    stats = calibrate(pipe, prompts, prompts, CalibrationConfig(num_inference_steps=3, tau=2, batch_size=1))
    assert all(torch.equal(stats.target[name], stats.reference[name]) for name in stats.target)
    layer_weights = {name: layer.weight for name, layer in hooked_layers(pipe, "ffn_out").modules.items()}
    assert derive_mask(stats, layer_weights, skill_ratio=0.5).num_masked == 0


def test_ties_with_the_reference_are_not_skilled():
    """A column exactly as active on the reference as on the target is never skilled, one a hair above it is."""
    weight = torch.ones(2, 4)
    target = torch.tensor([[4.0, 9.0, 1.0, 16.0]])  # sums of squares: N* = 2, 3, 1, 4
    reference = target.clone()
    reference[0, 3] = 15.99  # only the last column leans towards the target
    counts = skill_counts(weight, target.sqrt(), reference.sqrt(), skill_ratio=1.0)
    assert counts.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1]]
