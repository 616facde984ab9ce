"""Exceptions of the registry layer.

Every error raised on purpose by :mod:`cpreg.registry` is a :class:`RegistryError`, itself a
``ValueError`` and a :class:`~cpreg.errors.CpregError`, with a one-line message meant to be shown to a user as is.

Example:
    >>> try:
    ...     reg.resolve_mask("nudity@7")
    ... except NotFoundError as exc:
    ...     print(exc)
    no version 7 of concept 'nudity'
"""

from __future__ import annotations

from ..errors import CpregError


class RegistryError(CpregError, ValueError):
    """Base class of every registry error."""


class NotFoundError(RegistryError):
    """A name, version, alias, release or row that does not exist."""


class AmbiguousRefError(RegistryError):
    """A reference that matches more than one thing (several base models, concept and release)."""


class InvalidNameError(RegistryError):
    """A name, alias, tag or reference that does not follow the grammar of docs/data-model.md."""


class ConflictError(RegistryError):
    """The operation contradicts what is stored (duplicate name, fingerprint mismatch...)."""


class IncompatibleMasksError(ConflictError):
    """Masks that cannot be combined: other base model, hook point, component or layers."""


class InUseError(RegistryError):
    """A row that cannot be deleted because something still points to it (a release, an alias)."""


class SchemaError(RegistryError):
    """The database is not at the schema revision this version of cpreg expects."""
