"""Releases record the DVC stage and git revision that made them, as calibrations and masks do.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 12:00:00

Two nullable columns: existing releases keep NULL (their provenance, if any, stays in their
notes). Plain ``ADD COLUMN`` / ``DROP COLUMN`` on both SQLite (3.35+) and PostgreSQL: no table
is rebuilt, so no foreign key of ``release_members`` is ever touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("releases", sa.Column("dvc_stage", sa.String(length=256), nullable=True))
    op.add_column("releases", sa.Column("git_rev", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("releases", "git_rev")
    op.drop_column("releases", "dvc_stage")
