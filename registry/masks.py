"""Mask versions, their tags and aliases.

Part of :class:`~cpreg.registry.Registry` (a mixin: it uses the registry's store, actor and
transactions). A mask version is immutable: its content is an object of the store, its number
counts per (concept, base model) and is never given twice, deleted versions included. Tags and
aliases are metadata and may change.

Example:
    >>> reg.add_mask("nudity", mask, model, calibration).ref
    'nudity@4'
    >>> reg.get_or_add_mask("nudity", mask, model, calibration)[0].ref   # same content: reused
    'nudity@4'
    >>> reg.set_alias("nudity@4", "prod").ref
    'nudity@prod'
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .. import artifacts, editors
from ..artifacts import ObjectStore
from .entities import Alias, Calibration, Concept, Mask
from .errors import ConflictError, InUseError, InvalidNameError, RegistryError
from .orm import (
    AliasRow,
    BaseModelRow,
    CalibrationRow,
    ConceptRow,
    MaskRow,
    MaskVersionCounterRow,
    ReleaseMemberRow,
    ReleaseRow,
    select_entities,
)
from .refs import parse_ref, validate_alias, validate_tags
from .resolution import (
    BaseModelArg,
    MaskArg,
    alias_row,
    base_model_filter,
    base_model_row,
    calibration_row,
    concept_row,
    mask_row,
    short_fingerprint,
)
from .session import Transactions, keep_object
from .validation import validate_provenance, validate_text

if TYPE_CHECKING:  # the engine imports torch: only for type hints here
    from ..editors import ConceptMask


class MaskDetails(TypedDict, total=False):
    """Optional fields of a new mask version: free text, tags and who or what made it."""

    description: str
    tags: Iterable[str]
    created_by: str | None
    dvc_stage: str | None
    git_rev: str | None


class MaskMixin:
    """Mask versions, tags and aliases of a :class:`~cpreg.registry.Registry`."""

    store: ObjectStore
    actor: str
    _tx: Transactions

    def add_mask(
        self,
        concept: Concept | str,
        mask: ConceptMask,
        base_model: BaseModelArg,
        calibration: Calibration | int | None = None,
        *,
        reuse_existing: bool = False,
        **details: Unpack[MaskDetails],
    ) -> Mask:
        """Store ``mask`` as the next version of ``concept`` on ``base_model``.

        The mask's fingerprint must be the base model's (and the calibration's base model, when
        given). The object is stored before the row is committed. With ``reuse_existing`` an
        existing version with the same content is returned instead (:meth:`get_or_add_mask`).
        ``details``: see :class:`MaskDetails`.

        Example:
            >>> reg.add_mask("nudity", mask, model, cal, tags=["paper"]).ref
            'nudity@4'
        """
        return self._add_mask(concept, mask, base_model, calibration, reuse=reuse_existing, **details)[0]

    def get_or_add_mask(
        self,
        concept: Concept | str,
        mask: ConceptMask,
        base_model: BaseModelArg,
        calibration: Calibration | int | None = None,
        **details: Unpack[MaskDetails],
    ) -> tuple[Mask, bool]:
        """``(mask, created)``: the oldest version of ``concept`` on ``base_model`` with this
        content (same object id: same layers, steps and parameters), else a new version.

        An existing version is returned as it is (its own description, tags and provenance)
        and nothing is written: no row, no event (the reuse rule, docs/data-model.md).

        Example:
            >>> reg.get_or_add_mask("nudity", mask, model, cal)
            (Mask(concept='nudity', version=4, ...), True)
            >>> reg.get_or_add_mask("nudity", mask, model, cal)[1]
            False
        """
        return self._add_mask(concept, mask, base_model, calibration, reuse=True, **details)

    def _add_mask(
        self,
        concept: Concept | str,
        mask: ConceptMask,
        base_model: BaseModelArg,
        calibration: Calibration | int | None,
        *,
        reuse: bool,
        description: str = "",
        tags: Iterable[str] = (),
        created_by: str | None = None,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
    ) -> tuple[Mask, bool]:
        """:meth:`get_or_add_mask` (``reuse``), else a new version whatever exists."""
        if not isinstance(mask, editors.ConceptMask):
            raise RegistryError(f"mask must be a ConceptMask, got {type(mask).__name__}")
        tags = validate_tags(tags)
        validate_text(description, MaskRow.description)
        validate_provenance(MaskRow, created_by, dvc_stage, git_rev)

        def check(session: Session) -> tuple[ConceptRow, BaseModelRow, CalibrationRow | None]:
            concept_ = concept_row(session, concept)
            model = base_model_row(session, base_model)
            if mask.fingerprint != model.fingerprint:
                raise ConflictError(
                    f"the mask is for base model {mask.fingerprint!r}, not {short_fingerprint(model.fingerprint)!r}"
                )
            cal = None
            if calibration is not None:
                cal = calibration_row(session, calibration)
                if cal.base_model_id != model.id:
                    raise ConflictError(f"calibration {cal.id} is of another base model")
                if cal.hook != mask.hook:
                    raise ConflictError(f"calibration {cal.id} hooked {cal.hook!r}, the mask is for {mask.hook!r}")
            return concept_, model, cal

        self._tx.read(check)
        data = artifacts.mask_to_bytes(mask)
        oid = self.store.put(data)
        params = dict(mask.params)

        def number(key: str, kind: type) -> Any:
            value = params.get(key)
            return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        def write(session: Session) -> tuple[Mask, bool]:
            concept_, model, cal = check(session)
            if reuse:
                existing = session.scalars(
                    select(MaskRow)
                    .where(
                        MaskRow.concept_id == concept_.id,
                        MaskRow.base_model_id == model.id,
                        MaskRow.artifact_oid == oid,
                    )
                    .order_by(MaskRow.version)
                    .limit(1)
                ).first()
                if existing is not None:
                    return existing.to_entity(), False
            keep_object(session, self.store, oid, data)
            row = MaskRow(
                concept=concept_,
                base_model=model,
                calibration_id=cal.id if cal is not None else None,
                version=self._next_version(session, concept_.id, model.id),
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
            details = {
                "base_model": model.fingerprint,
                "oid": oid,
                "masked": mask.num_masked,
                "calibration": row.calibration_id,
            }
            self._tx.event(session, created_by, "mask.add", f"mask:{row.ref}", details)
            return row.to_entity(), True

        return self._tx.write(write)

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
        return self._tx.read(lambda s: mask_row(s, ref, base_model).to_entity())

    def load_mask(self, ref: MaskArg, base_model: BaseModelArg | None = None) -> ConceptMask:
        """The content of a mask, read back verified from the store.

        Example:
            >>> reg.load_mask("nudity@3").num_masked
        """
        oid = ref.artifact_oid if isinstance(ref, Mask) else self.resolve_mask(ref, base_model).artifact_oid
        return artifacts.mask_from_bytes(self.store.get(oid))

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
                query = query.where(MaskRow.concept_id == concept_row(session, concept).id)
            if base_model is not None:
                query = query.where(MaskRow.base_model_id == base_model_row(session, base_model).id)
            rows = session.scalars(query.order_by(ConceptRow.name, MaskRow.base_model_id, MaskRow.version))
            return [row.to_entity() for row in rows if tag is None or tag in row.tags]

        return self._tx.read(read)

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
            row = mask_row(session, ref, base_model)
            before = list(row.tags)
            after = sorted((set(before) | set(add)) - set(drop))
            if after != before:
                row.tags = after
                self._tx.event(session, created_by, "mask.tag", f"mask:{row.ref}", {"before": before, "after": after})
                session.flush()
            return row.to_entity()

        return self._tx.write(write)

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
            mask = mask_row(session, ref, base_model)
            subject = f"alias:{mask.concept.name}@{alias}"
            row = session.scalars(
                select(AliasRow).where(
                    AliasRow.concept_id == mask.concept_id,
                    AliasRow.base_model_id == mask.base_model_id,
                    AliasRow.name == alias,
                )
            ).one_or_none()
            if row is None:
                row = AliasRow(concept=mask.concept, base_model=mask.base_model, name=alias, mask=mask)
                session.add(row)
                self._tx.event(session, created_by, "alias.set", subject, {"to": mask.version})
            elif row.mask_id != mask.id:
                details = {"from": row.mask.version, "to": mask.version}
                row.mask = mask
                row.updated_at = datetime.now(timezone.utc)
                self._tx.event(session, created_by, "alias.move", subject, details)
            session.flush()
            return row.to_entity()

        return self._tx.write(write)

    def remove_alias(self, ref: str, *, base_model: BaseModelArg | None = None, created_by: str | None = None) -> Alias:
        """Remove the alias ``concept@alias``; return what it was.

        Example:
            >>> reg.remove_alias("nudity@staging")
        """
        parsed = parse_ref(ref)
        if parsed.alias is None:
            raise InvalidNameError(f"{ref!r} is not an alias reference (concept@alias)")

        def write(session: Session) -> Alias:
            concept = concept_row(session, parsed.name)
            row = alias_row(session, concept, parsed.alias, base_model_filter(session, base_model), f"no alias {ref!r}")
            entity = row.to_entity()
            session.delete(row)
            self._tx.event(session, created_by, "alias.remove", f"alias:{ref}", {"was": entity.mask_version})
            return entity

        return self._tx.write(write)

    def list_aliases(self, concept: Concept | str | None = None) -> list[Alias]:
        """Aliases by concept and name."""

        def read(session: Session) -> list[Alias]:
            query = select(AliasRow).join(ConceptRow, ConceptRow.id == AliasRow.concept_id)
            if concept is not None:
                query = query.where(AliasRow.concept_id == concept_row(session, concept).id)
            return select_entities(session, query.order_by(ConceptRow.name, AliasRow.name, AliasRow.base_model_id))

        return self._tx.read(read)

    def delete_mask(
        self, ref: MaskArg, *, base_model: BaseModelArg | None = None, created_by: str | None = None
    ) -> Mask:
        """Delete a mask version no release uses and no alias points to; return it.

        The object stays in the store until :meth:`gc`. The version number is never reused.

        Example:
            >>> reg.delete_mask("nudity@2")
        """

        def write(session: Session) -> Mask:
            row = mask_row(session, ref, base_model)
            entity = row.to_entity()
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
            details = {"base_model": entity.base_model_fingerprint, "oid": entity.artifact_oid}
            self._tx.event(session, created_by, "mask.delete", f"mask:{entity.ref}", details)
            return entity

        return self._tx.write(write)
