"""Transactions of the registry database: reads, retried writes, the object lock, audit events.

Every registry call is one transaction. :meth:`Transactions.read` runs a function in a read
transaction; :meth:`Transactions.write` runs it in a write transaction (SQLite: ``BEGIN
IMMEDIATE``, see :mod:`cpreg.registry.db`) and runs it again, from a fresh snapshot, when it
lost a race to a concurrent writer. The function must therefore do nothing but database work
(and idempotent object stores) that may be repeated.

Example:
    >>> tx = Transactions(make_engine("sqlite:///reg.db"), actor="alice")
    >>> tx.read(lambda session: session.scalar(select(func.count()).select_from(MaskRow)))
    3
    >>> def forget(session):
    ...     object_lock(session, exclusive=True)
    ...     tx.event(session, None, "gc", "store", {"deleted": 0})
    >>> tx.write(forget)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ..artifacts import ObjectStore
from .db import WRITE_OPTION
from .errors import ConflictError, RegistryError
from .orm import EventRow
from .validation import max_length, validate_text

T = TypeVar("T")

#: Attempts of a write transaction that lost a race (unique constraint, lock, deadlock).
WRITE_ATTEMPTS = 30
#: Extra rounds of waiting for SQLite's write lock once busy_timeout has expired.
LOCK_RETRIES = 2
#: PostgreSQL advisory lock ordering writers (shared) against gc (exclusive).
OBJECT_LOCK_KEY = 0x6370726567


class Transactions:
    """Read and write transactions on ``engine``; events default to ``actor``.

    Args:
        engine: an engine made by :func:`~cpreg.registry.db.make_engine`.
        actor: who acts when a write names nobody (``created_by=None``).
    """

    def __init__(self, engine: Engine, actor: str) -> None:
        self.engine = engine
        self.actor = actor
        self._writer = engine.execution_options(**{WRITE_OPTION: True})

    def read(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one read transaction."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            return fn(session)

    def write(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one write transaction, retried when it loses a race.

        On SQLite the transaction starts with ``BEGIN IMMEDIATE`` (writers queue on the lock);
        elsewhere two writers may pick the same version number, the unique constraint rejects
        the second insert and the whole transaction is retried from a fresh snapshot. A write
        the database refuses for another reason is one :class:`RegistryError`, not retried.
        """
        lock_waits = 0
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with Session(self._writer, expire_on_commit=False) as session, session.begin():
                    return fn(session)
            except sa_exc.IntegrityError as exc:
                if not is_retryable_integrity_error(exc):
                    raise RegistryError(f"the database refused the write: {one_line(exc)}") from exc
                if attempt == WRITE_ATTEMPTS - 1:
                    raise ConflictError(f"could not write after {WRITE_ATTEMPTS} attempts: {one_line(exc)}") from exc
            except sa_exc.DataError as exc:  # a value the backend cannot store (validated earlier: a backstop)
                raise RegistryError(f"the database refused a value: {one_line(exc)}") from exc
            except sa_exc.OperationalError as exc:
                message = str(exc.orig).lower()
                if any(word in message for word in ("deadlock", "serializ")):
                    pass  # PostgreSQL chose this transaction as the loser: run it again
                elif any(word in message for word in ("locked", "busy")):
                    # SQLite already waited busy_timeout for the lock: give up after a few rounds.
                    lock_waits += 1
                    if lock_waits > LOCK_RETRIES:
                        raise
                else:
                    raise
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
            time.sleep(random.uniform(0.0, min(0.2, 0.005 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    def event(self, session: Session, actor: str | None, action: str, subject: str, details: dict[str, Any]) -> None:
        """Add an audit event to the write transaction of ``session`` (``actor`` None: :attr:`actor`).

        Example:
            >>> tx.event(session, "bob", "mask.tag", "mask:nudity@3", {"before": [], "after": ["x"]})
        """
        actor = validate_text(actor, EventRow.actor, what="created_by") if actor else self.actor
        subject = subject[: max_length(EventRow.subject)]
        session.add(EventRow(actor=actor, action=action, subject=subject, details=details))


def object_lock(session: Session, *, exclusive: bool) -> None:
    """Order writers against ``gc`` until the end of the transaction.

    SQLite: nothing to do, every write transaction already holds the database's write lock.
    PostgreSQL: writers share a transaction-scoped advisory lock that ``gc`` takes alone.
    """
    if session.get_bind().dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        session.execute(text(f"SELECT {function}(:key)"), {"key": OBJECT_LOCK_KEY})  # fixed names only


def keep_object(session: Session, store: ObjectStore, oid: str, data: bytes) -> None:
    """Inside a write transaction, before inserting a row pointing to ``oid``: make sure the
    object is there (a concurrent ``gc`` may have removed it since it was stored) and keep
    ``gc`` away until the row is committed."""
    object_lock(session, exclusive=False)
    if not store.exists(oid):
        store.put(data)


def is_retryable_integrity_error(exc: sa_exc.IntegrityError) -> bool:
    """A unique or foreign-key violation: a concurrent writer got there first (retry); NOT NULL
    or CHECK violations would fail again and are reported at once."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code is not None:
        return code in ("23505", "23503")  # unique_violation, foreign_key_violation
    message = str(exc.orig).lower()
    return "unique" in message or "foreign key" in message


def one_line(exc: BaseException) -> str:
    """The first line of a database error's message (the driver's own, when there is one)."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


__all__ = ["LOCK_RETRIES", "OBJECT_LOCK_KEY", "WRITE_ATTEMPTS", "Transactions", "keep_object", "object_lock"]
