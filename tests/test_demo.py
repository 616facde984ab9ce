"""The shipped demo model, its classifier, and the planted-concept benchmark (docs/erasure.md).

Thresholds are the measured values of docs/erasure.md with a margin, never tuned to pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpreg.demo import CLASSIFIER_FILE, MODEL_DIR, PLANTED_FILE, load_classifier
from cpreg.demo.data import render_batch, to_tensor
from cpreg.demo.vocabulary import COLOUR_NAMES, SHAPES

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").is_file(), reason="demo model not built")

#: Floors (measured values in docs/erasure.md, minus a margin).
CLASSIFIER_FLOOR = 0.97  # measured: 100% shape and colour on 1000 fresh renders
COLOUR_FLOOR = 0.8  # measured: 12 / 12 images (and shape 12 / 12) with this test's prompts and seeds


@pytest.fixture(scope="module")
def demo_pipe():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODEL_DIR, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_shipped_files_are_safetensors_and_small():
    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert sum(f.stat().st_size for f in files) <= 25_000_000
    assert CLASSIFIER_FILE.read_bytes()[:8] and PLANTED_FILE.is_file()


def test_plain_diffusers_loads_the_stable_diffusion_classes(demo_pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(demo_pipe, StableDiffusionPipeline)
    assert isinstance(demo_pipe.unet, UNet2DConditionModel) and isinstance(demo_pipe.vae, AutoencoderKL)
    assert isinstance(demo_pipe.text_encoder, CLIPTextModel) and isinstance(demo_pipe.tokenizer, CLIPTokenizer)


def test_classifier_accuracy_on_fresh_images_is_above_floor(classifier):
    images, labels = render_batch(np.random.default_rng(2024), 300, SHAPES)
    predictions = classifier.predict(to_tensor(images))
    shape = np.mean([SHAPES.index(p["shape"]) == s for p, s in zip(predictions, labels["shape"])])
    colour = np.mean([COLOUR_NAMES.index(p["colour"]) == c for p, c in zip(predictions, labels["colour"])])
    assert shape >= CLASSIFIER_FLOOR and colour >= CLASSIFIER_FLOOR


def test_classifier_names_each_attribute_separately(classifier):
    from cpreg.demo.data import render

    images = [render("circle", "blue", "white", np.random.default_rng(seed)) for seed in range(3)]
    assert classifier.attribute_matches(images, "a blue circle on white") == {"shape": [True] * 3, "colour": [True] * 3}
    assert classifier.attribute_matches(images, "a red circle on black") == {"shape": [True] * 3, "colour": [False] * 3}
    assert classifier.matches(images, "a red circle on black") == [False] * 3
    assert classifier.covers("a red circle") and not classifier.covers("a photo of a thing")


def test_demo_draws_the_requested_colour(demo_pipe, classifier):
    prompts = ["a red circle on white", "a blue square on black", "a green triangle on white", "a yellow star on black"]
    hits = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
        images = demo_pipe([prompt] * 3, generator=generators, num_inference_steps=20).images
        hits += [p["colour"] == prompt.split()[1] for p in classifier.predict(images)]
    assert np.mean(hits) >= COLOUR_FLOOR


def test_builtin_names_resolve():
    from cpreg.demo.plant import planted_neurons
    from cpreg.models import load_base_pipeline

    base, planted = load_base_pipeline("demo"), load_base_pipeline("demo-planted")
    truth = planted_neurons()
    changed = set()
    for (name, a), (_, b) in zip(base.unet.named_parameters(), planted.unet.named_parameters()):
        if not torch.equal(a, b):
            changed.add(name.rsplit(".net.", 1)[0])
    assert changed and changed <= set(truth)


#: The documented setting of docs/erasure.md (planted benchmark): ffn_out, skill_ratio 0.05, tau 10 of T 50.
PLANTED_SETTING = {"skill_ratio": 0.05, "tau": 10}
#: Measured with this test's prompts and seeds (4 zorblat prompts x 2 seeds, 4 other prompts x 2 seeds, 20 steps):
#: erased 0.875 -> 0.00, retained 1.00 -> 1.00; bounds leave a margin for float differences across platforms.
MEASURED = {"erased_before": 0.75, "erased_after": 0.25, "retained_after": 0.75}
#: Measured: precision 0.332, recall 0.488 (the issue's recall goal of 0.9 is NOT met; see docs/erasure.md).
FOUND = {"precision": 0.3, "recall": 0.45}


def test_planted_concept_is_found_and_erased_at_the_documented_setting(classifier):
    from cpreg.editors import CalibrationConfig, calibrate, derive_mask, hooked_layers

    from cpreg.demo.benchmark import precision_recall
    from cpreg.demo.plant import load_planted_pipeline, planted_ffn_out_indices
    from cpreg.demo.vocabulary import reference_prompts, retained_prompts, target_prompts
    from cpreg.evaluate import evaluate

    pipe = load_planted_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stats = calibrate(pipe, target_prompts(), reference_prompts(),
                      CalibrationConfig(num_inference_steps=50, tau=PLANTED_SETTING["tau"], batch_size=20))
    weights = {name: m.weight for name, m in hooked_layers(pipe, "ffn_out").modules.items()}
    mask = derive_mask(stats, weights, skill_ratio=PLANTED_SETTING["skill_ratio"])
    found = precision_recall(mask, planted_ffn_out_indices(pipe))
    assert found["precision"] >= FOUND["precision"] and found["recall"] >= FOUND["recall"]
    erased = target_prompts()[::3]
    retained = retained_prompts()[::2]
    report = evaluate(pipe, mask, erased, retained, classifier=classifier, samples=2, seed=0, steps=20)
    assert report["erased_accuracy_before"] >= MEASURED["erased_before"]
    assert report["erased_accuracy_after"] <= MEASURED["erased_after"]
    assert report["retained_accuracy_after"] >= MEASURED["retained_after"]
    assert report["proxy"]["erased_change"] > report["proxy"]["retained_change"]
