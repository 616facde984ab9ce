"""Export an edited pipeline as a plain diffusers folder with a model card.

The mask is applied through the same reversible edit as at load time, the pipeline is saved
with safetensors, and the edit is restored, so the in-memory pipeline is unchanged afterwards.
The folder is written under a temporary name and renamed at the end: an interrupted export
leaves nothing at ``out_dir``.

Example:
    >>> export_pipeline(pipe, mask, "sd15-safe", card="# sd15-safe ...")
    >>> DiffusionPipeline.from_pretrained("sd15-safe")
    >>> ws.export("safe-v1", "sd15-safe")  # the base model of a release, its union applied, its card
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .artifacts.atomic import atomic_path
from .editors import ConceptMask, Fill, apply_mask
from .errors import InvalidArgumentError
from .model_card import model_card

if TYPE_CHECKING:
    from .workspace import Workspace


def export_pipeline(pipe, mask: ConceptMask, out_dir: str | Path, card: str, *, fill: Fill | str = Fill.ZERO, seed: int = 0) -> Path:
    """Save ``pipe`` with ``mask`` applied to ``out_dir`` (must not exist or be empty) plus ``README.md``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidArgumentError(f"export target {str(out_dir)!r} exists and is not an empty folder")
    with atomic_path(out_dir, folder=True) as staging:
        with apply_mask(pipe, mask, fill=fill, seed=seed):
            pipe.save_pretrained(staging, safe_serialization=True)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def export(ws: Workspace, ref: str, out_dir: str | os.PathLike, *, base: str | None = None, fill: Fill | str = Fill.ZERO) -> Path:
    """Write a plain diffusers pipeline folder with ``ref`` applied and a model card."""
    entity = ws.registry.resolve(ref)
    mask = ws.load_mask(entity)
    pipe = ws.base_pipeline(entity, base)
    return export_pipeline(pipe, mask, out_dir, model_card(ws, entity, fill=Fill(fill)), fill=fill)
