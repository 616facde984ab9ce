"""The :class:`Registry` facade: versioned concept masks, aliases and releases over a database
and an :class:`~cpreg.artifacts.ObjectStore`.

Rows live in a SQL database (SQLite by default, any SQLAlchemy URL); the masks, unions and
activation statistics themselves are objects of the store, named by their sha256. Every method
takes and returns plain entities (:mod:`cpreg.registry.entities`), never ORM rows, and every
mutation writes an :class:`~cpreg.registry.entities.Event`.

Example:
    >>> reg = Registry("sqlite:///.cpreg/registry.db", ObjectStore(".cpreg/store"))
    >>> model = reg.ensure_base_model("CompVis/stable-diffusion-v1-4", model_fingerprint(pipe))
    >>> reg.add_concept("nudity", "nudity")
    >>> reg.add_mask("nudity", mask, model).ref
    'nudity@1'
    >>> reg.set_alias("nudity@1", "prod")
    >>> release = reg.compose("safe-v1", ["nudity@prod", "van-gogh"])
    >>> reg.load_release_mask(release).num_masked
    2004113

Guarantees (see docs/data-model.md): an object is always stored before the row that points to
it is committed; a version number is never given twice for one (concept, base model), even
under concurrent writers; every failing call leaves the database as it was.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import URL, and_, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ..artifacts import ObjectStore, mask_from_bytes, mask_to_bytes, stats_from_bytes, stats_to_bytes
from ..editors import ActivationStats, ConceptMask, check_compatible, overlap, union
from .db import WRITE_OPTION, make_engine
from .entities import Alias, BaseModel, Calibration, Concept, Event, Mask, PromptSet, Release
from .errors import (
    AmbiguousRefError,
    ConflictError,
    IncompatibleMasksError,
    InUseError,
    InvalidNameError,
    NotFoundError,
    RegistryError,
)
from .migrate import ensure_schema
from .orm import (
    ACTOR_LEN,
    CONCEPT_KINDS,
    AliasRow,
    BaseModelRow,
    CalibrationRow,
    ConceptRow,
    EventRow,
    MaskRow,
    MaskVersionCounterRow,
    PromptSetRow,
    ReleaseMemberRow,
    ReleaseRow,
)
from .refs import Ref, parse_ref, validate_alias, validate_name, validate_tags

T = TypeVar("T")

#: Attempts of a write transaction that lost a race (unique constraint, lock, deadlock).
WRITE_ATTEMPTS = 30
#: PostgreSQL advisory lock ordering writers (shared) against gc (exclusive).
OBJECT_LOCK_KEY = 0x6370726567

#: Extra rounds of waiting for SQLite's write lock once busy_timeout has expired.
LOCK_RETRIES = 2

BaseModelArg = BaseModel | str
MaskArg = Mask | str
ReleaseArg = Release | str


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name (containers without a passwd entry)
        return "unknown"


def prompt_set_hash(targets: Sequence[str], references: Sequence[str]) -> str:
    """sha256 hex of the canonical JSON of both prompt lists (order matters)."""
    payload = json.dumps(
        {"references": list(references), "targets": list(targets)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _prompt_list(prompts: Iterable[str], what: str) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise RegistryError(f"{what} must be a list of prompts, not a single string")
    result = list(prompts)
    if not result:
        raise RegistryError(f"{what} must hold at least one prompt")
    for prompt in result:
        if not isinstance(prompt, str):
            raise RegistryError(f"{what} must hold strings, got {type(prompt).__name__}")
    return result


def _text(value: object, what: str, max_len: int | None = None, *, optional: bool = False) -> str | None:
    """``value`` if it is a string every backend stores as is, else :class:`RegistryError`.

    Checked before anything is written (store included), so SQLite, which would store anything,
    and PostgreSQL, which refuses NUL characters and over-long ``VARCHAR`` values, behave alike.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RegistryError(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise RegistryError(f"{what} must not contain NUL characters")
    if max_len is not None and len(value) > max_len:
        raise RegistryError(f"{what} is {len(value)} characters long; at most {max_len} are allowed")
    return value


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistryError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _json_value(value: Any, what: str) -> Any:
    """``value`` if it is strict JSON (no NaN / infinity, string keys), else :class:`RegistryError`."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be plain JSON data: {exc}") from None
    return value


def _is_retryable_integrity_error(exc: sa_exc.IntegrityError) -> bool:
    """A unique or foreign-key violation: a concurrent writer got there first (retry); NOT NULL
    or CHECK violations would fail again and are reported at once."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code is not None:
        return code in ("23505", "23503")  # unique_violation, foreign_key_violation
    message = str(exc.orig).lower()
    return "unique" in message or "foreign key" in message


def _one_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


def _short(fingerprint: str) -> str:
    return fingerprint if len(fingerprint) <= 23 else fingerprint[:23] + "..."


class Registry:
    """Versioned concept masks and releases in a database plus an object store.

    Args:
        db_url: SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``).
        store: an :class:`ObjectStore` or its root (local folder or fsspec URL).
        auto_upgrade: migrate a new, empty database to the current schema. A database at an
            older schema revision is never migrated implicitly: :class:`SchemaError` tells to
            run ``cpreg db upgrade``.
        actor: who is acting, recorded in events and ``created_by`` (default: the OS user).
        busy_timeout_s: SQLite only, how long to wait for another writer's lock.

    One ``Registry`` per process: after ``fork`` create a new one in the child.

    Example:
        >>> with Registry("sqlite:///reg.db", ".cpreg/store") as reg:
        ...     reg.list_concepts()
        []
    """

    def __init__(
        self,
        db_url: str | URL,
        store: ObjectStore | str | os.PathLike,
        *,
        auto_upgrade: bool = True,
        actor: str | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.db_url = db_url
        self.store = store if isinstance(store, ObjectStore) else ObjectStore(store)
        self.actor = _text(actor, "actor", ACTOR_LEN) if actor else _os_user()[:ACTOR_LEN]
        self._engine = make_engine(db_url, busy_timeout_s=busy_timeout_s)
        self._writer = self._engine.execution_options(**{WRITE_OPTION: True})
        try:
            ensure_schema(self._engine, auto_upgrade=auto_upgrade)
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self._engine.url.render_as_string(hide_password=True)!r}, {self.store!r})"

    # ------------------------------------------------------------------ transactions

    def _read(self, fn: Callable[[Session], T]) -> T:
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            return fn(session)

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction, retried when it loses a race.

        On SQLite the transaction starts with ``BEGIN IMMEDIATE`` (writers queue on the lock);
        elsewhere two writers may pick the same version number, the unique constraint rejects
        the second insert and the whole transaction is retried from a fresh snapshot.
        """
        lock_waits = 0
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with Session(self._writer, expire_on_commit=False) as session, session.begin():
                    return fn(session)
            except sa_exc.IntegrityError as exc:
                if not _is_retryable_integrity_error(exc):
                    raise RegistryError(f"the database refused the write: {_one_line(exc)}") from exc
                if attempt == WRITE_ATTEMPTS - 1:
                    raise ConflictError(f"could not write after {WRITE_ATTEMPTS} attempts: {_one_line(exc)}") from exc
            except sa_exc.DataError as exc:  # a value the backend cannot store (validated earlier: a backstop)
                raise RegistryError(f"the database refused a value: {_one_line(exc)}") from exc
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

    def _event(self, session: Session, actor: str | None, action: str, subject: str, details: dict) -> None:
        actor = _text(actor, "created_by", ACTOR_LEN) if actor else self.actor
        session.add(EventRow(actor=actor, action=action, subject=subject[:256], details=details))

    @staticmethod
    def _object_lock(session: Session, *, exclusive: bool) -> None:
        """Order writers against ``gc`` until the end of the transaction.

        SQLite: nothing to do, every write transaction already holds the database's write lock.
        PostgreSQL: writers share a transaction-scoped advisory lock that ``gc`` takes alone.
        """
        if session.get_bind().dialect.name == "postgresql":
            function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            session.execute(text(f"SELECT {function}(:key)"), {"key": OBJECT_LOCK_KEY})  # fixed names only

    def _ensure_object(self, session: Session, oid: str, data: bytes) -> None:
        """Inside a write transaction, before inserting a row pointing to ``oid``: make sure the
        object is there (a concurrent ``gc`` may have removed it since it was stored) and keep
        ``gc`` away until the row is committed."""
        self._object_lock(session, exclusive=False)
        if not self.store.exists(oid):
            self.store.put(data)

    # ------------------------------------------------------------------ row lookups

    def _base_model_row(self, session: Session, base_model: BaseModelArg) -> BaseModelRow:
        fingerprint = base_model.fingerprint if isinstance(base_model, BaseModel) else base_model
        if not isinstance(fingerprint, str):
            raise RegistryError(f"base model must be a BaseModel or a fingerprint, got {type(base_model).__name__}")
        row = session.scalars(select(BaseModelRow).where(BaseModelRow.fingerprint == fingerprint)).one_or_none()
        if row is None:
            raise NotFoundError(f"unknown base model {fingerprint!r}: register it with ensure_base_model first")
        return row

    def _concept_row(self, session: Session, concept: Concept | str) -> ConceptRow:
        name = concept.name if isinstance(concept, Concept) else validate_name(concept, "concept name")
        row = session.scalars(select(ConceptRow).where(ConceptRow.name == name)).one_or_none()
        if row is None:
            if self._release_exists(session, name):
                raise NotFoundError(f"{name!r} is a release, not a concept")
            raise NotFoundError(f"unknown concept {name!r}")
        return row

    def _prompt_set_row(self, session: Session, prompt_set: PromptSet | str | int) -> PromptSetRow:
        if isinstance(prompt_set, int) and not isinstance(prompt_set, bool):
            row = session.get(PromptSetRow, prompt_set)
        else:
            content_hash = prompt_set.content_hash if isinstance(prompt_set, PromptSet) else prompt_set
            query = select(PromptSetRow).where(PromptSetRow.content_hash == content_hash)
            row = session.scalars(query).one_or_none() if isinstance(content_hash, str) else None
        if row is None:
            raise NotFoundError(f"unknown prompt set {prompt_set!r}: register it with ensure_prompt_set first")
        return row

    def _calibration_row(self, session: Session, calibration: Calibration | int) -> CalibrationRow:
        cal_id = calibration.id if isinstance(calibration, Calibration) else calibration
        row = session.get(CalibrationRow, cal_id) if isinstance(cal_id, int) else None
        if row is None:
            raise NotFoundError(f"unknown calibration {cal_id!r}")
        return row

    @staticmethod
    def _release_exists(session: Session, name: str) -> bool:
        return session.scalar(select(func.count()).select_from(ReleaseRow).where(ReleaseRow.name == name)) > 0

    @staticmethod
    def _concept_exists(session: Session, name: str) -> bool:
        return session.scalar(select(func.count()).select_from(ConceptRow).where(ConceptRow.name == name)) > 0

    def _model_filter(self, session: Session, base_model: BaseModelArg | None) -> BaseModelRow | None:
        return None if base_model is None else self._base_model_row(session, base_model)

    def _fingerprints(self, session: Session, ids: Iterable[int]) -> dict[int, str]:
        ids = set(ids)
        if not ids:
            return {}
        rows = session.execute(select(BaseModelRow.id, BaseModelRow.fingerprint).where(BaseModelRow.id.in_(ids)))
        return {row_id: fingerprint for row_id, fingerprint in rows}

    def _one_model(self, session: Session, rows: list, what: str, base_model: BaseModelRow | None):
        """The single row of ``rows``; NotFound if none, Ambiguous if several base models."""
        if not rows:
            where = f" on base model {_short(base_model.fingerprint)}" if base_model is not None else ""
            raise NotFoundError(f"{what}{where}")
        if len(rows) > 1:
            fingerprints = sorted(self._fingerprints(session, (row.base_model_id for row in rows)).values())
            raise AmbiguousRefError(
                f"{what.replace('no ', '', 1)} exists for {len(fingerprints)} base models "
                f"({', '.join(_short(fp) for fp in fingerprints)}): pass a base_model fingerprint"
            )
        return rows[0]

    def _mask_row(self, session: Session, ref: MaskArg, base_model: BaseModelArg | None = None) -> MaskRow:
        if isinstance(ref, Mask):
            row = session.get(MaskRow, ref.id)
            if row is None:
                raise NotFoundError(f"mask {ref.ref} (id {ref.id}) no longer exists")
            return row
        parsed = parse_ref(ref)
        concept = self._concept_row(session, parsed.name)
        model = self._model_filter(session, base_model)
        query = select(MaskRow).where(MaskRow.concept_id == concept.id)
        if model is not None:
            query = query.where(MaskRow.base_model_id == model.id)
        if parsed.version is not None:
            rows = list(session.scalars(query.where(MaskRow.version == parsed.version)))
            return self._one_model(session, rows, f"no version {parsed.version} of concept {parsed.name!r}", model)
        if parsed.alias is not None:
            alias_query = select(AliasRow).where(AliasRow.concept_id == concept.id, AliasRow.name == parsed.alias)
            if model is not None:
                alias_query = alias_query.where(AliasRow.base_model_id == model.id)
            aliases = list(session.scalars(alias_query))
            alias = self._one_model(session, aliases, f"no alias {parsed.alias!r} of concept {parsed.name!r}", model)
            return session.get(MaskRow, alias.mask_id)
        newest = (
            query.with_only_columns(MaskRow.base_model_id, func.max(MaskRow.version).label("version"))
            .group_by(MaskRow.base_model_id)
            .subquery()
        )
        rows = list(
            session.scalars(
                select(MaskRow)
                .join(
                    newest, and_(MaskRow.base_model_id == newest.c.base_model_id, MaskRow.version == newest.c.version)
                )
                .where(MaskRow.concept_id == concept.id)
            )
        )
        return self._one_model(session, rows, f"no mask of concept {parsed.name!r}", model)

    def _release_row(self, session: Session, ref: ReleaseArg, base_model: BaseModelArg | None = None) -> ReleaseRow:
        if isinstance(ref, Release):
            row = session.get(ReleaseRow, ref.id)
            if row is None:
                raise NotFoundError(f"release {ref.ref} (id {ref.id}) no longer exists")
            return row
        parsed = parse_ref(ref)
        if parsed.alias is not None:
            raise InvalidNameError(f"invalid release reference {ref!r}: releases are NAME or NAME@VERSION")
        model = self._model_filter(session, base_model)
        query = select(ReleaseRow).where(ReleaseRow.name == parsed.name)
        if model is not None:
            query = query.where(ReleaseRow.base_model_id == model.id)
        if parsed.version is not None:
            query = query.where(ReleaseRow.version == parsed.version)
        row = session.scalars(query.order_by(ReleaseRow.version.desc()).limit(1)).first()
        if row is None:
            if not self._release_exists(session, parsed.name):
                if self._concept_exists(session, parsed.name):
                    raise NotFoundError(f"{parsed.name!r} is a concept, not a release")
                raise NotFoundError(f"unknown release {parsed.name!r}")
            where = f" on base model {_short(model.fingerprint)}" if model is not None else ""
            raise NotFoundError(f"no release {ref}{where}")
        return row

    # ------------------------------------------------------------------ entities

    @staticmethod
    def _base_model_entity(row: BaseModelRow) -> BaseModel:
        return BaseModel(
            id=row.id,
            name=row.name,
            fingerprint=row.fingerprint,
            revision=row.revision,
            architecture=row.architecture,
            created_at=_utc(row.created_at),
        )

    @staticmethod
    def _concept_entity(row: ConceptRow) -> Concept:
        return Concept(
            id=row.id,
            name=row.name,
            kind=row.kind,
            description=row.description,
            prompt_set_id=row.prompt_set_id,
            created_at=_utc(row.created_at),
        )

    @staticmethod
    def _prompt_set_entity(row: PromptSetRow) -> PromptSet:
        return PromptSet(
            row.id, row.content_hash, tuple(row.target_prompts), tuple(row.reference_prompts), _utc(row.created_at)
        )

    def _calibration_entity(self, session: Session, row: CalibrationRow) -> Calibration:
        return Calibration(
            id=row.id,
            base_model_id=row.base_model_id,
            base_model_fingerprint=session.get(BaseModelRow, row.base_model_id).fingerprint,
            prompt_set_id=row.prompt_set_id,
            prompt_set_hash=session.get(PromptSetRow, row.prompt_set_id).content_hash,
            seed=row.seed,
            steps=row.steps,
            guidance=row.guidance,
            tau=row.tau,
            hook=row.hook,
            component=row.component,
            config=dict(row.config),
            dtype=row.dtype,
            device=row.device,
            library_versions=dict(row.library_versions),
            duration_s=row.duration_s,
            stats_oid=row.stats_oid,
            dvc_stage=row.dvc_stage,
            git_rev=row.git_rev,
            created_at=_utc(row.created_at),
            created_by=row.created_by,
        )

    def _mask_entities(self, session: Session, rows: Sequence[MaskRow]) -> list[Mask]:
        if not rows:
            return []
        concept_ids = {row.concept_id for row in rows}
        names = dict(
            session.execute(select(ConceptRow.id, ConceptRow.name).where(ConceptRow.id.in_(concept_ids))).all()
        )
        fingerprints = self._fingerprints(session, (row.base_model_id for row in rows))
        aliases: dict[int, list[str]] = {}
        mask_ids = [row.id for row in rows]
        for mask_id, name in session.execute(
            select(AliasRow.mask_id, AliasRow.name).where(AliasRow.mask_id.in_(mask_ids)).order_by(AliasRow.name)
        ):
            aliases.setdefault(mask_id, []).append(name)
        return [
            Mask(
                id=row.id,
                concept=names[row.concept_id],
                version=row.version,
                base_model_id=row.base_model_id,
                base_model_fingerprint=fingerprints[row.base_model_id],
                calibration_id=row.calibration_id,
                hook=row.hook,
                component=row.component,
                skill_ratio=row.skill_ratio,
                tau=row.tau,
                select_ratio=row.select_ratio,
                artifact_oid=row.artifact_oid,
                masked_total=row.masked_total,
                masked_per_layer=dict(row.masked_per_layer),
                component_params=row.component_params,
                params=dict(row.params),
                description=row.description,
                tags=tuple(row.tags),
                aliases=tuple(aliases.get(row.id, ())),
                dvc_stage=row.dvc_stage,
                git_rev=row.git_rev,
                created_at=_utc(row.created_at),
                created_by=row.created_by,
            )
            for row in rows
        ]

    def _mask_entity(self, session: Session, row: MaskRow) -> Mask:
        return self._mask_entities(session, [row])[0]

    def _release_entities(self, session: Session, rows: Sequence[ReleaseRow]) -> list[Release]:
        if not rows:
            return []
        fingerprints = self._fingerprints(session, (row.base_model_id for row in rows))
        members: dict[int, list[tuple[int, str]]] = {}
        for release_id, mask_id, concept, version in session.execute(
            select(ReleaseMemberRow.release_id, MaskRow.id, ConceptRow.name, MaskRow.version)
            .join(MaskRow, MaskRow.id == ReleaseMemberRow.mask_id)
            .join(ConceptRow, ConceptRow.id == MaskRow.concept_id)
            .where(ReleaseMemberRow.release_id.in_([row.id for row in rows]))
            .order_by(ReleaseMemberRow.release_id, ReleaseMemberRow.position)
        ):
            members.setdefault(release_id, []).append((mask_id, f"{concept}@{version}"))
        return [
            Release(
                id=row.id,
                name=row.name,
                version=row.version,
                base_model_id=row.base_model_id,
                base_model_fingerprint=fingerprints[row.base_model_id],
                hook=row.hook,
                union_oid=row.union_oid,
                masked_total=row.masked_total,
                notes=row.notes,
                members=tuple(ref for _, ref in members.get(row.id, ())),
                member_ids=tuple(mask_id for mask_id, _ in members.get(row.id, ())),
                created_at=_utc(row.created_at),
                created_by=row.created_by,
                dvc_stage=row.dvc_stage,
                git_rev=row.git_rev,
            )
            for row in rows
        ]

    def _release_entity(self, session: Session, row: ReleaseRow) -> Release:
        return self._release_entities(session, [row])[0]

    def _alias_entity(self, session: Session, row: AliasRow) -> Alias:
        mask = session.get(MaskRow, row.mask_id)
        return Alias(
            id=row.id,
            concept=session.get(ConceptRow, row.concept_id).name,
            name=row.name,
            base_model_fingerprint=session.get(BaseModelRow, row.base_model_id).fingerprint,
            mask_id=row.mask_id,
            mask_version=mask.version,
            updated_at=_utc(row.updated_at),
        )

    # ------------------------------------------------------------------ base models

    def ensure_base_model(
        self,
        name: str,
        fingerprint: str,
        revision: str | None = None,
        architecture: str | None = None,
        *,
        created_by: str | None = None,
    ) -> BaseModel:
        """Register a base model by fingerprint, or return the one already registered.

        Example:
            >>> reg.ensure_base_model("CompVis/stable-diffusion-v1-4", "sha256:ab12...", "main", "sd")
        """
        if not isinstance(name, str) or not name.strip() or len(name) > 1024 or "\x00" in name:
            raise InvalidNameError(f"invalid base model name {name!r}: a hub id or path of 1-1024 characters")
        if not isinstance(fingerprint, str) or not fingerprint.strip() or len(fingerprint) > 128 or "\x00" in fingerprint:
            raise InvalidNameError(f"invalid base model fingerprint {fingerprint!r}")
        _text(revision, "revision", 256, optional=True)
        _text(architecture, "architecture", 64, optional=True)

        def write(session: Session) -> BaseModel:
            row = session.scalars(select(BaseModelRow).where(BaseModelRow.fingerprint == fingerprint)).one_or_none()
            if row is None:
                row = BaseModelRow(name=name, fingerprint=fingerprint, revision=revision, architecture=architecture)
                session.add(row)
                session.flush()
                self._event(
                    session,
                    created_by,
                    "base_model.add",
                    f"base_model:{fingerprint}",
                    {"name": name, "revision": revision, "architecture": architecture},
                )
            return self._base_model_entity(row)

        return self._write(write)

    def get_base_model(self, fingerprint: str) -> BaseModel:
        """The base model with this fingerprint (:class:`NotFoundError` if unknown)."""
        return self._read(lambda s: self._base_model_entity(self._base_model_row(s, fingerprint)))

    def list_base_models(self) -> list[BaseModel]:
        """Every base model, oldest first."""
        return self._read(
            lambda s: [self._base_model_entity(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.id))]
        )

    # ------------------------------------------------------------------ concepts

    def add_concept(
        self,
        name: str,
        kind: str,
        description: str = "",
        *,
        prompt_set: PromptSet | str | int | None = None,
        created_by: str | None = None,
    ) -> Concept:
        """Register a concept; ``kind`` in style, nudity, object, gender, memorization, custom.

        ``prompt_set`` (a :class:`PromptSet`, its content hash or id) records the concept's
        default prompts. Raises :class:`ConflictError` if the name is taken by a concept or a
        release.

        Example:
            >>> ps = reg.ensure_prompt_set(["a starry night painting"], ["a night painting"])
            >>> reg.add_concept("van-gogh", "style", "paintings in the style of Van Gogh", prompt_set=ps)
        """
        validate_name(name, "concept name")
        if kind not in CONCEPT_KINDS:
            raise InvalidNameError(f"invalid concept kind {kind!r}: one of {', '.join(CONCEPT_KINDS)}")
        _text(description, "description")

        def write(session: Session) -> Concept:
            if self._concept_exists(session, name):
                raise ConflictError(f"concept {name!r} already exists")
            if self._release_exists(session, name):
                raise ConflictError(f"{name!r} is already the name of a release")
            prompts = self._prompt_set_row(session, prompt_set) if prompt_set is not None else None
            row = ConceptRow(
                name=name,
                kind=kind,
                description=description,
                prompt_set_id=prompts.id if prompts is not None else None,
            )
            session.add(row)
            session.flush()
            details = {"kind": kind, "description": description}
            if prompts is not None:
                details["prompt_set"] = prompts.content_hash
            self._event(session, created_by, "concept.add", f"concept:{name}", details)
            return self._concept_entity(row)

        return self._write(write)

    def get_concept(self, name: str) -> Concept:
        """The concept called ``name`` (:class:`NotFoundError` if unknown)."""
        return self._read(lambda s: self._concept_entity(self._concept_row(s, name)))

    def list_concepts(self) -> list[Concept]:
        """Every concept, by name."""
        return self._read(
            lambda s: [self._concept_entity(r) for r in s.scalars(select(ConceptRow).order_by(ConceptRow.name))]
        )

    # ------------------------------------------------------------------ prompt sets, calibrations

    def ensure_prompt_set(
        self, targets: Sequence[str], references: Sequence[str], *, created_by: str | None = None
    ) -> PromptSet:
        """Register target and reference prompts (identified by their content hash); idempotent.

        Example:
            >>> ps = reg.ensure_prompt_set(["a naked man"], ["a man"])
            >>> ps.content_hash == reg.ensure_prompt_set(["a naked man"], ["a man"]).content_hash
            True
        """
        targets = _prompt_list(targets, "targets")
        references = _prompt_list(references, "references")
        content_hash = prompt_set_hash(targets, references)

        def write(session: Session) -> PromptSet:
            row = session.scalars(select(PromptSetRow).where(PromptSetRow.content_hash == content_hash)).one_or_none()
            if row is None:
                row = PromptSetRow(content_hash=content_hash, target_prompts=targets, reference_prompts=references)
                session.add(row)
                session.flush()
                self._event(
                    session,
                    created_by,
                    "prompt_set.add",
                    f"prompt_set:{content_hash}",
                    {"targets": len(targets), "references": len(references)},
                )
            return self._prompt_set_entity(row)

        return self._write(write)

    def get_prompt_set(self, prompt_set: int | str) -> PromptSet:
        """The prompt set with this id or content hash (:class:`NotFoundError` if unknown).

        Example:
            >>> reg.get_prompt_set(reg.get_concept("van-gogh").prompt_set_id).targets
            ('a starry night painting',)
        """
        return self._read(lambda s: self._prompt_set_entity(self._prompt_set_row(s, prompt_set)))

    def add_calibration(
        self,
        stats: ActivationStats,
        base_model: BaseModelArg,
        prompt_set: PromptSet | str | int,
        *,
        dtype: Any,
        device: Any,
        duration_s: float,
        library_versions: dict,
        created_by: str | None = None,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
    ) -> Calibration:
        """Store calibration statistics and record the run; idempotent.

        The same statistics bytes for the same base model and prompt set return the existing
        calibration. The statistics' fingerprint (when set) must be the base model's.

        Example:
            >>> cal = reg.add_calibration(stats, model, ps, dtype="float16", device="cuda",
            ...                           duration_s=812.5, library_versions={"torch": "2.5.1"})
        """
        if not isinstance(stats, ActivationStats):
            raise RegistryError(f"stats must be ActivationStats, got {type(stats).__name__}")
        dtype = _text(str(dtype).removeprefix("torch."), "dtype", 32)
        device = _text(str(device), "device", 64)
        duration_s = _finite(duration_s, "duration_s")
        library_versions = _json_value(dict(library_versions), "library_versions")
        _finite(stats.config.guidance_scale, "guidance_scale")
        _text(dvc_stage, "dvc_stage", 256, optional=True)
        _text(git_rev, "git_rev", 64, optional=True)
        _text(created_by, "created_by", ACTOR_LEN, optional=True)

        def check(session: Session) -> tuple[BaseModelRow, PromptSetRow]:
            model = self._base_model_row(session, base_model)
            ps = self._prompt_set_row(session, prompt_set)
            if stats.fingerprint is not None and stats.fingerprint != model.fingerprint:
                raise ConflictError(
                    f"statistics are for base model {_short(stats.fingerprint)}, not {_short(model.fingerprint)}"
                )
            if (stats.num_target_prompts, stats.num_reference_prompts) != (
                len(ps.target_prompts),
                len(ps.reference_prompts),
            ):
                raise ConflictError(
                    f"statistics cover {stats.num_target_prompts}/{stats.num_reference_prompts} target/reference "
                    f"prompts, prompt set {ps.content_hash[:12]} has "
                    f"{len(ps.target_prompts)}/{len(ps.reference_prompts)}"
                )
            return model, ps

        self._read(check)
        data = stats_to_bytes(stats)
        oid = self.store.put(data)
        config = stats.config

        def write(session: Session) -> Calibration:
            model, ps = check(session)
            row = session.scalars(
                select(CalibrationRow).where(
                    CalibrationRow.base_model_id == model.id,
                    CalibrationRow.prompt_set_id == ps.id,
                    CalibrationRow.stats_oid == oid,
                )
            ).one_or_none()
            if row is not None:
                return self._calibration_entity(session, row)
            self._ensure_object(session, oid, data)
            row = CalibrationRow(
                base_model_id=model.id,
                prompt_set_id=ps.id,
                seed=config.seed,
                steps=config.num_inference_steps,
                guidance=float(config.guidance_scale),
                tau=config.tau,
                hook=config.hook.value,
                component=stats.component,
                config=config.to_dict(),
                dtype=dtype,
                device=device,
                library_versions=library_versions,
                duration_s=float(duration_s),
                stats_oid=oid,
                dvc_stage=dvc_stage,
                git_rev=git_rev,
                created_by=created_by or self.actor,
            )
            session.add(row)
            session.flush()
            self._event(
                session,
                created_by,
                "calibration.add",
                f"calibration:{row.id}",
                {"base_model": model.fingerprint, "prompt_set": ps.content_hash, "stats_oid": oid},
            )
            return self._calibration_entity(session, row)

        return self._write(write)

    def get_calibration(self, calibration_id: int) -> Calibration:
        """The calibration with this id (:class:`NotFoundError` if unknown)."""
        return self._read(lambda s: self._calibration_entity(s, self._calibration_row(s, calibration_id)))

    def list_calibrations(self, base_model: BaseModelArg | None = None) -> list[Calibration]:
        """Calibrations, oldest first, optionally of one base model."""

        def read(session: Session) -> list[Calibration]:
            query = select(CalibrationRow).order_by(CalibrationRow.id)
            if base_model is not None:
                query = query.where(CalibrationRow.base_model_id == self._base_model_row(session, base_model).id)
            return [self._calibration_entity(session, row) for row in session.scalars(query)]

        return self._read(read)

    def load_stats(self, calibration: Calibration | int) -> ActivationStats:
        """The statistics of a calibration, read back verified from the store."""
        oid = self._read(lambda s: self._calibration_row(s, calibration).stats_oid)
        return stats_from_bytes(self.store.get(oid))

    # ------------------------------------------------------------------ masks

    def add_mask(
        self,
        concept: Concept | str,
        mask: ConceptMask,
        base_model: BaseModelArg,
        calibration: Calibration | int | None = None,
        *,
        description: str = "",
        tags: Iterable[str] = (),
        created_by: str | None = None,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
        reuse_existing: bool = False,
    ) -> Mask:
        """Store ``mask`` as the next version of ``concept`` on ``base_model``.

        The mask's fingerprint must be the base model's (and the calibration's base model, when
        given). The object is stored before the row is committed. With ``reuse_existing`` an
        existing version with the same content (same object id) is returned instead.

        Example:
            >>> reg.add_mask("nudity", mask, model, cal, tags=["paper"]).ref
            'nudity@4'
        """
        if not isinstance(mask, ConceptMask):
            raise RegistryError(f"mask must be a ConceptMask, got {type(mask).__name__}")
        tags = validate_tags(tags)
        _text(description, "description")
        _text(dvc_stage, "dvc_stage", 256, optional=True)
        _text(git_rev, "git_rev", 64, optional=True)
        _text(created_by, "created_by", ACTOR_LEN, optional=True)

        def check(session: Session) -> tuple[ConceptRow, BaseModelRow, CalibrationRow | None]:
            concept_row = self._concept_row(session, concept)
            model = self._base_model_row(session, base_model)
            if mask.fingerprint != model.fingerprint:
                raise ConflictError(
                    f"the mask is for base model {mask.fingerprint!r}, not {_short(model.fingerprint)!r}"
                )
            cal = None
            if calibration is not None:
                cal = self._calibration_row(session, calibration)
                if cal.base_model_id != model.id:
                    raise ConflictError(f"calibration {cal.id} is of another base model")
                if cal.hook != mask.hook:
                    raise ConflictError(f"calibration {cal.id} hooked {cal.hook!r}, the mask is for {mask.hook!r}")
            return concept_row, model, cal

        self._read(check)
        data = mask_to_bytes(mask)
        oid = self.store.put(data)
        params = dict(mask.params)

        def number(key: str, kind: type) -> Any:
            value = params.get(key)
            return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        def write(session: Session) -> Mask:
            concept_row, model, cal = check(session)
            if reuse_existing:
                existing = session.scalars(
                    select(MaskRow)
                    .where(
                        MaskRow.concept_id == concept_row.id,
                        MaskRow.base_model_id == model.id,
                        MaskRow.artifact_oid == oid,
                    )
                    .order_by(MaskRow.version)
                    .limit(1)
                ).first()
                if existing is not None:
                    return self._mask_entity(session, existing)
            self._ensure_object(session, oid, data)
            version = self._next_version(session, concept_row.id, model.id)
            row = MaskRow(
                concept_id=concept_row.id,
                base_model_id=model.id,
                calibration_id=cal.id if cal is not None else None,
                version=version,
                skill_ratio=number("skill_ratio", float),
                tau=number("tau", int),
                select_ratio=number("select_ratio", float),
                hook=mask.hook,
                component=mask.component,
                artifact_oid=oid,
                masked_total=mask.num_masked,
                masked_per_layer=mask.counts(),
                component_params=mask.component_params,
                params=params,
                created_by=created_by or self.actor,
                description=description,
                tags=list(tags),
                dvc_stage=dvc_stage,
                git_rev=git_rev,
            )
            session.add(row)
            session.flush()
            self._event(
                session,
                created_by,
                "mask.add",
                f"mask:{concept_row.name}@{version}",
                {
                    "base_model": model.fingerprint,
                    "oid": oid,
                    "masked": mask.num_masked,
                    "calibration": row.calibration_id,
                },
            )
            return self._mask_entity(session, row)

        return self._write(write)

    @staticmethod
    def _next_version(session: Session, concept_id: int, base_model_id: int) -> int:
        """Next version of (concept, base model): above every version ever given, deleted ones too."""
        counter = session.scalars(
            select(MaskVersionCounterRow)
            .where(
                MaskVersionCounterRow.concept_id == concept_id,
                MaskVersionCounterRow.base_model_id == base_model_id,
            )
            .with_for_update()
        ).one_or_none()
        highest = session.scalar(
            select(func.max(MaskRow.version)).where(
                MaskRow.concept_id == concept_id, MaskRow.base_model_id == base_model_id
            )
        )
        version = max(highest or 0, counter.last_version if counter is not None else 0) + 1
        if counter is None:
            session.add(MaskVersionCounterRow(concept_id=concept_id, base_model_id=base_model_id, last_version=version))
        else:
            counter.last_version = version
        return version

    def resolve_mask(self, ref: MaskArg, base_model: BaseModelArg | None = None) -> Mask:
        """The mask ``ref`` names: ``concept`` (latest), ``concept@N``, ``concept@alias``.

        Raises :class:`AmbiguousRefError` when the concept has masks on several base models and
        no ``base_model`` fingerprint narrows it down.

        Example:
            >>> reg.resolve_mask("nudity@prod").version
            3
        """
        return self._read(lambda s: self._mask_entity(s, self._mask_row(s, ref, base_model)))

    def load_mask(self, ref: MaskArg, base_model: BaseModelArg | None = None) -> ConceptMask:
        """The content of a mask, read back verified from the store.

        Example:
            >>> reg.load_mask("nudity@3").num_masked
        """
        oid = ref.artifact_oid if isinstance(ref, Mask) else self.resolve_mask(ref, base_model).artifact_oid
        return mask_from_bytes(self.store.get(oid))

    def list_masks(
        self,
        concept: Concept | str | None = None,
        *,
        base_model: BaseModelArg | None = None,
        tag: str | None = None,
    ) -> list[Mask]:
        """Masks by concept name, base model and version; optionally filtered."""

        def read(session: Session) -> list[Mask]:
            query = select(MaskRow).join(ConceptRow, ConceptRow.id == MaskRow.concept_id)
            if concept is not None:
                query = query.where(MaskRow.concept_id == self._concept_row(session, concept).id)
            if base_model is not None:
                query = query.where(MaskRow.base_model_id == self._base_model_row(session, base_model).id)
            rows = list(session.scalars(query.order_by(ConceptRow.name, MaskRow.base_model_id, MaskRow.version)))
            if tag is not None:
                rows = [row for row in rows if tag in row.tags]
            return self._mask_entities(session, rows)

        return self._read(read)

    def tag_mask(
        self,
        ref: MaskArg,
        tags: Iterable[str],
        *,
        remove: Iterable[str] = (),
        base_model: BaseModelArg | None = None,
        created_by: str | None = None,
    ) -> Mask:
        """Add ``tags`` to a mask and drop ``remove`` (tags are metadata: they may change).

        Example:
            >>> reg.tag_mask("nudity@3", ["paper", "reviewed"], remove=["draft"]).tags
            ('paper', 'reviewed')
        """
        add = validate_tags(tags)
        drop = validate_tags(remove)

        def write(session: Session) -> Mask:
            row = self._mask_row(session, ref, base_model)
            before = list(row.tags)
            after = sorted((set(before) | set(add)) - set(drop))
            if after != before:
                row.tags = after
                concept = session.get(ConceptRow, row.concept_id).name
                self._event(
                    session, created_by, "mask.tag", f"mask:{concept}@{row.version}", {"before": before, "after": after}
                )
                session.flush()
            return self._mask_entity(session, row)

        return self._write(write)

    def set_alias(
        self,
        ref: MaskArg,
        alias: str,
        *,
        base_model: BaseModelArg | None = None,
        created_by: str | None = None,
    ) -> Alias:
        """Point ``concept@alias`` at the mask ``ref`` names, moving the alias if it exists.

        Aliases are per (concept, base model). Alias names are never all digits nor ``latest``.

        Example:
            >>> reg.set_alias("nudity@4", "prod").mask_version
            4
        """
        validate_alias(alias)

        def write(session: Session) -> Alias:
            mask = self._mask_row(session, ref, base_model)
            concept = session.get(ConceptRow, mask.concept_id).name
            row = session.scalars(
                select(AliasRow).where(
                    AliasRow.concept_id == mask.concept_id,
                    AliasRow.base_model_id == mask.base_model_id,
                    AliasRow.name == alias,
                )
            ).one_or_none()
            if row is None:
                row = AliasRow(
                    concept_id=mask.concept_id, base_model_id=mask.base_model_id, name=alias, mask_id=mask.id
                )
                session.add(row)
                self._event(session, created_by, "alias.set", f"alias:{concept}@{alias}", {"to": mask.version})
            elif row.mask_id != mask.id:
                previous = session.get(MaskRow, row.mask_id).version
                row.mask_id = mask.id
                row.updated_at = datetime.now(timezone.utc)
                self._event(
                    session,
                    created_by,
                    "alias.move",
                    f"alias:{concept}@{alias}",
                    {"from": previous, "to": mask.version},
                )
            session.flush()
            return self._alias_entity(session, row)

        return self._write(write)

    def remove_alias(self, ref: str, *, base_model: BaseModelArg | None = None, created_by: str | None = None) -> Alias:
        """Remove the alias ``concept@alias``; return what it was.

        Example:
            >>> reg.remove_alias("nudity@staging")
        """
        parsed = parse_ref(ref)
        if parsed.alias is None:
            raise InvalidNameError(f"{ref!r} is not an alias reference (concept@alias)")

        def write(session: Session) -> Alias:
            concept = self._concept_row(session, parsed.name)
            model = self._model_filter(session, base_model)
            query = select(AliasRow).where(AliasRow.concept_id == concept.id, AliasRow.name == parsed.alias)
            if model is not None:
                query = query.where(AliasRow.base_model_id == model.id)
            row = self._one_model(session, list(session.scalars(query)), f"no alias {ref!r}", model)
            entity = self._alias_entity(session, row)
            session.delete(row)
            self._event(session, created_by, "alias.remove", f"alias:{ref}", {"was": entity.mask_version})
            return entity

        return self._write(write)

    def list_aliases(self, concept: Concept | str | None = None) -> list[Alias]:
        """Aliases by concept and name."""

        def read(session: Session) -> list[Alias]:
            query = select(AliasRow).join(ConceptRow, ConceptRow.id == AliasRow.concept_id)
            if concept is not None:
                query = query.where(AliasRow.concept_id == self._concept_row(session, concept).id)
            rows = session.scalars(query.order_by(ConceptRow.name, AliasRow.name, AliasRow.base_model_id))
            return [self._alias_entity(session, row) for row in rows]

        return self._read(read)

    def delete_mask(
        self, ref: MaskArg, *, base_model: BaseModelArg | None = None, created_by: str | None = None
    ) -> Mask:
        """Delete a mask version no release uses and no alias points to; return it.

        The object stays in the store until :meth:`gc`. The version number is never reused.

        Example:
            >>> reg.delete_mask("nudity@2")
        """

        def write(session: Session) -> Mask:
            row = self._mask_row(session, ref, base_model)
            entity = self._mask_entity(session, row)
            releases = session.execute(
                select(ReleaseRow.name, ReleaseRow.version)
                .join(ReleaseMemberRow, ReleaseMemberRow.release_id == ReleaseRow.id)
                .where(ReleaseMemberRow.mask_id == row.id)
                .order_by(ReleaseRow.name, ReleaseRow.version)
            ).all()
            if releases:
                names = ", ".join(f"{name}@{version}" for name, version in releases)
                raise InUseError(f"mask {entity.ref} is used by release {names} and cannot be deleted")
            if entity.aliases:
                raise InUseError(
                    f"mask {entity.ref} is the target of alias {', '.join(entity.aliases)}: move or remove it first"
                )
            session.delete(row)
            self._event(
                session,
                created_by,
                "mask.delete",
                f"mask:{entity.ref}",
                {"base_model": entity.base_model_fingerprint, "oid": entity.artifact_oid},
            )
            return entity

        return self._write(write)

    # ------------------------------------------------------------------ releases

    def compose(
        self,
        name: str,
        refs: Sequence[MaskArg],
        notes: str = "",
        *,
        base_model: BaseModelArg | None = None,
        created_by: str | None = None,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
    ) -> Release:
        """Store the union of the masks ``refs`` name as the next version of release ``name``.

        All members must share base model, hook point, component and layers; otherwise
        :class:`IncompatibleMasksError` names the odd one and nothing is stored. The union does
        not depend on the order of ``refs`` (same members: same ``union_oid``). ``dvc_stage``
        and ``git_rev`` record which pipeline stage and commit made it (``cpreg release`` sets them).

        Example:
            >>> reg.compose("safe-v1", ["nudity@prod", "van-gogh@2"], notes="Q3 release").ref
            'safe-v1@1'
        """
        validate_name(name, "release name")
        _text(notes, "notes")
        _text(created_by, "created_by", ACTOR_LEN, optional=True)
        _text(dvc_stage, "dvc_stage", 256, optional=True)
        _text(git_rev, "git_rev", 64, optional=True)
        if isinstance(refs, (str, Mask)):
            refs = [refs]
        refs = list(refs)
        if not refs:
            raise RegistryError("compose needs at least one mask")
        labels = [ref.ref if isinstance(ref, Mask) else str(ref) for ref in refs]

        def check(session: Session) -> list[MaskRow]:
            if self._concept_exists(session, name):
                raise ConflictError(f"release name {name!r} is already the name of a concept")
            rows: list[MaskRow] = []
            for ref in refs:
                rows.append(self._mask_row(session, ref, base_model))
            return rows

        members = self._read(lambda s: self._mask_entities(s, check(s)))
        first = members[0]
        for member, label in zip(members[1:], labels[1:], strict=True):
            if member.base_model_fingerprint != first.base_model_fingerprint:
                raise IncompatibleMasksError(
                    f"{label} is for base model {_short(member.base_model_fingerprint)}, "
                    f"{labels[0]} for {_short(first.base_model_fingerprint)}"
                )
            if member.hook != first.hook:
                raise IncompatibleMasksError(f"{label} has hook {member.hook!r}, {labels[0]} has {first.hook!r}")
        unique: dict[int, tuple[Mask, str]] = {}
        for member, label in zip(members, labels, strict=True):
            unique.setdefault(member.id, (member, label))
        masks = [self.load_mask(member) for member, _ in unique.values()]
        try:
            merged = union(masks, [label for _, label in unique.values()])
        except ValueError as exc:
            raise IncompatibleMasksError(f"cannot compose {name}: {exc}") from exc
        data = mask_to_bytes(merged)
        oid = self.store.put(data)
        member_ids = list(unique)

        def write(session: Session) -> Release:
            if self._concept_exists(session, name):
                raise ConflictError(f"release name {name!r} is already the name of a concept")
            for mask_id, (member, _) in unique.items():
                if session.get(MaskRow, mask_id) is None:
                    raise NotFoundError(f"mask {member.ref} was deleted meanwhile")
            self._ensure_object(session, oid, data)
            version = (session.scalar(select(func.max(ReleaseRow.version)).where(ReleaseRow.name == name)) or 0) + 1
            row = ReleaseRow(
                name=name,
                version=version,
                base_model_id=first.base_model_id,
                hook=first.hook,
                union_oid=oid,
                masked_total=merged.num_masked,
                notes=notes,
                created_by=created_by or self.actor,
                dvc_stage=dvc_stage,
                git_rev=git_rev,
            )
            session.add(row)
            session.flush()
            for position, mask_id in enumerate(member_ids):
                session.add(ReleaseMemberRow(release_id=row.id, mask_id=mask_id, position=position))
            session.flush()
            self._event(
                session,
                created_by,
                "release.compose",
                f"release:{name}@{version}",
                {"members": [member.ref for member, _ in unique.values()], "oid": oid, "masked": merged.num_masked},
            )
            return self._release_entity(session, row)

        return self._write(write)

    def resolve_release(self, ref: ReleaseArg, base_model: BaseModelArg | None = None) -> Release:
        """The release ``ref`` names: ``name`` (latest version) or ``name@N``.

        Example:
            >>> reg.resolve_release("safe-v1").members
            ('nudity@3', 'van-gogh@2')
        """
        return self._read(lambda s: self._release_entity(s, self._release_row(s, ref, base_model)))

    def load_release_mask(self, release: ReleaseArg) -> ConceptMask:
        """The union mask of a release, read back verified from the store."""
        oid = release.union_oid if isinstance(release, Release) else self.resolve_release(release).union_oid
        return mask_from_bytes(self.store.get(oid))

    def release_members(self, release: ReleaseArg) -> list[Mask]:
        """The member masks of a release, in compose order (unambiguous across base models).

        Example:
            >>> [mask.ref for mask in reg.release_members("safe-v1@2")]
            ['nudity@3', 'van-gogh@2']
        """

        def read(session: Session) -> list[Mask]:
            row = self._release_row(session, release)
            rows = session.scalars(
                select(MaskRow)
                .join(ReleaseMemberRow, ReleaseMemberRow.mask_id == MaskRow.id)
                .where(ReleaseMemberRow.release_id == row.id)
                .order_by(ReleaseMemberRow.position)
            )
            return self._mask_entities(session, list(rows))

        return self._read(read)

    def list_releases(self, name: str | None = None) -> list[Release]:
        """Releases by name and version, optionally only those called ``name``."""

        def read(session: Session) -> list[Release]:
            query = select(ReleaseRow).order_by(ReleaseRow.name, ReleaseRow.version)
            if name is not None:
                query = query.where(ReleaseRow.name == validate_name(name, "release name"))
            return self._release_entities(session, list(session.scalars(query)))

        return self._read(read)

    # ------------------------------------------------------------------ any ref

    def resolve(self, ref: Mask | Release | str, base_model: BaseModelArg | None = None) -> Mask | Release:
        """A mask (``concept[@N|@alias]``) or a release (``name[@N]``), whichever ``ref`` names.

        Example:
            >>> reg.resolve("safe-v1@2")
            Release(name='safe-v1', version=2, ...)
        """
        if isinstance(ref, (Mask, Release)):
            return ref
        parsed: Ref = parse_ref(ref)

        def read(session: Session) -> Mask | Release:
            is_concept = self._concept_exists(session, parsed.name)
            is_release = self._release_exists(session, parsed.name)
            if is_concept and is_release:
                raise AmbiguousRefError(f"{parsed.name!r} is both a concept and a release")
            if is_release:
                return self._release_entity(session, self._release_row(session, ref, base_model))
            if is_concept:
                return self._mask_entity(session, self._mask_row(session, ref, base_model))
            raise NotFoundError(f"unknown concept or release {parsed.name!r}")

        return self._read(read)

    def load(self, ref: Mask | Release | str, base_model: BaseModelArg | None = None) -> ConceptMask:
        """The mask content of a mask or release reference (see :meth:`resolve`)."""
        target = self.resolve(ref, base_model)
        return self.load_mask(target) if isinstance(target, Mask) else self.load_release_mask(target)

    def diff(
        self, ref_a: Mask | Release | str, ref_b: Mask | Release | str, base_model: BaseModelArg | None = None
    ) -> dict:
        """Overlap of two masks or releases: per-layer and total counts, intersection and IoU.

        Example:
            >>> reg.diff("nudity@2", "nudity@3")["iou"]
            0.91
        """
        a, b = self.resolve(ref_a, base_model), self.resolve(ref_b, base_model)
        mask_a, mask_b = self.load(a), self.load(b)
        label_a, label_b = a.ref, b.ref
        try:
            check_compatible([mask_a, mask_b], [label_a, label_b])
        except ValueError as exc:
            raise IncompatibleMasksError(f"cannot compare: {exc}") from exc
        return {"ref_a": label_a, "ref_b": label_b, **overlap(mask_a, mask_b)}

    # ------------------------------------------------------------------ audit and housekeeping

    def events(self, limit: int | None = None) -> list[Event]:
        """The audit log, newest first."""

        def read(session: Session) -> list[Event]:
            query = select(EventRow).order_by(EventRow.id.desc())
            if limit is not None:
                query = query.limit(limit)
            return [
                Event(row.id, _utc(row.at), row.actor, row.action, row.subject, dict(row.details))
                for row in session.scalars(query)
            ]

        return self._read(read)

    @staticmethod
    def _references(session: Session) -> dict[str, list[str]]:
        """Object id -> what rows point to it (``mask nudity@3``, ``release safe-v1@1``...)."""
        found: dict[str, list[str]] = {}
        for oid, concept, version, fingerprint in session.execute(
            select(MaskRow.artifact_oid, ConceptRow.name, MaskRow.version, BaseModelRow.fingerprint)
            .join(ConceptRow, ConceptRow.id == MaskRow.concept_id)
            .join(BaseModelRow, BaseModelRow.id == MaskRow.base_model_id)
        ):
            found.setdefault(oid, []).append(f"mask {concept}@{version} ({_short(fingerprint)})")
        for oid, name, version in session.execute(select(ReleaseRow.union_oid, ReleaseRow.name, ReleaseRow.version)):
            found.setdefault(oid, []).append(f"release {name}@{version}")
        for oid, cal_id in session.execute(select(CalibrationRow.stats_oid, CalibrationRow.id)):
            found.setdefault(oid, []).append(f"calibration {cal_id}")
        return found

    def referenced_objects(self) -> set[str]:
        """Ids of every object a row points to (masks, release unions, calibration statistics)."""
        return set(self._read(self._references))

    def gc(self, dry_run: bool = True, *, created_by: str | None = None) -> list[str]:
        """Objects of the store no row points to; deleted only when ``dry_run`` is False.

        The deleting pass runs in a write transaction that excludes writers (SQLite: the write
        lock; PostgreSQL: an exclusive advisory lock writers take shared), and writers check
        their object again under that lock, so gc never leaves a row pointing to a deleted
        object, even with writers running.

        Example:
            >>> reg.gc()                 # what would go
            >>> reg.gc(dry_run=False)    # delete it
        """
        if dry_run:
            referenced = self.referenced_objects()
            return [oid for oid in self.store.ids() if oid not in referenced]

        def write(session: Session) -> list[str]:
            self._object_lock(session, exclusive=True)
            referenced = self._references(session)
            garbage = [oid for oid in self.store.ids() if oid not in referenced]
            if garbage:
                self._event(session, created_by, "gc", "store", {"deleted": len(garbage), "oids": garbage})
                session.flush()
            for oid in garbage:
                self.store.delete(oid)
            return garbage

        return self._write(write)

    def verify(self) -> list[tuple[str, str]]:
        """Problems of the store (``store.verify()``) plus rows pointing to missing objects.

        Returns ``(object id or path, problem)`` pairs; empty when all is sound.
        """
        problems = list(self.store.verify())
        for oid, users in sorted(self._read(self._references).items()):
            if not self.store.exists(oid):
                problems.append((oid, f"object {oid} is missing, referenced by {', '.join(users)}"))
        return problems

    def counts(self) -> dict[str, int]:
        """Number of rows per table (for status displays and tests)."""
        tables = {
            "base_models": BaseModelRow,
            "concepts": ConceptRow,
            "prompt_sets": PromptSetRow,
            "calibrations": CalibrationRow,
            "masks": MaskRow,
            "aliases": AliasRow,
            "releases": ReleaseRow,
            "release_members": ReleaseMemberRow,
            "events": EventRow,
        }
        return self._read(
            lambda s: {name: s.scalar(select(func.count()).select_from(row)) for name, row in tables.items()}
        )


__all__ = ["Registry", "prompt_set_hash"]
