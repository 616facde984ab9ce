"""The demo classifier: names the shape and the colour of 32x32 demo images (safetensors weights)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .build import ShapeClassifier
from .data import SIZE
from .vocabulary import COLOUR_NAMES, SHAPES, prompt_attributes

#: What the classifier names: each image's shape and colour.
CLASSIFIED = ("shape", "colour")


def prompt_labels(prompt: str) -> dict[str, str]:
    """The shape and colour words a demo prompt asks for, e.g. ``{"shape": "circle", "colour": "red"}``."""
    return {k: v for k, v in prompt_attributes(prompt).items() if k in CLASSIFIED}


class DemoClassifier:
    """``predict(images)`` -> list of ``{"shape": ..., "colour": ...}``; ``matches`` and ``attribute_matches``.

    Example:
        >>> classifier.attribute_matches(images, "a blue star on black")
        {'shape': [True, True], 'colour': [True, False]}
    """

    def __init__(self, model: ShapeClassifier) -> None:
        self.model = model.eval()

    @classmethod
    def load(cls, path: str | Path) -> DemoClassifier:
        model = ShapeClassifier()
        model.load_state_dict(load_file(str(path)))
        return cls(model)

    @staticmethod
    def _tensor(images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.float()
        arrays = []
        for image in images:
            if hasattr(image, "convert"):
                image = image.convert("RGB")
                if image.size != (SIZE, SIZE):
                    image = image.resize((SIZE, SIZE))
            arrays.append(np.asarray(image, dtype=np.float32))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div(127.5).sub(1.0)

    @torch.no_grad()
    def predict(self, images: Sequence) -> list[dict[str, str]]:
        """PIL images, uint8 arrays ``[H, W, 3]`` or a float tensor ``[n, 3, 32, 32]`` in [-1, 1]."""
        shape_logits, colour_logits = self.model(self._tensor(images))
        return [{"shape": SHAPES[s], "colour": COLOUR_NAMES[c]}
                for s, c in zip(shape_logits.argmax(1).tolist(), colour_logits.argmax(1).tolist())]

    def covers(self, prompt: str) -> bool:
        """Whether ``prompt`` names a shape or a colour (otherwise every image would match it)."""
        return bool(prompt_labels(prompt))

    def attribute_matches(self, images: Sequence, prompt: str) -> dict[str, list[bool]]:
        """Per attribute the prompt names (``shape``, ``colour``), per image: does the image show it?"""
        predicted = self.predict(images)
        return {k: [pred[k] == v for pred in predicted] for k, v in prompt_labels(prompt).items()}

    def matches(self, images: Sequence, prompt: str) -> list[bool]:
        """Per image: does it show every attribute (shape, colour) the prompt names?"""
        wanted = prompt_labels(prompt)
        return [all(pred[k] == v for k, v in wanted.items()) for pred in self.predict(images)]
