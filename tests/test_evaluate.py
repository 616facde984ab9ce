"""cpreg.evaluate: documented keys, honest None without a classifier, control mask, grid, preservation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cpreg.editors import ConceptMask, LayerMask, hooked_layers
from cpreg.editors.fingerprint import model_fingerprint

from cpreg.errors import InvalidArgumentError
from cpreg.evaluate import evaluate, random_mask_like

TOP_LEVEL = {"erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before", "retained_accuracy_after",
             "masked_fraction", "proxy", "control", "grid", "classifier"}


def _mask(pipe, density: float = 0.05, seed: int = 0) -> ConceptMask:
    generator = torch.Generator().manual_seed(seed)
    layers = {name: LayerMask.from_counts((torch.rand(m.weight.shape, generator=generator) < density).to(torch.uint8))
              for name, m in hooked_layers(pipe, "ffn_out").modules.items()}
    return ConceptMask(layers, "ffn_out", "unet", model_fingerprint(pipe), sum(p.numel() for p in pipe.unet.parameters()))


class _Always:
    def __init__(self, answer: bool) -> None:
        self.answer = answer

    def matches(self, images, prompt):
        return [self.answer] * len(images)


def test_without_classifier_accuracies_are_none_with_reason(tiny_pipeline):
    pipe = tiny_pipeline()
    mask = _mask(pipe)
    report = evaluate(pipe, mask, ["a red circle"], ["a blue square"], samples=1, steps=2)
    assert TOP_LEVEL <= set(report)
    for key in ("erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before", "retained_accuracy_after"):
        assert report[key] is None
    assert report["classifier"]["available"] is False and report["classifier"]["reason"]
    denoiser = sum(p.numel() for p in pipe.unet.parameters())
    assert report["masked_fraction"] == mask.num_masked / denoiser
    assert report["proxy"]["available"] and report["proxy"]["erased_change"] > 0
    assert report["control"] is None
    json.dumps(report)


def test_weights_are_restored_and_control_and_grid(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    report = evaluate(pipe, _mask(pipe), ["a red circle"], ["a blue square", "a cat"], classifier=_Always(True),
                      samples=2, steps=2, control=True, out_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert report["erased_accuracy_before"] == 1.0 and report["retained_accuracy_after"] == 1.0
    assert report["control"]["masked"] == report["masked"]
    assert report["control"]["erased_accuracy_after"] == 1.0
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "report.json").is_file()


def test_random_mask_like_keeps_per_layer_counts(tiny_pipeline):
    pipe = tiny_pipeline()
    mask = _mask(pipe, 0.1)
    control = random_mask_like(mask, seed=3)
    assert control.counts() == mask.counts()
    assert random_mask_like(mask, seed=3).equals(control)


class _ByPixels:
    """A deterministic stand-in with the demo classifier's interface: attributes from mean channel values."""

    def covers(self, prompt):
        return prompt != "an uncovered prompt"

    def attribute_matches(self, images, prompt):
        means = [np.asarray(image, dtype=np.float64).mean(axis=(0, 1)) for image in images]
        return {"shape": [bool(m[0] > 127) for m in means], "colour": [bool(m[1] > 127) for m in means]}

    def matches(self, images, prompt):
        found = self.attribute_matches(images, prompt)
        return [a and b for a, b in zip(found["shape"], found["colour"])]


PRESERVATION_KEYS = {"erased_accuracy_after_ci95", "retained_drop_worst", "retained_drop_worst_group", "retained_drop_worst_ci95",
                     "attribute_accuracy", "fidelity", "colour_fidelity", "clip_score", "breakdown"}


def test_preservation_report_is_consistent(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline()
    retained = ["a red circle", "a blue square", "a cat", "a dog", "an uncovered prompt"]
    groups = {"shapes": retained[:2], "animals": retained[2:4], "nothing": retained[4:]}
    report = evaluate(pipe, _mask(pipe, 0.2), ["a zorblat", "a red zorblat"], retained, retained_groups=groups,
                      classifier=_ByPixels(), samples=3, steps=2, control=True, colour_fidelity=True, out_dir=tmp_path)
    assert TOP_LEVEL | PRESERVATION_KEYS | {"bootstrap"} <= set(report)
    assert PRESERVATION_KEYS | {"masked", "proxy", "erased_accuracy_after", "retained_accuracy_after"} <= set(report["control"])
    assert report["classifier"]["covered_retained"] == 4 and "an uncovered prompt" not in report["per_prompt"]["after"]
    rows = report["breakdown"]
    assert rows["nothing"]["accuracy_after"] is None and rows["nothing"]["drop"] is None  # not covered: not measured
    assert rows["nothing"]["ssim"] is not None  # classifier-free: measured
    covered = {name: row for name, row in rows.items() if row["accuracy_after"] is not None}
    assert sum(2 * row["accuracy_after"] for row in covered.values()) / 4 == pytest.approx(report["retained_accuracy_after"])
    for row in covered.values():
        assert row["drop"] == pytest.approx(100 * (row["accuracy_before"] - row["accuracy_after"]))
    worst = max(covered, key=lambda name: covered[name]["drop"])
    assert (report["retained_drop_worst_group"], report["retained_drop_worst"]) == (worst, covered[worst]["drop"])
    low, high = report["erased_accuracy_after_ci95"]
    assert 0.0 <= low <= high <= 1.0
    joint = report["attribute_accuracy"]["joint"]
    assert (joint["erased_after"], joint["retained_before"]) == (report["erased_accuracy_after"], report["retained_accuracy_before"])
    assert set(report["attribute_accuracy"]) == {"shape", "colour", "joint"}
    assert report["fidelity"]["retained"]["images"] == 15 and 0.0 < report["fidelity"]["retained"]["ssim"] <= 1.0
    assert report["colour_fidelity"]["available"] is True
    assert report["clip_score"] == {"available": False, "reason": "no CLIP scorer given"}
    assert report["bootstrap"]["seeds"] == 3 and "reason" not in report["bootstrap"]
    assert report["settings"]["retained_groups"] == groups
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))  # no NaN or inf


def test_one_seed_gives_no_interval_and_stray_groups_are_refused(tiny_pipeline):
    pipe = tiny_pipeline()
    report = evaluate(pipe, _mask(pipe), ["a red circle"], ["a blue square"], classifier=_Always(True), samples=1, steps=2)
    assert report["erased_accuracy_after_ci95"] is None and report["retained_drop_worst_ci95"] is None
    assert report["retained_drop_worst"] == 0.0 and report["retained_drop_worst_group"] == "retained"
    assert "one seed" in report["bootstrap"]["reason"]
    assert report["colour_fidelity"]["available"] is False and report["attribute_accuracy"] is None
    with pytest.raises(InvalidArgumentError, match="'a cat' is not a retained prompt"):
        evaluate(pipe, _mask(pipe), ["a red circle"], ["a blue square"], retained_groups={"pets": ["a cat"]}, samples=1)


def test_eval_on_the_planted_demo_reports_preservation(tmp_path):
    from test_cli import run, run_json

    home = tmp_path / ".cpreg"
    run(home, "compute", "zorblat", "--model", "demo-planted", "--skill-ratio", "0.05", "--steps", "4", "--timesteps", "2")
    report = run_json(home, "eval", "zorblat", "--samples", "1", "--steps", "2")
    assert PRESERVATION_KEYS <= set(report) and report["model"] == "demo-planted"
    assert len(report["settings"]["retained_prompts"]) == 40 and report["classifier"]["covered_retained"] == 40
    assert set(report["attribute_accuracy"]) == {"shape", "colour", "joint"}
    assert {"shape:star", "colour:blue", "background:black"} <= set(report["breakdown"])
    assert report["colour_fidelity"]["available"] is True and report["colour_fidelity"]["retained"]["images"] > 0
    assert report["clip_score"]["available"] is False and "no local CLIP model" in report["clip_score"]["reason"]
    assert report["retained_drop_worst_group"] in report["breakdown"]
    human = run(home, "eval", "zorblat", "--samples", "1", "--steps", "2").stdout
    assert "worst retained drop" in human and "hue (deg)" in human and "one seed" in human
