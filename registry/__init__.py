"""Versioned registry of concept masks, aliases and releases (SQL rows + content-addressed objects).

Callers use :class:`Registry` and get plain entities back; the schema is managed by the Alembic
migrations shipped in ``cpreg.migrations`` (:func:`upgrade`, ``cpreg db upgrade``).
See ``docs/data-model.md``.

Example:
    >>> from cpreg.registry import Registry
    >>> reg = Registry("sqlite:///.cpreg/registry.db", ".cpreg/store")
    >>> reg.resolve("safe-v1@2").members
    ('nudity@3', 'van-gogh@2')
"""

from .entities import Alias, BaseModel, Calibration, Concept, Event, Mask, PromptSet, Release
from .errors import (
    AmbiguousRefError,
    ConflictError,
    IncompatibleMasksError,
    InUseError,
    InvalidNameError,
    NotFoundError,
    RegistryError,
    SchemaError,
)
from .migrate import current, downgrade, head, upgrade
from .orm import CONCEPT_KINDS
from .refs import NAME_PATTERN, Ref, parse_ref, validate_alias, validate_name, validate_tags
from .registry import Registry, prompt_set_hash

__all__ = [
    "CONCEPT_KINDS",
    "NAME_PATTERN",
    "Alias",
    "AmbiguousRefError",
    "BaseModel",
    "Calibration",
    "Concept",
    "ConflictError",
    "Event",
    "InUseError",
    "IncompatibleMasksError",
    "InvalidNameError",
    "Mask",
    "NotFoundError",
    "PromptSet",
    "Ref",
    "Registry",
    "RegistryError",
    "Release",
    "SchemaError",
    "current",
    "downgrade",
    "head",
    "parse_ref",
    "prompt_set_hash",
    "upgrade",
    "validate_alias",
    "validate_name",
    "validate_tags",
]
