"""SQLAlchemy 2.x declarative rows of the registry database (internal: callers see entities).

Portable types only (Integer, BigInteger, String, Text, Float, Boolean-free, DateTime with time
zone, JSON), explicit constraint names through a naming convention, so the same schema and
migrations work on SQLite and PostgreSQL. Times are stored in UTC.

The schema is created and changed only by the Alembic migrations in ``cpreg.migrations``; the
test-suite checks that a migrated database matches this metadata exactly.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

CONCEPT_KINDS = ("style", "nudity", "object", "gender", "memorization", "custom")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Lengths: names follow refs.NAME_PATTERN (64); fingerprints are "sha256:<64 hex>" (71);
# object ids are 64 hex digits.
NAME_LEN = 64
OID_LEN = 64
FINGERPRINT_LEN = 128
ACTOR_LEN = 128


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(1024), nullable=False)
    revision: Mapped[str | None] = mapped_column(String(256), nullable=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LEN), nullable=False, unique=True)
    architecture: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = _created_at()


class ConceptRow(Base):
    __tablename__ = "concepts"
    __table_args__ = (
        CheckConstraint("kind IN ('style', 'nudity', 'object', 'gender', 'memorization', 'custom')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), nullable=False, unique=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Default prompts of a custom concept (built-in concepts take theirs from the catalog).
    prompt_set_id: Mapped[int | None] = mapped_column(ForeignKey("prompt_sets.id"), nullable=True)
    created_at: Mapped[datetime] = _created_at()


class PromptSetRow(Base):
    __tablename__ = "prompt_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(OID_LEN), nullable=False, unique=True)
    target_prompts: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    reference_prompts: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class CalibrationRow(Base):
    __tablename__ = "calibrations"
    __table_args__ = (UniqueConstraint("base_model_id", "prompt_set_id", "stats_oid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), nullable=False, index=True)
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id"), nullable=False, index=True)
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    steps: Mapped[int] = mapped_column(Integer, nullable=False)
    guidance: Mapped[float] = mapped_column(Float, nullable=False)
    tau: Mapped[int] = mapped_column(Integer, nullable=False)
    hook: Mapped[str] = mapped_column(String(32), nullable=False)
    component: Mapped[str] = mapped_column(String(64), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    dtype: Mapped[str] = mapped_column(String(32), nullable=False)
    device: Mapped[str] = mapped_column(String(64), nullable=False)
    library_versions: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    duration_s: Mapped[float] = mapped_column(Float, nullable=False)
    stats_oid: Mapped[str] = mapped_column(String(OID_LEN), nullable=False, index=True)
    dvc_stage: Mapped[str | None] = mapped_column(String(256), nullable=True)
    git_rev: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    created_by: Mapped[str] = mapped_column(String(ACTOR_LEN), nullable=False)


class MaskRow(Base):
    __tablename__ = "masks"
    __table_args__ = (
        UniqueConstraint("concept_id", "base_model_id", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"), nullable=False)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), nullable=False, index=True)
    calibration_id: Mapped[int | None] = mapped_column(ForeignKey("calibrations.id"), nullable=True, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    skill_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    tau: Mapped[int | None] = mapped_column(Integer, nullable=True)
    select_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    hook: Mapped[str] = mapped_column(String(32), nullable=False)
    component: Mapped[str] = mapped_column(String(64), nullable=False)
    artifact_oid: Mapped[str] = mapped_column(String(OID_LEN), nullable=False, index=True)
    masked_total: Mapped[int] = mapped_column(BigInteger, nullable=False)
    masked_per_layer: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    component_params: Mapped[int] = mapped_column(BigInteger, nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = _created_at()
    created_by: Mapped[str] = mapped_column(String(ACTOR_LEN), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    tags: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    dvc_stage: Mapped[str | None] = mapped_column(String(256), nullable=True)
    git_rev: Mapped[str | None] = mapped_column(String(64), nullable=True)


class MaskVersionCounterRow(Base):
    """Highest version ever given per (concept, base model), so a deleted version is never reused."""

    __tablename__ = "mask_version_counters"

    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"), primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer, nullable=False)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("concept_id", "base_model_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"), nullable=False)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(NAME_LEN), nullable=False)
    mask_id: Mapped[int] = mapped_column(ForeignKey("masks.id"), nullable=False, index=True)
    updated_at: Mapped[datetime] = _created_at()


class ReleaseRow(Base):
    __tablename__ = "releases"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), nullable=False, index=True)
    hook: Mapped[str] = mapped_column(String(32), nullable=False)
    union_oid: Mapped[str] = mapped_column(String(OID_LEN), nullable=False, index=True)
    masked_total: Mapped[int] = mapped_column(BigInteger, nullable=False)
    notes: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = _created_at()
    created_by: Mapped[str] = mapped_column(String(ACTOR_LEN), nullable=False)
    dvc_stage: Mapped[str | None] = mapped_column(String(256), nullable=True)
    git_rev: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ReleaseMemberRow(Base):
    __tablename__ = "release_members"

    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True)
    mask_id: Mapped[int] = mapped_column(ForeignKey("masks.id"), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer, nullable=False)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(ACTOR_LEN), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    subject: Mapped[str] = mapped_column(String(256), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


__all__ = [
    "CONCEPT_KINDS",
    "AliasRow",
    "Base",
    "BaseModelRow",
    "CalibrationRow",
    "ConceptRow",
    "EventRow",
    "MaskRow",
    "MaskVersionCounterRow",
    "PromptSetRow",
    "ReleaseMemberRow",
    "ReleaseRow",
]
