"""Checks of the values callers hand to the registry, made before anything is written.

SQLite stores almost anything; PostgreSQL refuses NUL characters in text, strings longer than
their ``VARCHAR`` and NaN in JSON. These checks run first, so both backends accept and refuse
the same values with the same one-line :class:`RegistryError`, and a refused call stores
nothing (no row, no object). Length limits are read from the ORM columns
(:func:`max_length`), never repeated here, so the checks cannot drift from the schema.

Example:
    >>> validate_text("main", BaseModelRow.revision, optional=True)
    'main'
    >>> max_length(BaseModelRow.revision)
    256
    >>> validate_text("x" * 257, BaseModelRow.revision)
    Traceback (most recent call last):
    RegistryError: revision is 257 characters long; at most 256 are allowed
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import QueryableAttribute

from .errors import InvalidNameError, RegistryError
from .orm import CONCEPT_KINDS, BaseModelRow, CalibrationRow, MaskRow, ReleaseRow


def max_length(column: QueryableAttribute[Any]) -> int | None:
    """Length of a ``String(N)`` column, None for unbounded ``Text``.

    Example:
        >>> max_length(MaskRow.dvc_stage), max_length(MaskRow.description)
        (256, None)
    """
    return getattr(column.type, "length", None)


def validate_text(
    value: object, column: QueryableAttribute[Any], *, what: str | None = None, optional: bool = False
) -> str | None:
    """``value`` if it is a string ``column`` stores as is on every backend, else :class:`RegistryError`.

    ``what`` names the value in the message (default: the column's name); ``optional`` lets None through.

    Example:
        >>> validate_text(None, MaskRow.git_rev, optional=True) is None
        True
    """
    what = what or column.key
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RegistryError(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise RegistryError(f"{what} must not contain NUL characters")
    limit = max_length(column)
    if limit is not None and len(value) > limit:
        raise RegistryError(f"{what} is {len(value)} characters long; at most {limit} are allowed")
    return value


def validate_provenance(
    row: type[CalibrationRow | MaskRow | ReleaseRow], created_by: str | None, dvc_stage: str | None, git_rev: str | None
) -> None:
    """Who makes a ``row`` (calibration, mask, release), in which pipeline stage, at which commit.

    Example:
        >>> validate_provenance(MaskRow, "alice", "mask@nudity", None)
    """
    validate_text(created_by, row.created_by, optional=True)
    validate_text(dvc_stage, row.dvc_stage, optional=True)
    validate_text(git_rev, row.git_rev, optional=True)


def validate_finite(value: object, what: str) -> float:
    """``value`` as a float if it is a finite number (not a bool), else :class:`RegistryError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistryError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def validate_json(value: Any, what: str) -> Any:
    """``value`` if it is strict JSON (no NaN / infinity, string keys), else :class:`RegistryError`."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be plain JSON data: {exc}") from None
    return value


def validate_prompts(prompts: Iterable[str], what: str) -> list[str]:
    """A non-empty list of prompt strings (a single string is refused, not split into letters).

    Example:
        >>> validate_prompts(("a naked man",), "targets")
        ['a naked man']
    """
    if isinstance(prompts, (str, bytes)):
        raise RegistryError(f"{what} must be a list of prompts, not a single string")
    result = list(prompts)
    if not result:
        raise RegistryError(f"{what} must hold at least one prompt")
    for prompt in result:
        if not isinstance(prompt, str):
            raise RegistryError(f"{what} must hold strings, got {type(prompt).__name__}")
    return result


def validate_base_model(name: object, fingerprint: object) -> None:
    """A base model's name (hub id or path) and weight fingerprint: non-blank, bounded, no NUL."""
    if not _is_identifier(name, BaseModelRow.name):
        limit = max_length(BaseModelRow.name)
        raise InvalidNameError(f"invalid base model name {name!r}: a hub id or path of 1-{limit} characters")
    if not _is_identifier(fingerprint, BaseModelRow.fingerprint):
        raise InvalidNameError(f"invalid base model fingerprint {fingerprint!r}")


def _is_identifier(value: object, column: QueryableAttribute[Any]) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= max_length(column) and "\x00" not in value


def validate_kind(kind: object) -> str:
    """A concept kind: one of :data:`~cpreg.registry.orm.CONCEPT_KINDS`."""
    if kind not in CONCEPT_KINDS:
        raise InvalidNameError(f"invalid concept kind {kind!r}: one of {', '.join(CONCEPT_KINDS)}")
    return kind


__all__ = [
    "max_length",
    "validate_base_model",
    "validate_finite",
    "validate_json",
    "validate_kind",
    "validate_prompts",
    "validate_provenance",
    "validate_text",
]
