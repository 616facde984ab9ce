"""Schema migrations of the registry database, with the Alembic scripts shipped in the package.

The Alembic configuration is built in code, ``script_location`` pointing at the installed
``cpreg.migrations`` package, so this works after a plain ``pip install`` from any directory
(no ``alembic.ini`` needed).

Example:
    >>> upgrade("sqlite:///.cpreg/registry.db")          # what ``cpreg db upgrade`` runs
    >>> current("sqlite:///.cpreg/registry.db") == head()
    True
    >>> downgrade("sqlite:///.cpreg/registry.db", "base")  # drops every registry table
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, Engine, inspect, text

from .db import MIGRATION_LOCK_KEY, WRITE_OPTION, make_engine
from .errors import SchemaError

VERSION_TABLE = "alembic_version"


def script_location() -> str:
    """Folder of the installed ``cpreg.migrations`` package (holds ``env.py`` and ``versions/``)."""
    from .. import migrations

    return str(Path(migrations.__file__).resolve().parent)


def make_config(db_url: str | URL | None = None) -> Config:
    """An Alembic :class:`Config` for the shipped migrations (no ini file involved)."""
    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    cfg.set_main_option("path_separator", "os")
    if db_url is not None:
        # configparser interpolation: a literal '%' (URL-encoded passwords) must be doubled.
        rendered = db_url.render_as_string(hide_password=False) if isinstance(db_url, URL) else str(db_url)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def head() -> str:
    """The newest revision shipped with this version of cpreg."""
    revision = ScriptDirectory.from_config(make_config()).get_current_head()
    assert revision is not None
    return revision


def _run(db_url: str | URL | Engine, fn, *args) -> None:
    engine = db_url if isinstance(db_url, Engine) else make_engine(db_url)
    try:
        with engine.connect() as connection:
            connection.execution_options(**{WRITE_OPTION: True})
            cfg = make_config()
            cfg.attributes["connection"] = connection
            fn(cfg, *args)
            if connection.in_transaction():
                connection.commit()
    finally:
        if engine is not db_url:
            engine.dispose()


def upgrade(db_url: str | URL | Engine, revision: str = "head") -> None:
    """Migrate the database at ``db_url`` up to ``revision`` (creating it when new).

    Example:
        >>> upgrade("postgresql+psycopg://cpreg@db/cpreg")
    """
    _run(db_url, command.upgrade, revision)


def downgrade(db_url: str | URL | Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (``"base"``: remove every registry table)."""
    _run(db_url, command.downgrade, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def current(db_url: str | URL | Engine) -> str | None:
    """Revision the database is at; ``None`` for a new database (no version table)."""
    engine = db_url if isinstance(db_url, Engine) else make_engine(db_url)
    try:
        with engine.connect() as connection:
            return _current(connection)
    finally:
        if engine is not db_url:
            engine.dispose()


def known_revisions() -> set[str]:
    """Every revision shipped with this version of cpreg."""
    return {script.revision for script in ScriptDirectory.from_config(make_config()).walk_revisions()}


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: its revision, the expected head, and whether it holds tables."""

    revision: str | None
    head: str
    empty: bool  # no table besides Alembic's version table (a new or fully downgraded database)

    @property
    def at_head(self) -> bool:
        return self.revision == self.head


def schema_state(engine: Engine) -> SchemaState:
    """Inspect ``engine``'s database without changing it."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            # A migration commits its tables and its version row at once, but under READ
            # COMMITTED the two reads below could straddle that commit (no version yet, tables
            # already): hold the migration lock shared so no migration commits in between.
            # (SQLite: the read transaction's snapshot already makes both reads agree.)
            connection.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": MIGRATION_LOCK_KEY})
        revision = _current(connection)
        tables = [
            name
            for name in inspect(connection).get_table_names()
            if name != VERSION_TABLE and not name.startswith("sqlite_")
        ]
    return SchemaState(revision=revision, head=head(), empty=not tables)


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Raise :class:`SchemaError` unless the database is at head; upgrade a new, empty one.

    With ``auto_upgrade`` an empty database (no tables at all) is migrated to head. A database
    at an older revision is never upgraded implicitly: that is ``cpreg db upgrade``'s job.
    """
    state = schema_state(engine)
    if state.at_head:
        return
    if state.revision is None and state.empty:
        if not auto_upgrade:
            raise SchemaError("the registry database is empty: run `cpreg db upgrade` first")
        upgrade(engine)
        state = schema_state(engine)
        if not state.at_head:  # pragma: no cover - a concurrent downgrade
            raise SchemaError(f"the registry database is at {state.revision!r} after upgrading, not {state.head!r}")
        return
    if state.revision is None:
        raise SchemaError("the database holds tables but no registry schema version: not a cpreg registry database")
    if state.revision in known_revisions():
        raise SchemaError(
            f"the registry database is at schema revision {state.revision}, this cpreg needs "
            f"{state.head}: run `cpreg db upgrade`"
        )
    raise SchemaError(
        f"the registry database is at schema revision {state.revision}, unknown to this cpreg "
        f"(expects {state.head}): upgrade cpreg"
    )
