"""Use masks on pipelines: load a base model checked against a mask's fingerprint, apply, switch.

Every edit goes through the edit stack of :mod:`cpreg.editors.edit` (``docs/editing.md``).
These are the workspace methods of the same names.

Example:
    >>> pipe, edit = ws.load_pipeline("safe-v1")   # base model + release applied
    >>> ws.apply(pipe, "nudity@prod", replace=True)  # switch: restore everything, apply this one
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .editors import Fill, MaskEdit, apply_mask, component_module, denoiser_component, model_fingerprint, switch
from .errors import InvalidArgumentError
from .models import load_base_pipeline
from .registry import Mask, Release

if TYPE_CHECKING:
    from .workspace import Workspace


def base_pipeline(ws: Workspace, ref: str | Mask | Release, base: str | None = None, *, dtype: str = "float32",
                  device: str | None = "cpu", **from_pretrained_kwargs):
    """Load the base model recorded for ``ref`` (or ``base``) and check its fingerprint."""
    entity = ref if isinstance(ref, (Mask, Release)) else ws.registry.resolve(ref)
    model = base or ws.registry.get_base_model(entity.base_model_fingerprint).name
    pipe = load_base_pipeline(model, dtype=dtype, device=device, **from_pretrained_kwargs)
    _check_fingerprint(ws, pipe, entity, model)
    return pipe


def _check_fingerprint(ws: Workspace, pipe, entity: Mask | Release, model: str) -> None:
    denoiser = component_module(pipe, denoiser_component(pipe))
    if next(denoiser.parameters()).dtype == torch.bfloat16:
        return  # bf16 rounds differently (docs/method.md): names and shapes are still checked on apply
    found = model_fingerprint(pipe)
    if found != entity.base_model_fingerprint:
        raise InvalidArgumentError(
            f"{entity.ref} was made on base model {entity.base_model_fingerprint[:23]}..., "
            f"but {model!r} has fingerprint {found[:23]}..."
        )


def apply(ws: Workspace, pipe, ref: str | Mask | Release, *, fill: Fill | str = Fill.ZERO, seed: int = 0,
          replace: bool = False) -> MaskEdit:
    """Apply a mask or release to a loaded pipeline, on top of its edits; ``restore()`` (or ``with``) undoes it.

    The edit is labelled with the resolved ref (``nudity@prod`` -> ``nudity@3``) in
    :func:`~cpreg.editors.active_edits`. ``replace``: restore every edit of the pipeline first
    (:func:`~cpreg.editors.switch`, what a server does per request; see docs/editing.md).
    """
    entity = ref if isinstance(ref, (Mask, Release)) else ws.resolve(ref)
    edit = switch if replace else apply_mask
    return edit(pipe, ws.load_mask(entity), label=entity.ref, fill=fill, seed=seed)


def load_pipeline(ws: Workspace, ref: str, base: str | None = None, *, fill: Fill | str = Fill.ZERO,
                  dtype: str = "float32", device: str | None = "auto", **from_pretrained_kwargs):
    """The base model of ``ref`` with its mask applied (the only edit on its stack): ``(pipe, edit)``."""
    pipe = ws.base_pipeline(ref, base, dtype=dtype, device=device, **from_pretrained_kwargs)
    return pipe, ws.apply(pipe, ref, fill=fill)
