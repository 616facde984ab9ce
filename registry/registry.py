"""The :class:`Registry` facade: versioned concept masks, aliases and releases over a database
and an :class:`~cpreg.artifacts.ObjectStore`.

Rows live in a SQL database (SQLite by default, any SQLAlchemy URL); the masks, unions and
activation statistics themselves are objects of the store, named by their sha256. Every method
takes and returns plain entities (:mod:`cpreg.registry.entities`), never ORM rows, and every
mutation writes an :class:`~cpreg.registry.entities.Event`.

The class is put together from one module per job (see docs/data-model.md, "Code layout"):

* use cases, one mixin per aggregate: :mod:`~cpreg.registry.inputs` (base models, concepts,
  prompt sets, calibrations), :mod:`~cpreg.registry.masks` (versions, tags, aliases),
  :mod:`~cpreg.registry.releases`, :mod:`~cpreg.registry.housekeeping` (events, gc, verify);
* what they share: :mod:`~cpreg.registry.validation` (values checked before anything is
  written), :mod:`~cpreg.registry.session` (transactions, retries, the object lock, events),
  :mod:`~cpreg.registry.resolution` (references to rows), :mod:`~cpreg.registry.orm` (rows,
  relationships, ``to_entity()``).

Example:
    >>> reg = Registry("sqlite:///.cpreg/registry.db", ObjectStore(".cpreg/store"))
    >>> model = reg.ensure_base_model("CompVis/stable-diffusion-v1-4", model_fingerprint(pipe))
    >>> reg.add_concept("nudity", "nudity")
    >>> reg.add_mask("nudity", mask, model).ref
    'nudity@1'
    >>> reg.set_alias("nudity@1", "prod")
    >>> release = reg.compose("safe-v1", ["nudity@prod", "van-gogh"])
    >>> reg.load_release_mask(release).num_masked
    2004113

Guarantees (see docs/data-model.md): an object is always stored before the row that points to
it is committed; a version number is never given twice for one (concept, base model), even
under concurrent writers; every failing call leaves the database as it was; a write that finds
an identical row returns it and adds nothing (the reuse rule).
"""

from __future__ import annotations

import getpass
import os
from typing import TYPE_CHECKING

from sqlalchemy import URL

from .. import editors
from ..artifacts import ObjectStore
from .db import make_engine
from .entities import Mask, Release
from .errors import IncompatibleMasksError
from .housekeeping import HousekeepingMixin
from .inputs import InputsMixin, prompt_set_hash
from .masks import MaskMixin
from .migrate import ensure_schema
from .orm import EventRow
from .releases import ReleaseMixin
from .resolution import BaseModelArg, mask_or_release_row
from .session import Transactions
from .validation import max_length, validate_text

if TYPE_CHECKING:  # the engine imports torch: only for type hints here
    from ..editors import ConceptMask


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name (containers without a passwd entry)
        return "unknown"


class Registry(InputsMixin, MaskMixin, ReleaseMixin, HousekeepingMixin):
    """Versioned concept masks and releases in a database plus an object store.

    Args:
        db_url: SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``).
        store: an :class:`ObjectStore` or its root (local folder or fsspec URL).
        auto_upgrade: migrate a new, empty database to the current schema. A database at an
            older schema revision is never migrated implicitly: :class:`SchemaError` tells to
            run ``cpreg db upgrade``.
        actor: who is acting, recorded in events and ``created_by`` (default: the OS user).
        busy_timeout_s: SQLite only, how long to wait for another writer's lock.

    One ``Registry`` per process: after ``fork`` create a new one in the child.

    Example:
        >>> with Registry("sqlite:///reg.db", ".cpreg/store") as reg:
        ...     reg.list_concepts()
        []
    """

    def __init__(
        self,
        db_url: str | URL,
        store: ObjectStore | str | os.PathLike,
        *,
        auto_upgrade: bool = True,
        actor: str | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.db_url = db_url
        self.store = store if isinstance(store, ObjectStore) else ObjectStore(store)
        self.actor = validate_text(actor, EventRow.actor) if actor else _os_user()[: max_length(EventRow.actor)]
        self._engine = make_engine(db_url, busy_timeout_s=busy_timeout_s)
        self._tx = Transactions(self._engine, self.actor)
        try:
            ensure_schema(self._engine, auto_upgrade=auto_upgrade)
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self._engine.url.render_as_string(hide_password=True)!r}, {self.store!r})"

    # ------------------------------------------------------------------ any ref: a mask or a release

    def resolve(self, ref: Mask | Release | str, base_model: BaseModelArg | None = None) -> Mask | Release:
        """A mask (``concept[@N|@alias]``) or a release (``name[@N]``), whichever ``ref`` names.

        Example:
            >>> reg.resolve("safe-v1@2")
            Release(name='safe-v1', version=2, ...)
        """
        if isinstance(ref, (Mask, Release)):
            return ref
        return self._tx.read(lambda s: mask_or_release_row(s, ref, base_model).to_entity())

    def load(self, ref: Mask | Release | str, base_model: BaseModelArg | None = None) -> ConceptMask:
        """The mask content of a mask or release reference (see :meth:`resolve`)."""
        target = self.resolve(ref, base_model)
        return self.load_mask(target) if isinstance(target, Mask) else self.load_release_mask(target)

    def diff(
        self, ref_a: Mask | Release | str, ref_b: Mask | Release | str, base_model: BaseModelArg | None = None
    ) -> dict:
        """Overlap of two masks or releases: per-layer and total counts, intersection and IoU.

        Example:
            >>> reg.diff("nudity@2", "nudity@3")["iou"]
            0.91
        """
        a, b = self.resolve(ref_a, base_model), self.resolve(ref_b, base_model)
        mask_a, mask_b = self.load(a), self.load(b)
        try:
            editors.check_compatible([mask_a, mask_b], [a.ref, b.ref])
        except ValueError as exc:
            raise IncompatibleMasksError(f"cannot compare: {exc}") from exc
        return {"ref_a": a.ref, "ref_b": b.ref, **editors.overlap(mask_a, mask_b)}


__all__ = ["Registry", "prompt_set_hash"]
