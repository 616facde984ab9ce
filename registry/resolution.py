"""From what a caller passes (an entity, a name, a reference, a fingerprint, an id) to the row.

Every function takes the open session and returns ORM rows, or raises a one-line
:class:`NotFoundError`, :class:`AmbiguousRefError` or :class:`InvalidNameError`. The grammar of
references is :mod:`cpreg.registry.refs`; what they mean is here: ``concept`` is its latest
version, ``concept@N`` version N, ``concept@alias`` the version the alias points to, each per
base model, and ambiguous when the concept has such a mask on several base models and no
``base_model`` narrows it down. Releases are ``name`` (latest) or ``name@N``.

Example:
    >>> with Session(engine) as session:
    ...     mask_row(session, "nudity@prod").version
    ...     release_row(session, "safe-v1").version
    3
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from .entities import BaseModel, Calibration, Concept, Mask, PromptSet, Release
from .errors import AmbiguousRefError, InvalidNameError, NotFoundError, RegistryError
from .orm import AliasRow, BaseModelRow, CalibrationRow, ConceptRow, MaskRow, PromptSetRow, ReleaseRow
from .refs import parse_ref, validate_name

#: How callers name a base model, a mask, a release: the entity or its fingerprint / reference.
BaseModelArg = BaseModel | str
MaskArg = Mask | str
ReleaseArg = Release | str

RowWithModel = TypeVar("RowWithModel", MaskRow, AliasRow)
VersionedRow = TypeVar("VersionedRow", MaskRow, ReleaseRow)


def short_fingerprint(fingerprint: str) -> str:
    """``sha256:0123456789abcdef...``: enough of a fingerprint to tell it in a message."""
    return fingerprint if len(fingerprint) <= 23 else fingerprint[:23] + "..."


def concept_exists(session: Session, name: str) -> bool:
    return session.scalar(select(func.count()).select_from(ConceptRow).where(ConceptRow.name == name)) > 0


def release_exists(session: Session, name: str) -> bool:
    return session.scalar(select(func.count()).select_from(ReleaseRow).where(ReleaseRow.name == name)) > 0


def base_model_row(session: Session, base_model: BaseModelArg) -> BaseModelRow:
    """The base model with this fingerprint (or of this :class:`BaseModel`)."""
    fingerprint = base_model.fingerprint if isinstance(base_model, BaseModel) else base_model
    if not isinstance(fingerprint, str):
        raise RegistryError(f"base model must be a BaseModel or a fingerprint, got {type(base_model).__name__}")
    row = session.scalars(select(BaseModelRow).where(BaseModelRow.fingerprint == fingerprint)).one_or_none()
    if row is None:
        raise NotFoundError(f"unknown base model {fingerprint!r}: register it with ensure_base_model first")
    return row


def base_model_filter(session: Session, base_model: BaseModelArg | None) -> BaseModelRow | None:
    """The base model a lookup is narrowed to, or None for any."""
    return None if base_model is None else base_model_row(session, base_model)


def concept_row(session: Session, concept: Concept | str) -> ConceptRow:
    name = concept.name if isinstance(concept, Concept) else validate_name(concept, "concept name")
    row = session.scalars(select(ConceptRow).where(ConceptRow.name == name)).one_or_none()
    if row is None:
        if release_exists(session, name):
            raise NotFoundError(f"{name!r} is a release, not a concept")
        raise NotFoundError(f"unknown concept {name!r}")
    return row


def prompt_set_row(session: Session, prompt_set: PromptSet | str | int) -> PromptSetRow:
    """The prompt set with this id, content hash (or of this :class:`PromptSet`)."""
    if isinstance(prompt_set, int) and not isinstance(prompt_set, bool):
        row = session.get(PromptSetRow, prompt_set)
    else:
        content_hash = prompt_set.content_hash if isinstance(prompt_set, PromptSet) else prompt_set
        query = select(PromptSetRow).where(PromptSetRow.content_hash == content_hash)
        row = session.scalars(query).one_or_none() if isinstance(content_hash, str) else None
    if row is None:
        raise NotFoundError(f"unknown prompt set {prompt_set!r}: register it with ensure_prompt_set first")
    return row


def calibration_row(session: Session, calibration: Calibration | int) -> CalibrationRow:
    cal_id = calibration.id if isinstance(calibration, Calibration) else calibration
    row = session.get(CalibrationRow, cal_id) if isinstance(cal_id, int) else None
    if row is None:
        raise NotFoundError(f"unknown calibration {cal_id!r}")
    return row


def _row_of(session: Session, row_type: type[VersionedRow], entity: Mask | Release, what: str) -> VersionedRow:
    """The row of an entity read earlier, unless it was deleted since."""
    row = session.get(row_type, entity.id)
    if row is None:
        raise NotFoundError(f"{what} {entity.ref} (id {entity.id}) no longer exists")
    return row


def one_per_model(rows: Sequence[RowWithModel], what: str, base_model: BaseModelRow | None) -> RowWithModel:
    """The single row of ``rows``: NotFound (``what``) if none, Ambiguous if several base models have one."""
    if not rows:
        where = f" on base model {short_fingerprint(base_model.fingerprint)}" if base_model is not None else ""
        raise NotFoundError(f"{what}{where}")
    if len(rows) > 1:
        fingerprints = sorted({row.base_model.fingerprint for row in rows})
        raise AmbiguousRefError(
            f"{what.replace('no ', '', 1)} exists for {len(fingerprints)} base models "
            f"({', '.join(short_fingerprint(fp) for fp in fingerprints)}): pass a base_model fingerprint"
        )
    return rows[0]


def alias_row(
    session: Session, concept: ConceptRow, alias: str, base_model: BaseModelRow | None, what: str
) -> AliasRow:
    """The alias ``concept@alias`` (on ``base_model``, else on the only base model that has it)."""
    query = select(AliasRow).where(AliasRow.concept_id == concept.id, AliasRow.name == alias)
    if base_model is not None:
        query = query.where(AliasRow.base_model_id == base_model.id)
    return one_per_model(list(session.scalars(query)), what, base_model)


def mask_row(session: Session, ref: MaskArg, base_model: BaseModelArg | None = None) -> MaskRow:
    """The mask ``ref`` names: a :class:`Mask` (still there?), ``concept[@N|@latest|@alias]``."""
    if isinstance(ref, Mask):
        return _row_of(session, MaskRow, ref, "mask")
    parsed = parse_ref(ref)
    concept = concept_row(session, parsed.name)
    model = base_model_filter(session, base_model)
    if parsed.alias is not None:
        what = f"no alias {parsed.alias!r} of concept {parsed.name!r}"
        return alias_row(session, concept, parsed.alias, model, what).mask
    query = select(MaskRow).where(MaskRow.concept_id == concept.id)
    if model is not None:
        query = query.where(MaskRow.base_model_id == model.id)
    if parsed.version is not None:
        rows = list(session.scalars(query.where(MaskRow.version == parsed.version)))
        return one_per_model(rows, f"no version {parsed.version} of concept {parsed.name!r}", model)
    newest = (
        query.with_only_columns(MaskRow.base_model_id, func.max(MaskRow.version).label("version"))
        .group_by(MaskRow.base_model_id)
        .subquery()
    )
    rows = list(
        session.scalars(
            select(MaskRow)
            .join(newest, and_(MaskRow.base_model_id == newest.c.base_model_id, MaskRow.version == newest.c.version))
            .where(MaskRow.concept_id == concept.id)
        )
    )
    return one_per_model(rows, f"no mask of concept {parsed.name!r}", model)


def latest_release_row(session: Session, name: str) -> ReleaseRow | None:
    """The highest version of release ``name`` on any base model, None if there is none."""
    query = select(ReleaseRow).where(ReleaseRow.name == name).order_by(ReleaseRow.version.desc()).limit(1)
    return session.scalars(query).first()


def release_row(session: Session, ref: ReleaseArg, base_model: BaseModelArg | None = None) -> ReleaseRow:
    """The release ``ref`` names: a :class:`Release` (still there?), ``name`` (latest) or ``name@N``."""
    if isinstance(ref, Release):
        return _row_of(session, ReleaseRow, ref, "release")
    parsed = parse_ref(ref)
    if parsed.alias is not None:
        raise InvalidNameError(f"invalid release reference {ref!r}: releases are NAME or NAME@VERSION")
    model = base_model_filter(session, base_model)
    query = select(ReleaseRow).where(ReleaseRow.name == parsed.name)
    if model is not None:
        query = query.where(ReleaseRow.base_model_id == model.id)
    if parsed.version is not None:
        query = query.where(ReleaseRow.version == parsed.version)
    row = session.scalars(query.order_by(ReleaseRow.version.desc()).limit(1)).first()
    if row is None:
        if not release_exists(session, parsed.name):
            if concept_exists(session, parsed.name):
                raise NotFoundError(f"{parsed.name!r} is a concept, not a release")
            raise NotFoundError(f"unknown release {parsed.name!r}")
        where = f" on base model {short_fingerprint(model.fingerprint)}" if model is not None else ""
        raise NotFoundError(f"no release {ref}{where}")
    return row


def mask_or_release_row(session: Session, ref: str, base_model: BaseModelArg | None = None) -> MaskRow | ReleaseRow:
    """The mask or the release ``ref`` names (concept and release names share one namespace)."""
    name = parse_ref(ref).name
    is_concept = concept_exists(session, name)
    is_release = release_exists(session, name)
    if is_concept and is_release:
        raise AmbiguousRefError(f"{name!r} is both a concept and a release")
    if is_release:
        return release_row(session, ref, base_model)
    if is_concept:
        return mask_row(session, ref, base_model)
    raise NotFoundError(f"unknown concept or release {name!r}")


def object_references(session: Session) -> dict[str, list[str]]:
    """Object id -> the rows that point to it (``mask nudity@3 (sha256:...)``, ``release safe-v1@1``...)."""
    found: dict[str, list[str]] = {}
    for oid, concept, version, fingerprint in session.execute(
        select(MaskRow.artifact_oid, ConceptRow.name, MaskRow.version, BaseModelRow.fingerprint)
        .join(ConceptRow, ConceptRow.id == MaskRow.concept_id)
        .join(BaseModelRow, BaseModelRow.id == MaskRow.base_model_id)
    ):
        found.setdefault(oid, []).append(f"mask {concept}@{version} ({short_fingerprint(fingerprint)})")
    for oid, name, version in session.execute(select(ReleaseRow.union_oid, ReleaseRow.name, ReleaseRow.version)):
        found.setdefault(oid, []).append(f"release {name}@{version}")
    for oid, cal_id in session.execute(select(CalibrationRow.stats_oid, CalibrationRow.id)):
        found.setdefault(oid, []).append(f"calibration {cal_id}")
    return found


__all__ = [
    "BaseModelArg",
    "MaskArg",
    "ReleaseArg",
    "alias_row",
    "base_model_filter",
    "base_model_row",
    "calibration_row",
    "concept_exists",
    "concept_row",
    "latest_release_row",
    "mask_or_release_row",
    "mask_row",
    "object_references",
    "prompt_set_row",
    "release_exists",
    "release_row",
    "short_fingerprint",
]
