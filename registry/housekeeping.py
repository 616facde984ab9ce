"""Audit log and store housekeeping: events, referenced objects, gc, verify, row counts.

Part of :class:`~cpreg.registry.Registry` (a mixin: it uses the registry's store, actor and
transactions).

Example:
    >>> [event.action for event in reg.events(limit=2)]
    ['release.compose', 'alias.set']
    >>> reg.gc()                # objects no row points to (dry run)
    >>> reg.verify()            # [] when the store and the rows agree
    []
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..artifacts import ObjectStore
from .entities import Event
from .orm import (
    AliasRow,
    BaseModelRow,
    CalibrationRow,
    ConceptRow,
    EventRow,
    MaskRow,
    PromptSetRow,
    ReleaseMemberRow,
    ReleaseRow,
    select_entities,
)
from .resolution import object_references
from .session import Transactions, object_lock


class HousekeepingMixin:
    """Events, gc, verify and counts of a :class:`~cpreg.registry.Registry`."""

    store: ObjectStore
    actor: str
    _tx: Transactions

    def events(self, limit: int | None = None) -> list[Event]:
        """The audit log, newest first."""
        query = select(EventRow).order_by(EventRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        return self._tx.read(lambda s: select_entities(s, query))

    def referenced_objects(self) -> set[str]:
        """Ids of every object a row points to (masks, release unions, calibration statistics)."""
        return set(self._tx.read(object_references))

    def gc(self, dry_run: bool = True, *, created_by: str | None = None) -> list[str]:
        """Objects of the store no row points to; deleted only when ``dry_run`` is False.

        The deleting pass runs in a write transaction that excludes writers (SQLite: the write
        lock; PostgreSQL: an exclusive advisory lock writers take shared), and writers check
        their object again under that lock, so gc never leaves a row pointing to a deleted
        object, even with writers running.

        Example:
            >>> reg.gc()                 # what would go
            >>> reg.gc(dry_run=False)    # delete it
        """
        if dry_run:
            referenced = self.referenced_objects()
            return [oid for oid in self.store.ids() if oid not in referenced]

        def write(session: Session) -> list[str]:
            object_lock(session, exclusive=True)
            referenced = object_references(session)
            garbage = [oid for oid in self.store.ids() if oid not in referenced]
            if garbage:
                self._tx.event(session, created_by, "gc", "store", {"deleted": len(garbage), "oids": garbage})
                session.flush()
            for oid in garbage:
                self.store.delete(oid)
            return garbage

        return self._tx.write(write)

    def verify(self) -> list[tuple[str, str]]:
        """Problems of the store (``store.verify()``) plus rows pointing to missing objects.

        Returns ``(object id or path, problem)`` pairs; empty when all is sound.
        """
        problems = list(self.store.verify())
        for oid, users in sorted(self._tx.read(object_references).items()):
            if not self.store.exists(oid):
                problems.append((oid, f"object {oid} is missing, referenced by {', '.join(users)}"))
        return problems

    def counts(self) -> dict[str, int]:
        """Number of rows per table (for status displays and tests)."""
        tables = {
            "base_models": BaseModelRow,
            "concepts": ConceptRow,
            "prompt_sets": PromptSetRow,
            "calibrations": CalibrationRow,
            "masks": MaskRow,
            "aliases": AliasRow,
            "releases": ReleaseRow,
            "release_members": ReleaseMemberRow,
            "events": EventRow,
        }
        return self._tx.read(
            lambda s: {name: s.scalar(select(func.count()).select_from(row)) for name, row in tables.items()}
        )
