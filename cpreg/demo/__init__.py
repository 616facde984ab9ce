"""The demo model: a small Stable Diffusion pipeline trained by the project, shipped with the package.

``cpreg/demo/model/`` is a normal diffusers folder (``DiffusionPipeline.from_pretrained`` loads it);
it draws 32x32 images of ``"a {colour} {shape} on {background}"`` (see :mod:`cpreg.demo.data`).
``classifier.safetensors`` is a small CNN that names the shape and colour of an image.
``python -m cpreg.demo.train`` rebuilds both; ``python -m cpreg.demo.plant`` builds the planted model.

Example:
    >>> from cpreg.models import load_base_pipeline
    >>> pipe = load_base_pipeline("demo")
    >>> classifier = load_classifier()
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
CLASSIFIER_FILE = HERE / "classifier.safetensors"
PLANTED_FILE = HERE / "planted.safetensors"


def load_classifier():
    """The shipped :class:`~cpreg.demo.classify.DemoClassifier` (eval mode, CPU)."""
    from .classify import DemoClassifier

    return DemoClassifier.load(CLASSIFIER_FILE)
