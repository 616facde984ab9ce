"""Exceptions of the artifact layer.

Every error raised on purpose by :mod:`cpreg.artifacts` is an :class:`ArtifactError`, itself a
``ValueError`` and a :class:`~cpreg.errors.CpregError`, so callers may catch any of them.
"""

from __future__ import annotations

from ..errors import CpregError


class ArtifactError(CpregError, ValueError):
    """Base class: a stored artifact or an argument naming one is not acceptable."""


class CorruptObjectError(ArtifactError):
    """A stored object's content does not hash to its id (bit rot, truncation, tampering)."""


class MissingObjectError(ArtifactError):
    """No object with this id in the store."""


class ArtifactFormatError(ArtifactError):
    """Bytes that are not a valid mask / statistics file of a supported format version."""
