"""The root of every error cpreg raises on purpose.

Each layer keeps its own family (:class:`~cpreg.registry.RegistryError`,
:class:`~cpreg.artifacts.ArtifactError`, :class:`~cpreg.editors.MaskMismatchError`,
:class:`~cpreg.editors.EditStackError`,
:class:`~cpreg.models.ModelUnavailableError`), and every family derives from
:class:`CpregError`, whose message is one line meant for a user. The command line reports a
``CpregError`` (and a file's ``OSError``) as a user error, exit code 1; anything else is a bug,
exit code 3. Errors about bad values also subclass ``ValueError``, as they always did.

Example:
    >>> from cpreg.errors import CpregError
    >>> try:
    ...     workspace.resolve("nudity@7")
    ... except CpregError as error:
    ...     print(f"error: {error}")
    error: no version 7 of concept 'nudity'
"""

from __future__ import annotations


class CpregError(Exception):
    """Base class of every error cpreg raises on purpose; the message is one line for a user."""


class InvalidArgumentError(CpregError, ValueError):
    """An argument or input value that cpreg refuses (out of range, malformed, inconsistent)."""


class CalibrationError(CpregError, RuntimeError):
    """A calibration run that could not produce statistics (too few denoiser calls, a failed rank)."""
