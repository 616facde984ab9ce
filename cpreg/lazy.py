"""Lazy package exports: a name is imported from its submodule on first use (PEP 562).

The engine and the artifact formats import torch; the command line's registry commands must not
pay for it. A package lists what it exports and where each name lives, and only the submodules
a caller touches are imported.

Example:
    >>> # in a package's __init__.py
    >>> __getattr__ = lazy_exports(__name__, {"calibrate": ".calibration", "Fill": ".options"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``, exporting ``{name: ".submodule"}``."""

    def __getattr__(name: str) -> object:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__


class lazy_method:  # noqa: N801 - used like a decorator-less `def`
    """A method defined as a function ``fn(self, ...)`` of another module, imported on first use.

    The function keeps the one signature and docstring; the class that names it imports nothing
    heavy. ``Workspace.compute = lazy_method(".compute", "compute")`` makes ``ws.compute(...)``
    call ``cpreg.compute.compute(ws, ...)``.
    """

    def __init__(self, module: str, name: str, package: str = "cpreg") -> None:
        self.module, self.name, self.package = module, name, package

    def function(self) -> Callable:
        """The function itself (importing its module)."""
        return getattr(importlib.import_module(self.module, self.package), self.name)

    def __get__(self, instance: object, owner: type | None = None) -> Callable:
        function = self.function()
        return function if instance is None else function.__get__(instance, owner)
