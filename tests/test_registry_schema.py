"""Schema and migrations: the shipped Alembic scripts build exactly the ORM schema, both ways."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import subprocess
import sys
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from cpreg.registry import Registry, SchemaError, current, downgrade, head, migrate, upgrade
from cpreg.registry.db import _use_wal, make_engine
from cpreg.registry.orm import Base

from registry_support import FP_A, db_url, drop_database, make_mask, open_registry, sqlite_only

TABLES = {
    "aliases",
    "base_models",
    "calibrations",
    "concepts",
    "events",
    "mask_version_counters",
    "masks",
    "prompt_sets",
    "release_members",
    "releases",
}


@pytest.fixture(autouse=True)
def _drop_test_database(tmp_path):
    yield
    drop_database(tmp_path)


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def test_migrated_database_matches_orm_and_downgrades(tmp_path):
    url = db_url(tmp_path)
    assert current(url) is None
    upgrade(url)
    assert current(url) == head() == "0002"
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _diff(url) == []

    downgrade(url, "base")
    assert current(url) is None
    assert _tables(url) == {"alembic_version"}

    upgrade(url)
    assert current(url) == head()
    assert _diff(url) == []


def _rows(url: str, table: str) -> list[dict]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2"))]
    finally:
        engine.dispose()


def test_release_provenance_migration_keeps_every_row(tmp_path):
    """0001 -> 0002 -> 0001 with releases stored: rows and members survive both ways."""
    url = db_url(tmp_path)
    with open_registry(tmp_path) as reg:
        model = reg.ensure_base_model("tiny", FP_A)
        reg.add_concept("nudity", "nudity")
        reg.add_concept("van-gogh", "style")
        masks = [reg.add_mask(name, make_mask(seed), model) for seed, name in enumerate(("nudity", "van-gogh"))]
        reg.compose("safe-v1", masks, dvc_stage="release", git_rev="a" * 40)
    members = _rows(url, "release_members")
    assert len(members) == 2

    downgrade(url, "0001")
    old = _rows(url, "releases")
    assert "dvc_stage" not in old[0] and _rows(url, "release_members") == members

    upgrade(url)
    assert _rows(url, "release_members") == members
    with open_registry(tmp_path) as reg:
        release = reg.resolve_release("safe-v1")
        assert (release.dvc_stage, release.git_rev) == (None, None)  # 0001 had nowhere to keep them
        assert release.members == ("nudity@1", "van-gogh@1") and release.notes == old[0]["notes"]
        assert reg.compose("safe-v1", masks, dvc_stage="release", git_rev="b" * 40).git_rev == "b" * 40


@sqlite_only
def test_migrations_run_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no alembic.ini here: the script location is the installed package
    assert not (tmp_path / "alembic.ini").exists()
    upgrade("sqlite:///relative.db")
    assert current("sqlite:///relative.db") == head()
    assert (tmp_path / "relative.db").is_file()


def test_registry_upgrades_only_a_new_database(tmp_path):
    with pytest.raises(SchemaError, match="cpreg db upgrade"):
        open_registry(tmp_path, auto_upgrade=False)
    reg = open_registry(tmp_path)
    assert current(db_url(tmp_path)) == head()
    reg.close()
    # A fully downgraded database (only Alembic's empty version table) counts as new.
    downgrade(db_url(tmp_path), "base")
    open_registry(tmp_path).close()
    assert current(db_url(tmp_path)) == head()


def test_registry_refuses_a_database_behind_or_ahead(tmp_path, monkeypatch):
    url = db_url(tmp_path)
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :rev"), {"rev": "ffff"})
    engine.dispose()
    with pytest.raises(SchemaError, match="unknown to this cpreg"):
        open_registry(tmp_path)
    engine = make_engine(url)

    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :rev"), {"rev": "0001"})
    engine.dispose()
    # Pretend this cpreg ships a newer revision 0002: the database is behind, never auto-upgraded.
    monkeypatch.setattr(migrate, "head", lambda: "0002")
    monkeypatch.setattr(migrate, "known_revisions", lambda: {"0001", "0002"})
    with pytest.raises(SchemaError, match=r"revision 0001, this cpreg needs 0002: run `cpreg db upgrade`"):
        open_registry(tmp_path)


def test_registry_refuses_a_foreign_database(tmp_path):
    engine = create_engine(db_url(tmp_path))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE something (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaError, match="not a cpreg registry database"):
        open_registry(tmp_path)


@sqlite_only
def test_sqlite_connection_settings(tmp_path):
    engine = make_engine(db_url(tmp_path))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    engine.dispose()


class _FlakyCursor:
    """A cursor whose first ``locked`` calls fail with SQLITE_BUSY, as while another process creates the file."""

    def __init__(self, locked: int, error: str = "database is locked") -> None:
        self.locked, self.error, self.statements = locked, error, []

    def execute(self, sql: str):
        self.statements.append(sql)
        if self.locked:
            self.locked -= 1
            raise sqlite3.OperationalError(self.error)
        return self

    def fetchone(self):
        return ("wal",) if self.statements[-1] == "PRAGMA journal_mode = WAL" else ("delete",)


def test_wal_switch_retries_while_another_process_holds_the_file():
    cursor = _FlakyCursor(locked=2)
    _use_wal(cursor, time.monotonic() + 5)
    assert cursor.statements == ["PRAGMA journal_mode"] * 3 + ["PRAGMA journal_mode = WAL"]
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # past the deadline: the error surfaces
        _use_wal(_FlakyCursor(locked=1000), time.monotonic() + 0.2)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):  # anything else at once
        _use_wal(_FlakyCursor(locked=1, error="disk I/O error"), time.monotonic() + 5)


def test_processes_opening_a_new_database_at_once(tmp_path):
    """Several processes create the same new registry concurrently: each opens it (no 'database is locked')."""
    code = ("import sys; from cpreg.registry import Registry; from cpreg.artifacts import ObjectStore; "
            "Registry(sys.argv[1], ObjectStore(sys.argv[2])).close()")
    url, store = f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "store")
    processes = [subprocess.Popen([sys.executable, "-c", code, url, store], stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, errors
    assert current(url) == head()


def test_in_memory_database(tmp_path):
    from cpreg.artifacts import ObjectStore

    with Registry("sqlite://", ObjectStore(str(tmp_path / "store"))) as reg:
        model = reg.ensure_base_model("tiny", FP_A)
        reg.add_concept("nudity", "nudity")
        assert reg.add_mask("nudity", make_mask(0), model).ref == "nudity@1"


def test_schema_is_portable_to_postgresql():
    """The migrations render for PostgreSQL (offline) and the ORM compiles for it: no SQLite-only SQL."""
    cfg = migrate.make_config("postgresql://cpreg@localhost/cpreg")
    out = io.StringIO()
    cfg.stdout = out
    cfg.output_buffer = out
    with contextlib.redirect_stdout(out):
        command.upgrade(cfg, "head", sql=True)
        command.downgrade(cfg, "0001:base", sql=True)
    sql = out.getvalue()
    for table in TABLES:
        assert f"CREATE TABLE {table} " in sql
        assert f"DROP TABLE {table};" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql and "JSON" in sql
    assert "sqlite" not in sql.lower() and "AUTOINCREMENT" not in sql and "PRAGMA" not in sql

    dialect = postgresql.dialect()
    for table in Base.metadata.sorted_tables:
        str(CreateTable(table).compile(dialect=dialect))
        for index in table.indexes:
            str(CreateIndex(index).compile(dialect=dialect))


def test_schema_check_never_sees_half_of_a_concurrent_migration(tmp_path, monkeypatch):
    """A migration committing between reading the version and listing the tables must not make a
    new database look foreign ("tables but no schema version"): both reads see one state."""
    import threading

    url = db_url(tmp_path)
    real_current = migrate._current
    migrated = threading.Event()

    def current_then_someone_migrates(connection):
        revision = real_current(connection)
        worker = threading.Thread(target=lambda: (upgrade(url), migrated.set()), daemon=True)
        worker.start()
        migrated.wait(timeout=2.0)  # PostgreSQL: blocked by the check's shared lock; SQLite: commits
        return revision

    monkeypatch.setattr(migrate, "_current", current_then_someone_migrates)
    engine = make_engine(url)
    try:
        state = migrate.schema_state(engine)
        assert (state.revision, state.empty) in ((None, True), (head(), False))
    finally:
        engine.dispose()
    monkeypatch.setattr(migrate, "_current", real_current)
    assert migrated.wait(timeout=60)
    assert current(url) == head()
