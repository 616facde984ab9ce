"""The public Python API: a workspace wires the engine, the artifact store and the registry.

A workspace lives in a home folder (``$CPREG_HOME``, default ``.cpreg`` in the current
directory, like ``mlruns``) holding the SQLite registry and the object store, unless
``$CPREG_DB_URL`` / ``$CPREG_ARTIFACT_URI`` point elsewhere. Opening one imports no model
library: the methods that run a model live in their own modules and load on first use
(:mod:`cpreg.compute`, :mod:`cpreg.stages`, :mod:`cpreg.application`, :mod:`cpreg.export`,
:mod:`cpreg.evaluate`, :mod:`cpreg.model_card`).

Example:
    >>> ws = Workspace()
    >>> mask = ws.compute("nudity", model="tiny", config=CalibrationConfig(num_inference_steps=5, tau=2))
    >>> mask.ref
    'nudity@1'
    >>> release = ws.compose("safe-v1", ["nudity", "van-gogh@prod"])
    >>> pipe, edit = ws.load_pipeline("safe-v1")
    >>> edit.restore()
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .catalog import CATALOG, ConceptSpec, builtin_concept
from .errors import InvalidArgumentError
from .lazy import lazy_method
from .registry import Alias, BaseModel, Concept, Event, Mask, NotFoundError, Registry, Release
from .registry.refs import validate_name
from .settings import Settings

if TYPE_CHECKING:
    from .editors import ConceptMask


class Workspace:
    """Calibrate, derive, compose, apply and export, recording everything in the registry."""

    def __init__(self, home: str | os.PathLike | None = None, db_url: str | None = None, *, actor: str | None = None) -> None:
        self.settings = Settings.from_env(home, db_url)
        if self.settings.db_url.startswith("sqlite:///"):
            try:
                self.settings.home.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise InvalidArgumentError(f"cannot create the cpreg home {str(self.settings.home)!r}: {error.strerror}") from None
            if not os.access(self.settings.home, os.W_OK):
                raise InvalidArgumentError(f"the cpreg home {str(self.settings.home)!r} is not writable")
        self.registry = Registry(self.settings.db_url, self.settings.artifact_uri, actor=actor)

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- concepts ---------------------------------------------------------------------------

    def concept_spec(self, name: str) -> ConceptSpec:
        """A registered custom concept (with its prompts), else the built-in catalog entry."""
        try:
            concept = self.registry.get_concept(name)
        except NotFoundError:
            return builtin_concept(name)
        if concept.prompt_set_id is None:
            return builtin_concept(name)
        return self._spec_with_prompts(concept, concept.prompt_set_id)

    def _spec_with_prompts(self, concept, prompt_set_id: int) -> ConceptSpec:
        prompts = self.registry.get_prompt_set(prompt_set_id)
        return ConceptSpec(concept.name, concept.kind, concept.description, tuple(zip(prompts.targets, prompts.references)))

    def mask_spec(self, mask: Mask) -> ConceptSpec:
        """The concept of ``mask`` with the prompts it was calibrated on (else :meth:`concept_spec`)."""
        if mask.calibration_id is None:
            return self.concept_spec(mask.concept)
        calibration = self.registry.get_calibration(mask.calibration_id)
        return self._spec_with_prompts(self.registry.get_concept(mask.concept), calibration.prompt_set_id)

    def add_concept(self, spec: ConceptSpec):
        """Register a custom concept and its prompts (a name of the built-in catalog is refused)."""
        validate_name(spec.name)
        if spec.name in CATALOG:
            raise InvalidArgumentError(f"{spec.name!r} is a built-in concept; choose another name")
        prompts = self.registry.ensure_prompt_set(spec.targets, spec.references)
        return self.registry.add_concept(spec.name, spec.kind, spec.description, prompt_set=prompts)

    def ensure_concept(self, spec: ConceptSpec):
        """The registered concept ``spec`` names, registered (without prompts) if new."""
        try:
            return self.registry.get_concept(spec.name)
        except NotFoundError:
            return self.registry.add_concept(spec.name, spec.kind, spec.description)

    # -- computing masks (cpreg.compute) and the DVC pipeline's file steps (cpreg.stages) ----

    compute = lazy_method(".compute", "compute")
    derive = lazy_method(".compute", "derive")
    calibrate = lazy_method(".stages", "calibrate")
    mask_from_stats = lazy_method(".stages", "mask_from_stats")
    release_from_masks = lazy_method(".stages", "release_from_masks")

    def compose(self, name: str, refs: list[str], notes: str = "") -> Release:
        """A new version of release ``name``: the union of the masks ``refs``."""
        return self.registry.compose(name, refs, notes)

    def resolve(self, ref: str) -> Mask | Release:
        """The mask version or release version ``ref`` names (``nudity@prod``, ``safe-v1``...)."""
        return self.registry.resolve(ref)

    def resolve_mask(self, ref: str) -> Mask:
        """The mask version ``ref`` names (a release name is refused)."""
        return self.registry.resolve_mask(ref)

    def resolve_release(self, ref: str) -> Release:
        """The release version ``ref`` names."""
        return self.registry.resolve_release(ref)

    def load_mask(self, ref: str | Mask | Release) -> ConceptMask:
        """The verified mask of a mask version or a release's union."""
        return self.registry.load(ref)

    # -- what the command line reads and reviews ---------------------------------------------

    def concepts(self) -> list[Concept]:
        """The registered concepts (built-in ones appear once used)."""
        return self.registry.list_concepts()

    def masks(self, concept: str | None = None, *, tag: str | None = None) -> list[Mask]:
        """Mask versions, optionally of one concept and with one tag."""
        return self.registry.list_masks(concept, tag=tag)

    def releases(self) -> list[Release]:
        """Every release version."""
        return self.registry.list_releases()

    def base_model(self, fingerprint: str) -> BaseModel:
        """The registered base model of ``fingerprint``."""
        return self.registry.get_base_model(fingerprint)

    def tag(self, ref: str, add: list[str], remove: list[str]) -> Mask:
        """Add and remove tags of a mask version."""
        return self.registry.tag_mask(ref, add, remove=remove)

    def set_alias(self, ref: str, alias: str) -> Alias:
        """Point ``alias`` of the mask's concept at the version ``ref`` names."""
        return self.registry.set_alias(ref, alias)

    def delete_mask(self, ref: str) -> Mask:
        """Delete a mask version no release or alias uses."""
        return self.registry.delete_mask(ref)

    def diff(self, a: str, b: str) -> dict:
        """Per-layer counts and IoU of two masks or releases."""
        return self.registry.diff(a, b)

    def verify(self) -> list[tuple[str, str]]:
        """Problems found re-hashing every stored object and checking every row's object."""
        return self.registry.verify()

    def gc(self, *, dry_run: bool = True) -> list[str]:
        """Unreferenced objects: listed, or deleted unless ``dry_run``."""
        return self.registry.gc(dry_run=dry_run)

    def events(self, limit: int | None = None) -> list[Event]:
        """The event log, newest first."""
        return self.registry.events(limit)

    # -- using masks on pipelines (cpreg.application, cpreg.export, cpreg.evaluate) -----------

    base_pipeline = lazy_method(".application", "base_pipeline")
    apply = lazy_method(".application", "apply")
    load_pipeline = lazy_method(".application", "load_pipeline")
    export = lazy_method(".export", "export")
    evaluate = lazy_method(".evaluate", "evaluate_ref")
    model_card = lazy_method(".model_card", "model_card")
