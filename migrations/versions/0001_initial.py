"""Initial registry schema.

Tables: base_models, concepts, prompt_sets, calibrations, masks, mask_version_counters
(highest version ever given per concept and base model), aliases, releases, release_members,
events.

Revision ID: 0001
Revises:
Create Date: 2026-11-30 08:30:05.224150

Reviewed by hand: portable types only (SQLite and PostgreSQL), named constraints, and a
downgrade that exactly undoes the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("revision", sa.String(length=256), nullable=True),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("architecture", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_base_models_fingerprint")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_at"), "events", ["at"], unique=False)
    op.create_table(
        "prompt_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("target_prompts", sa.JSON(), nullable=False),
        sa.Column("reference_prompts", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_sets")),
        sa.UniqueConstraint("content_hash", name=op.f("uq_prompt_sets_content_hash")),
    )
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("prompt_set_id", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("guidance", sa.Float(), nullable=False),
        sa.Column("tau", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(length=32), nullable=False),
        sa.Column("component", sa.String(length=64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("library_versions", sa.JSON(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("stats_oid", sa.String(length=64), nullable=False),
        sa.Column("dvc_stage", sa.String(length=256), nullable=True),
        sa.Column("git_rev", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_calibrations_base_model_id_base_models")
        ),
        sa.ForeignKeyConstraint(
            ["prompt_set_id"], ["prompt_sets.id"], name=op.f("fk_calibrations_prompt_set_id_prompt_sets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
        sa.UniqueConstraint(
            "base_model_id",
            "prompt_set_id",
            "stats_oid",
            name=op.f("uq_calibrations_base_model_id_prompt_set_id_stats_oid"),
        ),
    )
    op.create_index(op.f("ix_calibrations_base_model_id"), "calibrations", ["base_model_id"], unique=False)
    op.create_index(op.f("ix_calibrations_prompt_set_id"), "calibrations", ["prompt_set_id"], unique=False)
    op.create_index(op.f("ix_calibrations_stats_oid"), "calibrations", ["stats_oid"], unique=False)
    op.create_table(
        "concepts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("prompt_set_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('style', 'nudity', 'object', 'gender', 'memorization', 'custom')", name=op.f("ck_concepts_kind")
        ),
        sa.ForeignKeyConstraint(
            ["prompt_set_id"], ["prompt_sets.id"], name=op.f("fk_concepts_prompt_set_id_prompt_sets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concepts")),
        sa.UniqueConstraint("name", name=op.f("uq_concepts_name")),
    )
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(length=32), nullable=False),
        sa.Column("union_oid", sa.String(length=64), nullable=False),
        sa.Column("masked_total", sa.BigInteger(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.CheckConstraint("version >= 1", name=op.f("ck_releases_version_positive")),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_releases_base_model_id_base_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_releases")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_releases_name_version")),
    )
    op.create_index(op.f("ix_releases_base_model_id"), "releases", ["base_model_id"], unique=False)
    op.create_index(op.f("ix_releases_union_oid"), "releases", ["union_oid"], unique=False)
    op.create_table(
        "mask_version_counters",
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_mask_version_counters_base_model_id_base_models")
        ),
        sa.ForeignKeyConstraint(
            ["concept_id"], ["concepts.id"], name=op.f("fk_mask_version_counters_concept_id_concepts")
        ),
        sa.PrimaryKeyConstraint("concept_id", "base_model_id", name=op.f("pk_mask_version_counters")),
    )
    op.create_table(
        "masks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("calibration_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("skill_ratio", sa.Float(), nullable=True),
        sa.Column("tau", sa.Integer(), nullable=True),
        sa.Column("select_ratio", sa.Float(), nullable=True),
        sa.Column("hook", sa.String(length=32), nullable=False),
        sa.Column("component", sa.String(length=64), nullable=False),
        sa.Column("artifact_oid", sa.String(length=64), nullable=False),
        sa.Column("masked_total", sa.BigInteger(), nullable=False),
        sa.Column("masked_per_layer", sa.JSON(), nullable=False),
        sa.Column("component_params", sa.BigInteger(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("dvc_stage", sa.String(length=256), nullable=True),
        sa.Column("git_rev", sa.String(length=64), nullable=True),
        sa.CheckConstraint("version >= 1", name=op.f("ck_masks_version_positive")),
        sa.ForeignKeyConstraint(["base_model_id"], ["base_models.id"], name=op.f("fk_masks_base_model_id_base_models")),
        sa.ForeignKeyConstraint(
            ["calibration_id"], ["calibrations.id"], name=op.f("fk_masks_calibration_id_calibrations")
        ),
        sa.ForeignKeyConstraint(["concept_id"], ["concepts.id"], name=op.f("fk_masks_concept_id_concepts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_masks")),
        sa.UniqueConstraint(
            "concept_id", "base_model_id", "version", name=op.f("uq_masks_concept_id_base_model_id_version")
        ),
    )
    op.create_index(op.f("ix_masks_artifact_oid"), "masks", ["artifact_oid"], unique=False)
    op.create_index(op.f("ix_masks_base_model_id"), "masks", ["base_model_id"], unique=False)
    op.create_index(op.f("ix_masks_calibration_id"), "masks", ["calibration_id"], unique=False)
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("mask_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_aliases_base_model_id_base_models")
        ),
        sa.ForeignKeyConstraint(["concept_id"], ["concepts.id"], name=op.f("fk_aliases_concept_id_concepts")),
        sa.ForeignKeyConstraint(["mask_id"], ["masks.id"], name=op.f("fk_aliases_mask_id_masks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint(
            "concept_id", "base_model_id", "name", name=op.f("uq_aliases_concept_id_base_model_id_name")
        ),
    )
    op.create_index(op.f("ix_aliases_mask_id"), "aliases", ["mask_id"], unique=False)
    op.create_table(
        "release_members",
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("mask_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["mask_id"], ["masks.id"], name=op.f("fk_release_members_mask_id_masks")),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_release_members_release_id_releases"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("release_id", "mask_id", name=op.f("pk_release_members")),
    )
    op.create_index(op.f("ix_release_members_mask_id"), "release_members", ["mask_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_release_members_mask_id"), table_name="release_members")
    op.drop_table("release_members")
    op.drop_index(op.f("ix_aliases_mask_id"), table_name="aliases")
    op.drop_table("aliases")
    op.drop_index(op.f("ix_masks_calibration_id"), table_name="masks")
    op.drop_index(op.f("ix_masks_base_model_id"), table_name="masks")
    op.drop_index(op.f("ix_masks_artifact_oid"), table_name="masks")
    op.drop_table("masks")
    op.drop_table("mask_version_counters")
    op.drop_index(op.f("ix_releases_union_oid"), table_name="releases")
    op.drop_index(op.f("ix_releases_base_model_id"), table_name="releases")
    op.drop_table("releases")
    op.drop_table("concepts")
    op.drop_index(op.f("ix_calibrations_stats_oid"), table_name="calibrations")
    op.drop_index(op.f("ix_calibrations_prompt_set_id"), table_name="calibrations")
    op.drop_index(op.f("ix_calibrations_base_model_id"), table_name="calibrations")
    op.drop_table("calibrations")
    op.drop_table("prompt_sets")
    op.drop_index(op.f("ix_events_at"), table_name="events")
    op.drop_table("events")
    op.drop_table("base_models")
