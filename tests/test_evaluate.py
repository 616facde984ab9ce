"""cpreg.evaluate: documented keys, honest None without a classifier, control mask, grid."""

from __future__ import annotations

import json

import torch
from cpreg.editors import ConceptMask, LayerMask, hooked_layers
from cpreg.editors.fingerprint import model_fingerprint

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
