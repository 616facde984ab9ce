"""Exceptions of the artifact layer.

Every error raised on purpose by :mod:`cpreg.artifacts` is an :class:`ArtifactError`, itself a
``ValueError``, so callers may catch either.
"""

from __future__ import annotations


class ArtifactError(ValueError):
    """Base class: a stored artifact or an argument naming one is not acceptable."""


class CorruptObjectError(ArtifactError):
    """A stored object's content does not hash to its id (bit rot, truncation, tampering)."""


class MissingObjectError(ArtifactError):
    """No object with this id in the store."""


class ArtifactFormatError(ArtifactError):
    """Bytes that are not a valid mask / statistics file of a supported format version."""
