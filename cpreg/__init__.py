"""cpreg: ConceptPrune concept erasure with a versioned mask registry.

Example:
    >>> import cpreg
    >>> pipe = cpreg.load_pipeline("safe-v1")           # base model + release, applied
    >>> pipe.cpreg_edit.restore()                       # back to the base weights
    >>> with cpreg.apply(pipe, "nudity@prod"):          # switch masks without reloading
    ...     image = pipe("a photo of a man").images[0]
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

__all__ = ["Workspace", "apply", "load_pipeline"]


def __getattr__(name: str):
    if name == "Workspace":  # heavy imports (torch, diffusers) only when used
        from .workspace import Workspace

        return Workspace
    raise AttributeError(f"module 'cpreg' has no attribute {name!r}")


def load_pipeline(
    ref: str,
    base: str | None = None,
    *,
    fill: str = "zero",
    home: str | os.PathLike | None = None,
    db_url: str | None = None,
    device: str | None = "auto",
    torch_dtype=None,
    **from_pretrained_kwargs,
):
    """Load the base model recorded for ``ref`` (or ``base``) with the mask or release applied.

    The edit handle is ``pipe.cpreg_edit`` (``restore()`` brings back the base weights).
    ``from_pretrained_kwargs`` go to ``DiffusionPipeline.from_pretrained``.
    """
    from .workspace import Workspace

    with Workspace(home, db_url) as workspace:
        pipe, edit = workspace.load_pipeline(
            ref, base, fill=fill, dtype=torch_dtype or "float32", device=device, **from_pretrained_kwargs
        )
    pipe.cpreg_edit = edit
    return pipe


def apply(pipe, ref: str, *, fill: str = "zero", home: str | os.PathLike | None = None, db_url: str | None = None):
    """Apply a mask or release to a loaded pipeline; returns a handle with ``restore()`` (a context manager too)."""
    from .workspace import Workspace

    with Workspace(home, db_url) as workspace:
        return workspace.apply(pipe, ref, fill=fill)
