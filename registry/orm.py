"""SQLAlchemy 2.x declarative rows of the registry database, and their mapping to entities.

Callers never see these rows: every row maps itself to its frozen entity with ``to_entity()``
(:mod:`cpreg.registry.entities`), following its relationships (the concept name and base model
fingerprint of a mask, its aliases, a release's members), which load eagerly with the row
(``lazy="joined"`` for one row, ``lazy="selectin"`` for collections, one query per collection
for a whole list of rows). Relationships are mappings only: they add no column or constraint.

Example:
    >>> row = session.scalars(select(MaskRow).where(MaskRow.version == 3)).first()
    >>> row.concept.name, row.base_model.fingerprint, [alias.name for alias in row.aliases]
    ('nudity', 'sha256:ab12...', ['prod'])
    >>> row.to_entity().ref
    'nudity@3'

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
    Select,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from .entities import Alias, BaseModel, Calibration, Concept, Event, Mask, PromptSet, Release

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


def as_utc(value: datetime) -> datetime:
    """``value`` with its time zone; SQLite hands back naive datetimes (stored in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


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

    def to_entity(self) -> BaseModel:
        return BaseModel(
            id=self.id,
            name=self.name,
            fingerprint=self.fingerprint,
            revision=self.revision,
            architecture=self.architecture,
            created_at=as_utc(self.created_at),
        )


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

    def to_entity(self) -> Concept:
        return Concept(
            id=self.id,
            name=self.name,
            kind=self.kind,
            description=self.description,
            prompt_set_id=self.prompt_set_id,
            created_at=as_utc(self.created_at),
        )


class PromptSetRow(Base):
    __tablename__ = "prompt_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(OID_LEN), nullable=False, unique=True)
    target_prompts: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    reference_prompts: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = _created_at()

    def to_entity(self) -> PromptSet:
        return PromptSet(
            id=self.id,
            content_hash=self.content_hash,
            targets=tuple(self.target_prompts),
            references=tuple(self.reference_prompts),
            created_at=as_utc(self.created_at),
        )


class CalibrationRow(Base):
    __tablename__ = "calibrations"
    __table_args__ = (UniqueConstraint("base_model_id", "prompt_set_id", "stats_oid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), nullable=False, index=True)
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id"), nullable=False, index=True)
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    num_inference_steps: Mapped[int] = mapped_column("steps", Integer, nullable=False)  # T
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

    base_model: Mapped[BaseModelRow] = relationship(lazy="joined", innerjoin=True)
    prompt_set: Mapped[PromptSetRow] = relationship(lazy="joined", innerjoin=True)

    def to_entity(self) -> Calibration:
        return Calibration(
            id=self.id,
            base_model_id=self.base_model_id,
            base_model_fingerprint=self.base_model.fingerprint,
            prompt_set_id=self.prompt_set_id,
            prompt_set_hash=self.prompt_set.content_hash,
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
            guidance=self.guidance,
            tau=self.tau,
            hook=self.hook,
            component=self.component,
            config=dict(self.config),
            dtype=self.dtype,
            device=self.device,
            library_versions=dict(self.library_versions),
            duration_s=self.duration_s,
            stats_oid=self.stats_oid,
            dvc_stage=self.dvc_stage,
            git_rev=self.git_rev,
            created_at=as_utc(self.created_at),
            created_by=self.created_by,
        )


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

    concept: Mapped[ConceptRow] = relationship(lazy="joined", innerjoin=True)
    base_model: Mapped[BaseModelRow] = relationship(lazy="joined", innerjoin=True)
    aliases: Mapped[list[AliasRow]] = relationship(back_populates="mask", lazy="selectin", order_by="AliasRow.name")

    @property
    def ref(self) -> str:
        return f"{self.concept.name}@{self.version}"

    def to_entity(self) -> Mask:
        return Mask(
            id=self.id,
            concept=self.concept.name,
            version=self.version,
            base_model_id=self.base_model_id,
            base_model_fingerprint=self.base_model.fingerprint,
            calibration_id=self.calibration_id,
            hook=self.hook,
            component=self.component,
            skill_ratio=self.skill_ratio,
            tau=self.tau,
            select_ratio=self.select_ratio,
            artifact_oid=self.artifact_oid,
            masked_total=self.masked_total,
            masked_per_layer=dict(self.masked_per_layer),
            component_params=self.component_params,
            params=dict(self.params),
            description=self.description,
            tags=tuple(self.tags),
            aliases=tuple(alias.name for alias in self.aliases),
            dvc_stage=self.dvc_stage,
            git_rev=self.git_rev,
            created_at=as_utc(self.created_at),
            created_by=self.created_by,
        )


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

    concept: Mapped[ConceptRow] = relationship(lazy="joined", innerjoin=True)
    base_model: Mapped[BaseModelRow] = relationship(lazy="joined", innerjoin=True)
    mask: Mapped[MaskRow] = relationship(back_populates="aliases", lazy="joined", innerjoin=True)

    def to_entity(self) -> Alias:
        return Alias(
            id=self.id,
            concept=self.concept.name,
            name=self.name,
            base_model_fingerprint=self.base_model.fingerprint,
            mask_id=self.mask_id,
            mask_version=self.mask.version,
            updated_at=as_utc(self.updated_at),
        )


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

    base_model: Mapped[BaseModelRow] = relationship(lazy="joined", innerjoin=True)
    members: Mapped[list[ReleaseMemberRow]] = relationship(lazy="selectin", order_by="ReleaseMemberRow.position")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_entity(self) -> Release:
        return Release(
            id=self.id,
            name=self.name,
            version=self.version,
            base_model_id=self.base_model_id,
            base_model_fingerprint=self.base_model.fingerprint,
            hook=self.hook,
            union_oid=self.union_oid,
            masked_total=self.masked_total,
            notes=self.notes,
            members=tuple(member.mask.ref for member in self.members),
            member_ids=tuple(member.mask_id for member in self.members),
            created_at=as_utc(self.created_at),
            created_by=self.created_by,
            dvc_stage=self.dvc_stage,
            git_rev=self.git_rev,
        )


class ReleaseMemberRow(Base):
    __tablename__ = "release_members"

    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True)
    mask_id: Mapped[int] = mapped_column(ForeignKey("masks.id"), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer, nullable=False)

    mask: Mapped[MaskRow] = relationship(lazy="joined", innerjoin=True)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(ACTOR_LEN), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    subject: Mapped[str] = mapped_column(String(256), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)

    def to_entity(self) -> Event:
        return Event(self.id, as_utc(self.at), self.actor, self.action, self.subject, dict(self.details))


def select_entities(session: Session, query: Select[Any]) -> list[Any]:
    """The entities of the rows ``query`` selects, in its order.

    Example:
        >>> select_entities(session, select(ConceptRow).order_by(ConceptRow.name))
        [Concept(name='nudity', ...), Concept(name='van-gogh', ...)]
    """
    return [row.to_entity() for row in session.scalars(query)]


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
    "as_utc",
    "select_entities",
]
