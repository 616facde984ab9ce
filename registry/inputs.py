"""What mask versions are made from: base models, concepts, prompt sets and calibration runs.

Part of :class:`~cpreg.registry.Registry` (a mixin: it uses the registry's store, actor and
transactions). Base models are identified by their weight fingerprint, prompt sets by the hash
of their content, calibrations by their statistics' object id; registering one of them again
returns the row already there (the reuse rule, docs/data-model.md).

Example:
    >>> model = reg.ensure_base_model("CompVis/stable-diffusion-v1-4", "sha256:ab12...")
    >>> prompts = reg.ensure_prompt_set(["a naked man"], ["a man"])
    >>> reg.add_concept("nudity", "nudity", prompt_set=prompts).prompt_set_id == prompts.id
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import artifacts, editors
from ..artifacts import ObjectStore
from .entities import BaseModel, Calibration, Concept, PromptSet
from .errors import ConflictError, RegistryError
from .orm import BaseModelRow, CalibrationRow, ConceptRow, PromptSetRow, select_entities
from .refs import validate_name
from .resolution import (
    BaseModelArg,
    base_model_row,
    calibration_row,
    concept_exists,
    concept_row,
    prompt_set_row,
    release_exists,
    short_fingerprint,
)
from .session import Transactions, keep_object
from .validation import (
    validate_base_model,
    validate_finite,
    validate_json,
    validate_kind,
    validate_prompts,
    validate_provenance,
    validate_text,
)

if TYPE_CHECKING:  # the engine imports torch: only for type hints here
    from ..editors import ActivationStats


def prompt_set_hash(targets: Sequence[str], references: Sequence[str]) -> str:
    """sha256 hex of the canonical JSON of both prompt lists (order matters)."""
    payload = json.dumps(
        {"references": list(references), "targets": list(targets)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class InputsMixin:
    """Base models, concepts, prompt sets and calibrations of a :class:`~cpreg.registry.Registry`."""

    store: ObjectStore
    actor: str
    _tx: Transactions

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
        validate_base_model(name, fingerprint)
        validate_text(revision, BaseModelRow.revision, optional=True)
        validate_text(architecture, BaseModelRow.architecture, optional=True)

        def write(session: Session) -> BaseModel:
            row = session.scalars(select(BaseModelRow).where(BaseModelRow.fingerprint == fingerprint)).one_or_none()
            if row is not None:
                return row.to_entity()
            row = BaseModelRow(name=name, fingerprint=fingerprint, revision=revision, architecture=architecture)
            session.add(row)
            session.flush()
            details = {"name": name, "revision": revision, "architecture": architecture}
            self._tx.event(session, created_by, "base_model.add", f"base_model:{fingerprint}", details)
            return row.to_entity()

        return self._tx.write(write)

    def get_base_model(self, fingerprint: str) -> BaseModel:
        """The base model with this fingerprint (:class:`NotFoundError` if unknown)."""
        return self._tx.read(lambda s: base_model_row(s, fingerprint).to_entity())

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
        validate_kind(kind)
        validate_text(description, ConceptRow.description)

        def write(session: Session) -> Concept:
            if concept_exists(session, name):
                raise ConflictError(f"concept {name!r} already exists")
            if release_exists(session, name):
                raise ConflictError(f"{name!r} is already the name of a release")
            prompts = prompt_set_row(session, prompt_set) if prompt_set is not None else None
            prompt_set_id = prompts.id if prompts is not None else None
            row = ConceptRow(name=name, kind=kind, description=description, prompt_set_id=prompt_set_id)
            session.add(row)
            session.flush()
            details = {"kind": kind, "description": description}
            if prompts is not None:
                details["prompt_set"] = prompts.content_hash
            self._tx.event(session, created_by, "concept.add", f"concept:{name}", details)
            return row.to_entity()

        return self._tx.write(write)

    def get_concept(self, name: str) -> Concept:
        """The concept called ``name`` (:class:`NotFoundError` if unknown)."""
        return self._tx.read(lambda s: concept_row(s, name).to_entity())

    def list_concepts(self) -> list[Concept]:
        """Every concept, by name."""
        return self._tx.read(lambda s: select_entities(s, select(ConceptRow).order_by(ConceptRow.name)))

    def ensure_prompt_set(
        self, targets: Sequence[str], references: Sequence[str], *, created_by: str | None = None
    ) -> PromptSet:
        """Register target and reference prompts (identified by their content hash); idempotent.

        Example:
            >>> ps = reg.ensure_prompt_set(["a naked man"], ["a man"])
            >>> ps.content_hash == reg.ensure_prompt_set(["a naked man"], ["a man"]).content_hash
            True
        """
        targets = validate_prompts(targets, "targets")
        references = validate_prompts(references, "references")
        content_hash = prompt_set_hash(targets, references)

        def write(session: Session) -> PromptSet:
            row = session.scalars(select(PromptSetRow).where(PromptSetRow.content_hash == content_hash)).one_or_none()
            if row is not None:
                return row.to_entity()
            row = PromptSetRow(content_hash=content_hash, target_prompts=targets, reference_prompts=references)
            session.add(row)
            session.flush()
            details = {"targets": len(targets), "references": len(references)}
            self._tx.event(session, created_by, "prompt_set.add", f"prompt_set:{content_hash}", details)
            return row.to_entity()

        return self._tx.write(write)

    def get_prompt_set(self, prompt_set: int | str) -> PromptSet:
        """The prompt set with this id or content hash (:class:`NotFoundError` if unknown).

        Example:
            >>> reg.get_prompt_set(reg.get_concept("van-gogh").prompt_set_id).targets
            ('a starry night painting',)
        """
        return self._tx.read(lambda s: prompt_set_row(s, prompt_set).to_entity())

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
        calibration (the reuse rule). The statistics' fingerprint (when set) must be the base model's.

        Example:
            >>> cal = reg.add_calibration(stats, model, ps, dtype="float16", device="cuda",
            ...                           duration_s=812.5, library_versions={"torch": "2.5.1"})
        """
        if not isinstance(stats, editors.ActivationStats):
            raise RegistryError(f"stats must be ActivationStats, got {type(stats).__name__}")
        dtype = validate_text(str(dtype).removeprefix("torch."), CalibrationRow.dtype)
        device = validate_text(str(device), CalibrationRow.device)
        duration_s = validate_finite(duration_s, "duration_s")
        library_versions = validate_json(dict(library_versions), "library_versions")
        validate_finite(stats.config.guidance_scale, "guidance_scale")
        validate_provenance(CalibrationRow, created_by, dvc_stage, git_rev)

        def check(session: Session) -> tuple[BaseModelRow, PromptSetRow]:
            model = base_model_row(session, base_model)
            prompts = prompt_set_row(session, prompt_set)
            if stats.fingerprint is not None and stats.fingerprint != model.fingerprint:
                raise ConflictError(
                    f"statistics are for base model {short_fingerprint(stats.fingerprint)}, "
                    f"not {short_fingerprint(model.fingerprint)}"
                )
            counts = (len(prompts.target_prompts), len(prompts.reference_prompts))
            if (stats.num_target_prompts, stats.num_reference_prompts) != counts:
                raise ConflictError(
                    f"statistics cover {stats.num_target_prompts}/{stats.num_reference_prompts} target/reference "
                    f"prompts, prompt set {prompts.content_hash[:12]} has {counts[0]}/{counts[1]}"
                )
            return model, prompts

        self._tx.read(check)
        data = artifacts.stats_to_bytes(stats)
        oid = self.store.put(data)
        config = stats.config

        def write(session: Session) -> Calibration:
            model, prompts = check(session)
            row = session.scalars(
                select(CalibrationRow).where(
                    CalibrationRow.base_model_id == model.id,
                    CalibrationRow.prompt_set_id == prompts.id,
                    CalibrationRow.stats_oid == oid,
                )
            ).one_or_none()
            if row is not None:
                return row.to_entity()
            keep_object(session, self.store, oid, data)
            row = CalibrationRow(
                base_model=model,
                prompt_set=prompts,
                seed=config.seed,
                num_inference_steps=config.num_inference_steps,
                guidance=float(config.guidance_scale),
                tau=config.tau,
                hook=config.hook.value,
                component=stats.component,
                config=config.to_dict(),
                dtype=dtype,
                device=device,
                library_versions=library_versions,
                duration_s=duration_s,
                stats_oid=oid,
                dvc_stage=dvc_stage,
                git_rev=git_rev,
                created_by=created_by or self.actor,
            )
            session.add(row)
            session.flush()
            details = {"base_model": model.fingerprint, "prompt_set": prompts.content_hash, "stats_oid": oid}
            self._tx.event(session, created_by, "calibration.add", f"calibration:{row.id}", details)
            return row.to_entity()

        return self._tx.write(write)

    def get_calibration(self, calibration_id: int) -> Calibration:
        """The calibration with this id (:class:`NotFoundError` if unknown)."""
        return self._tx.read(lambda s: calibration_row(s, calibration_id).to_entity())

    def list_calibrations(self, base_model: BaseModelArg | None = None) -> list[Calibration]:
        """Calibrations, oldest first, optionally of one base model."""

        def read(session: Session) -> list[Calibration]:
            query = select(CalibrationRow).order_by(CalibrationRow.id)
            if base_model is not None:
                query = query.where(CalibrationRow.base_model_id == base_model_row(session, base_model).id)
            return select_entities(session, query)

        return self._tx.read(read)

    def load_stats(self, calibration: Calibration | int) -> ActivationStats:
        """The statistics of a calibration, read back verified from the store."""
        oid = self._tx.read(lambda s: calibration_row(s, calibration).stats_oid)
        return artifacts.stats_from_bytes(self.store.get(oid))
