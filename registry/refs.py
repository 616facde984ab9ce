"""Names and references: the grammar of everything a user types to point at a registry row.

Names (concepts, releases, aliases, tags) match ``^[a-z0-9][a-z0-9._-]{0,63}$`` and never
contain ``..``: lowercase, at most 64 characters, safe as a path component and in a URL.
Alias names are additionally never all digits (``nudity@3`` is a version) nor ``latest``.

A reference is ``NAME`` (the latest version), ``NAME@N`` (version ``N >= 1``),
``NAME@latest`` or ``NAME@ALIAS``. For masks ``NAME`` is a concept; for releases it is the
release name (releases have no aliases).

Example:
    >>> parse_ref("nudity@prod")
    Ref(name='nudity', version=None, alias='prod')
    >>> str(parse_ref("safe-v1@2"))
    'safe-v1@2'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidNameError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_DIGITS_RE = re.compile(r"^[0-9]+$")

#: Selector meaning "the highest version"; reserved, so never an alias name.
LATEST = "latest"


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid registry name, else raise :class:`InvalidNameError`.

    ``what`` names the kind of name in the message (``concept name``, ``release name``...).

    Example:
        >>> validate_name("van-gogh", "concept name")
        'van-gogh'
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"invalid {what}: expected a string, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-64 characters among a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_alias(name: object) -> str:
    """Validate an alias name: a valid name that is not all digits and not ``latest``."""
    validate_name(name, "alias name")
    assert isinstance(name, str)
    if _DIGITS_RE.fullmatch(name):
        raise InvalidNameError(f"invalid alias name {name!r}: all digits would read as a version")
    if name == LATEST:
        raise InvalidNameError(f"invalid alias name {name!r}: reserved for the latest version")
    return name


def validate_tags(tags: Iterable[str] | str) -> tuple[str, ...]:
    """Validate tag names; return them sorted and without duplicates."""
    if isinstance(tags, str):
        tags = (tags,)
    return tuple(sorted({validate_name(tag, "tag") for tag in tags}))


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``name`` with at most one of ``version`` / ``alias``.

    Neither set means the latest version.
    """

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(ref: object) -> Ref:
    """Parse ``NAME``, ``NAME@N``, ``NAME@latest`` or ``NAME@ALIAS``.

    Raises :class:`InvalidNameError` for anything else (empty, two ``@``, version 0, bad name).

    Example:
        >>> parse_ref("nudity@3").version
        3
    """
    if not isinstance(ref, str):
        raise InvalidNameError(f"reference must be a string, got {type(ref).__name__}")
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep:
        return Ref(name)
    if "@" in selector:
        raise InvalidNameError(f"invalid reference {ref!r}: more than one '@'")
    if selector == LATEST:
        return Ref(name)
    if _DIGITS_RE.fullmatch(selector):
        version = int(selector)
        if version < 1 or len(selector) > 9:
            raise InvalidNameError(f"invalid reference {ref!r}: versions are integers from 1")
        return Ref(name, version=version)
    if not _NAME_RE.fullmatch(selector) or ".." in selector:
        raise InvalidNameError(f"invalid reference {ref!r}: expected NAME, NAME@VERSION or NAME@ALIAS")
    return Ref(name, alias=selector)
