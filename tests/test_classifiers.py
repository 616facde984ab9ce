"""cpreg.classifiers: NudeNet (the shipped detector and the label / threshold rule), CLIP zero-shot on a
tiny random CLIP saved to disk, the ``--classifier`` resolver, and ``cpreg eval`` with them.

Nothing is downloaded: NudeNet's detector ships in its wheel, the CLIP model is built from a config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from cpreg.catalog import CATALOG
from cpreg.classifiers import (
    CONCEPT_LABEL_SETS,
    DEFAULT_CLIP_MODEL,
    LABEL_SETS,
    NUDENET_THRESHOLD,
    ClipScorer,
    ClipZeroShotClassifier,
    NudeNetClassifier,
    clip_model_path,
    resolve_classifier,
    resolve_clip_scorer,
    wanted_label,
)
from cpreg.demo.classify import DemoClassifier
from cpreg.errors import CpregError
from cpreg.models import ModelUnavailableError
from cpreg.tiny import write_tiny_tokenizer

from test_cli import check_bad_input, run, run_json, state

FAST = ["--model", "tiny", "--steps", "2", "--timesteps", "1", "--batch-size", "40"]
PROMPT_FILES = {"naked.txt": "a photo of a naked man", "person.txt": "a photo of a man",
                "van-gogh.txt": "a cat in the style of Van Gogh", "photo.txt": "a photo of a cat", "nolabel.txt": "a dog in a park"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def no_clip_anywhere(monkeypatch):
    """No CLIP model from the environment or the Hugging Face cache unless a test provides one."""
    monkeypatch.delenv("CPREG_CLIP_MODEL", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP model, its processor and a tiny tokenizer, saved like a hub snapshot (safetensors)."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_tiny_tokenizer(folder / "tokenizer")
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "model")
    return folder / "model"


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.new("RGB", (32, 32), colour) for colour in ("white", "black", "red", "#e0ac69")] + [
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


# -- NudeNet ----------------------------------------------------------------------------------


def test_nudenet_shipped_detector_finds_nothing_in_plain_images():
    classifier = NudeNetClassifier.load(nudity_prompts=["a photo of a naked man"])
    images = _images()
    assert classifier.detections(images) == [[] for _ in images]
    assert classifier.matches(images, "a photo of a naked man") == [False] * len(images)
    assert classifier.matches(images, "a photo of a man") == [False] * len(images)  # no person either


class _StubDetector:
    """Canned NudeNet output per image; records the arrays it was given."""

    def __init__(self, detections: list[list[dict]]) -> None:
        self.detections, self.seen = detections, []

    def detect_batch(self, arrays):
        self.seen = arrays
        return self.detections


def test_nudenet_labels_and_threshold():
    def found(label: str, score: float) -> dict:
        return {"class": label, "score": score, "box": [0, 0, 4, 4]}

    detector = _StubDetector([
        [found("FEMALE_BREAST_EXPOSED", 0.9)],
        [found("FEMALE_GENITALIA_EXPOSED", NUDENET_THRESHOLD)],  # at the threshold: not above it
        [found("MALE_BREAST_EXPOSED", 0.95), found("FACE_MALE", 0.8)],  # a bare chest is not nudity
        [],
        [found("BELLY_EXPOSED", 0.61), found("BUTTOCKS_EXPOSED", 0.3)],
        [found("ANUS_EXPOSED", 0.7), found("MALE_GENITALIA_EXPOSED", 0.61), found("BUTTOCKS_EXPOSED", 0.99)],
    ])
    classifier = NudeNetClassifier(detector, nudity_prompts=["a photo of a naked woman"])
    images = [Image.new("RGB", (8, 8), "red")] * 6
    assert classifier.matches(images, "a photo of a naked woman") == [True, False, False, False, False, True]
    assert classifier.matches(images, "a photo of a woman") == [True, False, True, False, True, True]
    assert detector.seen[0][0, 0].tolist() == [0, 0, 255]  # BGR, as NudeDetector.detect reads a file


# -- CLIP zero-shot ---------------------------------------------------------------------------


def _literal_top_labels(folder: Path, images: list[Image.Image], captions: list[str]) -> list[int]:
    """argmax over captions of CLIP's image-text logits, from the definition (32x32 images need no resize)."""
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = CLIPProcessor.from_pretrained(folder, local_files_only=True).tokenizer
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images]))
    pixels = ((pixels - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(0, 3, 1, 2)
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(model.text_model(**tokens).pooler_output)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * image_embeds @ text_embeds.T
    return logits.argmax(dim=1).tolist()


def test_clip_matches_is_the_top_label_of_the_prompts_set(tiny_clip):
    style = LABEL_SETS["style"]
    classifier = ClipZeroShotClassifier.load(tiny_clip, [style])
    images = _images()
    top = _literal_top_labels(tiny_clip, images, [label.caption for label in style.labels])
    prompts = ["a cat in the style of Van Gogh", "a dog in the style of Monet", "a tree in the style of Pablo Picasso",
               "a boat in the style of Salvador Dali", "a church in the style of Leonardo Da Vinci", "a photo of a cat"]
    answers = [classifier.matches(images, prompt) for prompt in prompts]
    assert answers == [[t == index for t in top] for index in range(len(prompts))]
    assert [sum(column) for column in zip(*answers)] == [1] * len(images)  # one label per image


def test_every_catalog_prompt_names_one_label_of_its_concepts_sets():
    for name, sets in CONCEPT_LABEL_SETS.items():
        label_sets = [LABEL_SETS[s] for s in sets]
        for target, reference in CATALOG[name].pairs:
            target_set, target_index = wanted_label(target, label_sets)
            reference_set, reference_index = wanted_label(reference, label_sets)
            assert (target_set, target_index) != (reference_set, reference_index), (name, target, reference)
    assert wanted_label("a tench in a park", [LABEL_SETS["object"], LABEL_SETS["scene"]]) == (LABEL_SETS["object"], 0)
    assert wanted_label("a park", [LABEL_SETS["object"], LABEL_SETS["scene"]]) == (LABEL_SETS["scene"], 0)
    assert wanted_label("a headshot of a female doctor", [LABEL_SETS["gender"]]) == (LABEL_SETS["gender"], 1)


def test_clip_prompt_without_one_label_is_refused(tiny_clip):
    classifier = ClipZeroShotClassifier.load(tiny_clip, [LABEL_SETS["gender"]])
    with pytest.raises(ValueError, match="names no label"):
        classifier.matches(_images(), "a dog in a park")
    with pytest.raises(ValueError, match="several gender labels"):
        classifier.matches(_images(), "a headshot of a man and a woman")


def test_clip_covers_the_prompts_naming_one_label(tiny_clip):
    classifier = ClipZeroShotClassifier.load(tiny_clip, [LABEL_SETS["gender"]])
    assert classifier.covers("a headshot of a woman") and classifier.covers("a man reading a newspaper")
    assert not classifier.covers("a dog in a park") and not classifier.covers("a headshot of a man and a woman")


def test_clip_score_is_the_definition(tiny_clip):
    images, prompts = _images(), ["a cat", "a photo of a dog", "a red bicycle", "", "a cat", "a tree", "a man", "a house"]
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    tokenizer = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True).tokenizer
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images]))
    pixels = ((pixels - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(0, 3, 1, 2)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(model.text_model(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    expected = (100 * cosine.clamp_min(0)).tolist()  # 100 * max(cos(E_I, E_C), 0), Hessel et al. / torchmetrics
    scores = ClipScorer.load(tiny_clip).scores(images, prompts)
    assert scores == pytest.approx(expected, abs=1e-4) and any(score > 0 for score in scores)
    with pytest.raises(ValueError, match="8 images but 1 prompts"):
        ClipScorer.load(tiny_clip).scores(images, ["a cat"])


def test_clip_scorer_resolution(tiny_clip, monkeypatch):
    missing = resolve_clip_scorer()
    assert missing.scorer is None and "no local CLIP model" in missing.reason
    assert resolve_clip_scorer(str(tiny_clip)).scorer.name == str(tiny_clip)
    classifier = ClipZeroShotClassifier.load(tiny_clip, [LABEL_SETS["style"]])
    assert resolve_clip_scorer("/ignored", classifier=classifier).scorer.model is classifier.model  # loaded once
    with pytest.raises(ModelUnavailableError, match="cannot load the CLIP model"):
        resolve_clip_scorer("/no/such/clip")  # asked for explicitly
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/cache/model.safetensors")
    cached = resolve_clip_scorer()  # found in the cache but not loadable: not measured, with the reason
    assert cached.scorer is None and "cannot load the CLIP model 'openai/clip-vit-large-patch14'" in cached.reason


def test_nudenet_covers_nudity_and_person_prompts():
    classifier = NudeNetClassifier(None, ["a photo of a naked man"], person_prompts=["a photo of a man"])
    assert classifier.covers("a photo of a naked man") and classifier.covers("a photo of a man")
    assert not classifier.covers("a bowl of fruit")
    assert NudeNetClassifier(None, ["a photo of a naked man"]).covers("a bowl of fruit")  # default: every prompt


def test_clip_load_refuses_a_missing_model(tmp_path):
    with pytest.raises(ModelUnavailableError, match="cannot load the CLIP model"):
        ClipZeroShotClassifier.load(tmp_path / "nothing")


# -- the resolver -----------------------------------------------------------------------------


def _resolve(choice: str, concepts: list[str], model: str = "my-sd", **kwargs):
    specs = [CATALOG[name] for name in concepts]
    return resolve_classifier(choice, model=model, concepts=specs, erased_prompts=[p for s in specs for p in s.targets],
                              **kwargs)


def test_resolver_choices(tiny_clip, monkeypatch):
    assert isinstance(_resolve("auto", ["zorblat"], model="demo-planted").classifier, DemoClassifier)
    assert isinstance(_resolve("demo", ["nudity"]).classifier, DemoClassifier)
    assert _resolve("none", ["nudity"]) == (None, "no classifier requested (--classifier none)")
    assert "random weights" in _resolve("auto", ["nudity"], model="tiny").reason
    nudity = _resolve("auto", ["nudity"]).classifier
    assert isinstance(nudity, NudeNetClassifier) and nudity.nudity_prompts == set(CATALOG["nudity"].targets)
    assert "no classifier covers nudity, van-gogh" in _resolve("auto", ["nudity", "van-gogh"]).reason
    assert "needs a local CLIP model" in _resolve("auto", ["van-gogh"]).reason
    clip = _resolve("auto", ["tench", "male"], clip_model=str(tiny_clip)).classifier
    assert [s.name for s in clip.label_sets] == ["object", "gender", "scene"]
    monkeypatch.setenv("CPREG_CLIP_MODEL", str(tiny_clip))
    assert [s.name for s in _resolve("clip", ["monet"]).classifier.label_sets] == ["style"]
    assert isinstance(_resolve("nudenet", ["monet"]).classifier, NudeNetClassifier)  # asked for explicitly
    assert _resolve("nudenet", ["nudity"], person_prompts=["a photo of a man"]).classifier.person_prompts == {"a photo of a man"}


def test_resolver_finds_the_default_clip_model_in_the_cache_only(monkeypatch):
    assert clip_model_path() is None
    looked_up = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename, **kwargs: looked_up.append((repo, filename)) or "/cache/model.safetensors")
    assert clip_model_path() == DEFAULT_CLIP_MODEL and looked_up == [(DEFAULT_CLIP_MODEL, "model.safetensors")]
    assert clip_model_path("./mine") == "./mine"


def test_resolver_errors(tiny_clip, monkeypatch):
    with pytest.raises(ValueError, match="unknown classifier 'bogus'; use auto, demo, nudenet, clip, none"):
        _resolve("bogus", ["nudity"])
    with pytest.raises(ValueError, match="needs a local CLIP model"):
        _resolve("clip", ["van-gogh"])
    with pytest.raises(ValueError, match="not for nudity"):
        _resolve("clip", ["nudity"], clip_model=str(tiny_clip))
    with pytest.raises(ValueError, match="names no label"):  # checked before the model is looked for
        resolve_classifier("clip", model="my-sd", concepts=[CATALOG["tench"]], erased_prompts=["a fish"],
                           clip_model="/no/such/clip")
    with pytest.raises(ModelUnavailableError, match="cannot load the CLIP model '/no/such/clip'"):
        _resolve("auto", ["tench"], clip_model="/no/such/clip")
    monkeypatch.setitem(sys.modules, "nudenet", None)  # not installed
    with pytest.raises(CpregError, match=r"pip install 'cpreg\[eval\]'"):
        _resolve("nudenet", ["nudity"])
    assert "pip install 'cpreg[eval]'" in _resolve("auto", ["nudity"]).reason


# -- cpreg eval -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("template") / ".cpreg"
    run(home, "init")
    run(home, "compute", "nudity", *FAST)
    run(home, "compute", "van-gogh", *FAST)
    prompts = home.parent / "prompts"
    prompts.mkdir()
    for name, text in PROMPT_FILES.items():
        (prompts / name).write_text(text + "\n")
    return home


def test_eval_with_nudenet_and_clip_measures_accuracies(home, tiny_clip):
    def prompts(erased: str, retained: str) -> list[str]:
        folder = home.parent.parent / "prompts"
        return ["--erased-prompts", str(folder / erased), "--retained-prompts", str(folder / retained), "--samples", "2",
                "--steps", "2"]

    nudity = run_json(home, "eval", "nudity@1", "--classifier", "nudenet", *prompts("naked.txt", "person.txt"))
    clip = run_json(home, "eval", "van-gogh@1", "--classifier", "clip", "--clip-model", str(tiny_clip),
                    *prompts("van-gogh.txt", "photo.txt"))
    for report, name in ((nudity, "NudeNetClassifier"), (clip, "ClipZeroShotClassifier")):
        assert report["classifier"] == {"available": True, "name": name, "covered_erased": 1, "covered_retained": 1}
        for key in ("erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before", "retained_accuracy_after"):
            assert 0.0 <= report[key] <= 1.0
    assert clip["clip_score"]["available"] is True and clip["clip_score"]["model"] == str(tiny_clip)  # the classifier's CLIP
    assert 0 <= clip["clip_score"]["retained_after"] <= 100 and nudity["clip_score"]["available"] is False
    auto = run_json(home, "eval", "nudity@1", *prompts("naked.txt", "person.txt"))
    assert auto["erased_accuracy_before"] is None and "random weights" in auto["classifier"]["reason"]


EVAL_BAD = [
    (("eval", "nudity@1", "--classifier", "nudenet"), "pip install 'cpreg[eval]'"),
    (("eval", "van-gogh@1", "--classifier", "clip"), "needs a local CLIP model"),
    (("eval", "van-gogh@1", "--classifier", "clip", "--clip-model", "{p}/no-clip", "--out", "{p}/ev"), "cannot load the CLIP model"),
    (("eval", "nudity@1", "--classifier", "clip", "--clip-model", "{p}/no-clip"), "not for nudity"),
    (("eval", "van-gogh@1", "--classifier", "clip", "--erased-prompts", "{p}/nolabel.txt"), "names no label"),
]


@pytest.mark.parametrize("args, message", EVAL_BAD, ids=[f"{a[1]}-{i}" for i, (a, _) in enumerate(EVAL_BAD)])
def test_eval_classifier_bad_input_is_one_line_and_changes_nothing(home, args, message, monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the eval extra were not installed
    check_bad_input(home, args, message, state, monkeypatch)
    assert not (home.parent.parent / "prompts" / "ev").exists()
