"""cpreg: ConceptPrune concept erasure with a versioned mask registry.

Example:
    >>> import cpreg
    >>> pipe = cpreg.load_pipeline("safe-v1")           # base model + release, applied
    >>> cpreg.active_edits(pipe)
    [ActiveEdit(label='safe-v1@1', component='unet', masked=1559935, fill=<Fill.ZERO: 'zero'>)]
    >>> cpreg.switch(pipe, "nudity@prod")               # restore all, apply another: per request
    >>> cpreg.restore_all(pipe)                         # back to the base weights
    >>> with cpreg.apply(pipe, "nudity@prod"):          # an edit for one block
    ...     image = pipe("a photo of a man").images[0]
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

__all__ = ["Workspace", "active_edits", "apply", "load_pipeline", "restore_all", "switch"]

# heavy imports (torch, diffusers) only when used: name -> the module that defines it
_LAZY = {"Workspace": ".workspace", "active_edits": ".editors", "restore_all": ".editors"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
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

    ``cpreg.restore_all(pipe)`` brings back the base weights (``pipe.cpreg_edit``, the handle of
    this edit, also has ``restore()``). ``from_pretrained_kwargs`` go to ``DiffusionPipeline.from_pretrained``.
    """
    from .workspace import Workspace

    with Workspace(home, db_url) as workspace:
        pipe, edit = workspace.load_pipeline(
            ref, base, fill=fill, dtype=torch_dtype or "float32", device=device, **from_pretrained_kwargs
        )
    pipe.cpreg_edit = edit
    return pipe


def apply(pipe, ref: str, *, fill: str = "zero", home: str | os.PathLike | None = None, db_url: str | None = None):
    """Apply a mask or release on top of ``pipe``'s edits; returns a handle with ``restore()`` (a context manager too).

    Raises :class:`~cpreg.editors.EditStackError` if the same mask is already applied.
    """
    from .workspace import Workspace

    with Workspace(home, db_url) as workspace:
        return workspace.apply(pipe, ref, fill=fill)


def switch(pipe, ref: str, *, fill: str = "zero", home: str | os.PathLike | None = None, db_url: str | None = None):
    """Restore every edit of ``pipe``, then apply ``ref``: what a generation server calls per request.

    Returns the new edit's handle. A ref that cannot be loaded, or a mask that does not fit the
    model, raises with the current edits still applied. Not thread-safe: hold one lock around
    ``switch`` and the generation (docs/editing.md).
    """
    from .workspace import Workspace

    with Workspace(home, db_url) as workspace:
        return workspace.apply(pipe, ref, fill=fill, replace=True)
