"""Engines for the registry database: SQLite by default, any SQLAlchemy URL otherwise.

SQLite connections get, from a ``connect`` event listener: ``busy_timeout`` (30 s),
``foreign_keys=ON`` and ``journal_mode=WAL`` (readers never block the writer). The pysqlite
driver's own transaction handling is switched off and SQLAlchemy's ``begin`` event emits
``BEGIN`` -- or ``BEGIN IMMEDIATE`` on connections carrying the execution option
``cpreg_write=True`` -- so a writing transaction takes SQLite's write lock up front (waiting up
to the busy timeout) instead of failing with "database is locked" when it upgrades a read lock,
and DDL is transactional (a migration is all or nothing).

Example:
    >>> engine = make_engine("sqlite:///.cpreg/registry.db")
    >>> writer = engine.execution_options(cpreg_write=True)
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.pool import StaticPool

#: Execution option marking a connection whose transactions write (``BEGIN IMMEDIATE`` on SQLite).
WRITE_OPTION = "cpreg_write"

#: PostgreSQL advisory lock ("cpreg" in ASCII): held exclusively by a migration transaction,
#: shared by whoever inspects the schema (so a half-seen migration never looks like a foreign
#: database).
MIGRATION_LOCK_KEY = 0x637072656

DEFAULT_BUSY_TIMEOUT_S = 30.0


def _is_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def _use_wal(cursor: sqlite3.Cursor, deadline: float) -> None:
    """Switch the database file to WAL (a persistent setting) unless it already is.

    While another process is creating the file or switching its mode, SQLite may answer
    "database is locked" at once, without its busy handler; retry until ``deadline``
    (``time.monotonic()``) like the busy timeout would.
    """
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def make_engine(db_url: str | URL, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, echo: bool = False) -> Engine:
    """Create an engine for ``db_url`` with the registry's connection settings.

    For a SQLite file the parent folder is created if needed. ``sqlite://`` (in memory) uses a
    single shared connection.
    """
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, echo=echo)

    kwargs: dict = {"echo": echo}
    if _is_memory(url):
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    elif url.database and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    busy_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record) -> None:
        # Let SQLAlchemy's "begin" event below decide when and how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms:d}")  # an int we built: not user input
            cursor.execute("PRAGMA foreign_keys = ON")
            _use_wal(cursor, time.monotonic() + busy_timeout_s)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine
