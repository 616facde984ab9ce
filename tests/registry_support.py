"""Shared helpers of the registry tests: tiny hand-made masks and statistics, database snapshots.

No test lives here; the other ``test_registry_*`` modules import it (pytest puts ``tests/`` on
``sys.path``).

The tests use a SQLite file per test. With ``CPREG_TEST_POSTGRES_URL`` set (a server URL such as
``postgresql+psycopg://cpreg@127.0.0.1:5432/postgres``, a role allowed to create databases),
the backend-neutral tests run on a fresh PostgreSQL database per test instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, make_url, select, text

from cpreg.artifacts import ObjectStore
from cpreg.editors import ActivationStats, CalibrationConfig, ConceptMask, LayerMask
from cpreg.registry import Registry
from cpreg.registry.orm import Base

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
SHAPES = {"down_blocks.0.ff.net.2": (8, 16), "mid_block.ff.net.2": (4, 32), "up_blocks.1.ff.net.2": (8, 8)}


def make_mask(
    seed: int,
    fingerprint: str | None = FP_A,
    hook: str = "ffn_out",
    density: float = 0.3,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    component: str = "unet",
) -> ConceptMask:
    """A random mask: each weight masked with probability ``density``, steps in 1..10."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (rows, cols) in shapes.items():
        indices = torch.nonzero(torch.rand(rows * cols, generator=generator) < density).squeeze(1)
        steps = torch.randint(1, 11, (len(indices),), generator=generator).to(torch.uint8)
        layers[name] = LayerMask((rows, cols), indices, steps)
    params = {"skill_ratio": 0.01, "tau": 10, "select_ratio": 0.0}
    return ConceptMask(layers, hook, component, fingerprint, 10_000, params)


def mask_from_sets(indices: dict[str, list[int]], fingerprint: str = FP_A) -> ConceptMask:
    """A mask with exactly the given flat indices per layer (steps all 1)."""
    layers = {}
    for name, shape in SHAPES.items():
        chosen = torch.tensor(sorted(indices.get(name, [])), dtype=torch.int64)
        layers[name] = LayerMask(shape, chosen, torch.ones(len(chosen), dtype=torch.uint8))
    return ConceptMask(layers, "ffn_out", "unet", fingerprint, 10_000, {"tau": 10})


def make_stats(seed: int, fingerprint: str | None = FP_A, targets: int = 2, references: int = 2) -> ActivationStats:
    generator = torch.Generator().manual_seed(seed)
    config = CalibrationConfig(num_inference_steps=4, tau=3, seed=seed)

    def tensors() -> dict[str, torch.Tensor]:
        return {name: torch.rand(3, cols, generator=generator) for name, (_, cols) in SHAPES.items()}

    return ActivationStats(
        target=tensors(),
        reference=tensors(),
        config=config,
        component="unet",
        layer_shapes=dict(SHAPES),
        num_target_prompts=targets,
        num_reference_prompts=references,
        fingerprint=fingerprint,
        component_params=10_000,
    )


POSTGRES_URL = os.environ.get("CPREG_TEST_POSTGRES_URL")
ON_POSTGRES = bool(POSTGRES_URL)
sqlite_only = pytest.mark.skipif(ON_POSTGRES, reason="checks SQLite specifics")


def _pg_name(folder: Path) -> str:
    return "cpreg_test_" + hashlib.sha256(str(folder).encode()).hexdigest()[:20]


def _pg_admin(sql: str) -> None:
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(sql))
    finally:
        admin.dispose()


def db_url(folder: Path) -> str:
    """The test's database: a SQLite file in ``folder``, or a fresh PostgreSQL database."""
    if not ON_POSTGRES:
        return f"sqlite:///{folder / 'registry.db'}"
    name = _pg_name(folder)  # hex digits only: safe to quote as an identifier
    marker = folder / ".postgres-database"
    if not marker.exists():
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}"')
        _pg_admin(f'CREATE DATABASE "{name}"')
        marker.write_text(name)
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(folder: Path) -> None:
    """Drop the test's PostgreSQL database (nothing to do for SQLite)."""
    if ON_POSTGRES and (folder / ".postgres-database").exists():
        _pg_admin(f'DROP DATABASE IF EXISTS "{_pg_name(folder)}" WITH (FORCE)')


def open_registry(folder: Path, **kwargs) -> Registry:
    return Registry(db_url(folder), ObjectStore(str(folder / "store")), actor="tester", **kwargs)


def snapshot(reg: Registry) -> tuple:
    """Every row of every table plus the ids of every stored object."""
    rows = {}
    with reg._engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            rows[table.name] = sorted(map(tuple, connection.execute(select(table)).all()), key=repr)
    return rows, sorted(reg.store.ids())


def object_file(reg: Registry, oid: str) -> Path:
    return Path(reg.store.root) / "objects" / oid[:2] / oid[2:]
