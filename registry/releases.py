"""Releases: immutable, numbered unions of mask versions of one base model.

Part of :class:`~cpreg.registry.Registry` (a mixin: it uses the registry's store, actor and
transactions). The union is computed here, once per compose, from the members' stored objects
(:func:`cpreg.editors.union`, order-independent); callers that need its bytes read them back
from the store by ``union_oid``.

Example:
    >>> reg.compose("safe-v1", ["nudity@prod", "van-gogh"]).ref
    'safe-v1@1'
    >>> reg.get_or_compose("safe-v1", ["van-gogh", "nudity@prod"])   # same members: the latest
    (Release(name='safe-v1', version=1, ...), False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict, Unpack

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import artifacts, editors
from ..artifacts import ObjectStore
from .entities import Mask, Release
from .errors import ConflictError, IncompatibleMasksError, NotFoundError, RegistryError
from .orm import MaskRow, ReleaseMemberRow, ReleaseRow, select_entities
from .refs import validate_name
from .resolution import (
    BaseModelArg,
    MaskArg,
    ReleaseArg,
    concept_exists,
    latest_release_row,
    mask_row,
    release_row,
    short_fingerprint,
)
from .session import Transactions, keep_object
from .validation import validate_provenance, validate_text

if TYPE_CHECKING:  # the engine imports torch: only for type hints here
    from ..editors import ConceptMask


class ReleaseDetails(TypedDict, total=False):
    """Optional fields of a new release version: the base model to pick members on, who or what made it."""

    base_model: BaseModelArg | None
    created_by: str | None
    dvc_stage: str | None
    git_rev: str | None


class ReleaseMixin:
    """Releases of a :class:`~cpreg.registry.Registry`."""

    store: ObjectStore
    actor: str
    _tx: Transactions

    def compose(
        self, name: str, refs: Sequence[MaskArg], notes: str = "", **details: Unpack[ReleaseDetails]
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
        return self._compose(name, refs, notes, reuse_latest=False, **details)[0]

    def get_or_compose(
        self, name: str, refs: Sequence[MaskArg], notes: str = "", **details: Unpack[ReleaseDetails]
    ) -> tuple[Release, bool]:
        """``(release, created)``: the latest version of ``name`` when it has exactly these
        members (hence the same union), else a new version as :meth:`compose` makes it.

        An existing version is returned as it is (its own notes and provenance) and nothing is
        written: no row, no event (the reuse rule, docs/data-model.md). Only the latest version
        counts: going back to an older version's members makes a new version.

        Example:
            >>> reg.get_or_compose("safe-v1", ["nudity@3", "van-gogh@2"])
            (Release(name='safe-v1', version=2, ...), False)
        """
        return self._compose(name, refs, notes, reuse_latest=True, **details)

    def _compose(
        self,
        name: str,
        refs: Sequence[MaskArg],
        notes: str,
        *,
        reuse_latest: bool,
        base_model: BaseModelArg | None = None,
        created_by: str | None = None,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
    ) -> tuple[Release, bool]:
        """:meth:`get_or_compose` (``reuse_latest``), else a new version whatever exists."""
        validate_name(name, "release name")
        validate_text(notes, ReleaseRow.notes)
        validate_provenance(ReleaseRow, created_by, dvc_stage, git_rev)
        refs = [refs] if isinstance(refs, (str, Mask)) else list(refs)
        if not refs:
            raise RegistryError("compose needs at least one mask")

        def check(session: Session) -> list[MaskRow]:
            if concept_exists(session, name):
                raise ConflictError(f"release name {name!r} is already the name of a concept")
            return [mask_row(session, ref, base_model) for ref in refs]

        members = self._tx.read(lambda s: [row.to_entity() for row in check(s)])
        labels = [ref.ref if isinstance(ref, Mask) else str(ref) for ref in refs]
        unique = _compatible_members(name, members, labels)
        stored = [artifacts.mask_from_bytes(self.store.get(member.artifact_oid)) for member in unique.values()]
        try:
            merged = editors.union(stored, list(unique))
        except ValueError as exc:
            raise IncompatibleMasksError(f"cannot compose {name}: {exc}") from exc
        data = artifacts.mask_to_bytes(merged)
        oid = self.store.put(data)

        def write(session: Session) -> tuple[Release, bool]:
            if concept_exists(session, name):
                raise ConflictError(f"release name {name!r} is already the name of a concept")
            rows = []
            for member in unique.values():
                row = session.get(MaskRow, member.id)
                if row is None:
                    raise NotFoundError(f"mask {member.ref} was deleted meanwhile")
                rows.append(row)
            latest = latest_release_row(session, name)
            if reuse_latest and latest is not None and latest.union_oid == oid:
                if {member.mask_id for member in latest.members} == {row.id for row in rows}:
                    return latest.to_entity(), False
            keep_object(session, self.store, oid, data)
            release = ReleaseRow(
                name=name,
                version=(latest.version if latest is not None else 0) + 1,
                base_model_id=members[0].base_model_id,
                hook=members[0].hook,
                union_oid=oid,
                masked_total=merged.num_masked,
                notes=notes,
                created_by=created_by or self.actor,
                dvc_stage=dvc_stage,
                git_rev=git_rev,
                members=[ReleaseMemberRow(mask=row, position=position) for position, row in enumerate(rows)],
            )
            session.add(release)
            session.flush()
            details = {"members": [row.ref for row in rows], "oid": oid, "masked": merged.num_masked}
            self._tx.event(session, created_by, "release.compose", f"release:{release.ref}", details)
            return release.to_entity(), True

        return self._tx.write(write)

    def resolve_release(self, ref: ReleaseArg, base_model: BaseModelArg | None = None) -> Release:
        """The release ``ref`` names: ``name`` (latest version) or ``name@N``.

        Example:
            >>> reg.resolve_release("safe-v1").members
            ('nudity@3', 'van-gogh@2')
        """
        return self._tx.read(lambda s: release_row(s, ref, base_model).to_entity())

    def load_release_mask(self, release: ReleaseArg) -> ConceptMask:
        """The union mask of a release, read back verified from the store."""
        oid = release.union_oid if isinstance(release, Release) else self.resolve_release(release).union_oid
        return artifacts.mask_from_bytes(self.store.get(oid))

    def release_members(self, release: ReleaseArg) -> list[Mask]:
        """The member masks of a release, in compose order (unambiguous across base models).

        Example:
            >>> [mask.ref for mask in reg.release_members("safe-v1@2")]
            ['nudity@3', 'van-gogh@2']
        """
        return self._tx.read(lambda s: [member.mask.to_entity() for member in release_row(s, release).members])

    def list_releases(self, name: str | None = None) -> list[Release]:
        """Releases by name and version, optionally only those called ``name``."""
        query = select(ReleaseRow).order_by(ReleaseRow.name, ReleaseRow.version)
        if name is not None:
            query = query.where(ReleaseRow.name == validate_name(name, "release name"))
        return self._tx.read(lambda s: select_entities(s, query))


def _compatible_members(name: str, members: list[Mask], labels: list[str]) -> dict[str, Mask]:
    """The members by the label the caller gave (each mask once, first mention kept) if they
    share base model and hook; else :class:`IncompatibleMasksError` naming the first odd one."""
    first = members[0]
    for member, label in zip(members[1:], labels[1:], strict=True):
        if member.base_model_fingerprint != first.base_model_fingerprint:
            raise IncompatibleMasksError(
                f"cannot compose {name}: {label} is for base model {short_fingerprint(member.base_model_fingerprint)}, "
                f"{labels[0]} for {short_fingerprint(first.base_model_fingerprint)}"
            )
        if member.hook != first.hook:
            raise IncompatibleMasksError(
                f"cannot compose {name}: {label} has hook {member.hook!r}, {labels[0]} has {first.hook!r}"
            )
    unique: dict[int, tuple[str, Mask]] = {}
    for member, label in zip(members, labels, strict=True):
        unique.setdefault(member.id, (label, member))
    return dict(unique.values())
