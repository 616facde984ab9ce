"""The public Python API: a workspace wires the engine, the artifact store and the registry.

A workspace lives in a home folder (``$CPREG_HOME``, default ``.cpreg`` in the current
directory, like ``mlruns``) holding the SQLite registry and the object store, unless
``$CPREG_DB_URL`` / ``$CPREG_ARTIFACT_URI`` point elsewhere.

Example:
    >>> ws = Workspace()
    >>> mask = ws.compute("nudity", model="tiny", config=CalibrationConfig(num_inference_steps=5, tau=2))
    >>> mask.ref
    'nudity@1'
    >>> release = ws.compose("safe-v1", ["nudity", "van-gogh@prod"])
    >>> pipe, edit = ws.load_pipeline("safe-v1")
    >>> edit.restore()

The file-based steps of the DVC pipeline (``docs/dvc.md``) are idempotent: ``calibrate`` (statistics
and a calibration row, no mask), ``mask_from_stats`` (a mask from statistics bytes, no model run)
and ``release_from_masks`` (a release from mask files' bytes).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .artifacts import (
    ArtifactError,
    mask_from_bytes,
    mask_to_bytes,
    sha256_hex,
    stats_from_bytes,
    stats_to_bytes,
)
from .catalog import CATALOG, ConceptSpec, builtin_concept
from .distributed import distributed_calibrate, init_distributed, on_main_process
from .editors import (
    ActivationStats,
    CalibrationConfig,
    ConceptMask,
    Fill,
    MaskEdit,
    apply_mask,
    calibrate,
    check_selection,
    component_module,
    denoiser_component,
    derive_mask,
    hooked_layers,
    model_fingerprint,
    switch,
)
from .errors import CpregError, InvalidArgumentError
from .export import export_pipeline
from .models import architecture_of, default_model, load_base_pipeline
from .registry import (
    Calibration,
    Mask,
    NotFoundError,
    Registry,
    Release,
    prompt_set_hash,
)
from .registry.refs import validate_name


@dataclass(frozen=True)
class Settings:
    """Where a workspace keeps its registry and artifacts."""

    home: Path
    db_url: str
    artifact_uri: str

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None, db_url: str | None = None) -> Settings:
        """``home`` / ``db_url`` override ``$CPREG_HOME`` / ``$CPREG_DB_URL``."""
        home_path = Path(home or os.environ.get("CPREG_HOME") or ".cpreg").expanduser().absolute()
        db = db_url or os.environ.get("CPREG_DB_URL") or f"sqlite:///{home_path / 'registry.db'}"
        artifacts = os.environ.get("CPREG_ARTIFACT_URI") or str(home_path)
        return cls(home_path, db, artifacts)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded with every calibration)."""
    versions = {}
    for package in ("cpreg", "torch", "diffusers", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``path`` (default: the current directory).

    None outside a git repository, in one without commits, or without a ``git`` executable.
    """
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD"],
            cwd=path, capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", revision) else None


def _short(fingerprint: str | None) -> str:
    return "(none)" if fingerprint is None else fingerprint if len(fingerprint) <= 23 else fingerprint[:23] + "..."


@dataclass(frozen=True)
class CalibrationResult:
    """What :meth:`Workspace.calibrate` did: the registry row, the statistics bytes, and whether
    an existing calibration of the same inputs was reused instead of running the model."""

    calibration: Calibration
    data: bytes
    reused: bool


@dataclass(frozen=True)
class MaskResult:
    """What :meth:`Workspace.mask_from_stats` did: the mask version, its bytes, and whether a
    version with the same content existed already (returned instead of a new one)."""

    mask: Mask
    data: bytes
    reused: bool


@dataclass(frozen=True)
class ReleaseResult:
    """What :meth:`Workspace.release_from_masks` did: the release, its members, its union bytes,
    and whether the latest version already had these members (no new version)."""

    release: Release
    members: tuple[Mask, ...]
    data: bytes
    reused: bool


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

    def _ensure_concept(self, spec: ConceptSpec):
        try:
            return self.registry.get_concept(spec.name)
        except NotFoundError:
            return self.registry.add_concept(spec.name, spec.kind, spec.description)

    # -- computing masks --------------------------------------------------------------------

    def compute(
        self,
        concept: str | ConceptSpec,
        *,
        model: str | None = None,
        config: CalibrationConfig = CalibrationConfig(),
        skill_ratio: float | None = None,
        select_ratio: float = 0.0,
        dtype: str = "float32",
        device: str | None = "auto",
        progress: bool = False,
        description: str = "",
        dvc_stage: str | None = None,
        git_rev: str | None = None,
        reuse_existing: bool = False,
        pipe=None,
    ) -> Mask:
        """Calibrate ``concept`` on ``model``, store the statistics and register a mask version.

        ``pipe`` may pass an already loaded pipeline of ``model`` (it is not modified).
        """
        spec = concept if isinstance(concept, ConceptSpec) else self.concept_spec(concept)
        validate_name(spec.name)
        skill_ratio = spec.skill_ratio if skill_ratio is None else skill_ratio
        check_selection(skill_ratio, select_ratio)
        model = model or default_model()
        init_distributed()  # under torchrun: join the group before loading, each rank on its own GPU
        pipe = pipe if pipe is not None else load_base_pipeline(model, dtype=dtype, device=device)
        started = time.perf_counter()
        stats = distributed_calibrate(pipe, spec.targets, spec.references, config, progress=progress)
        duration = time.perf_counter() - started
        layers = hooked_layers(pipe, config.hook)
        mask = derive_mask(stats, {n: m.weight for n, m in layers.modules.items()}, skill_ratio, select_ratio=select_ratio)

        def record() -> list:  # only rank 0 writes artifacts and registry rows; the others get the ref
            base = self.registry.ensure_base_model(model, stats.fingerprint, architecture=architecture_of(pipe))
            concept_row = self._ensure_concept(spec)
            calibration = self._add_calibration(spec, stats, base, layers, duration, dvc_stage, git_rev)
            added = self.registry.add_mask(
                concept_row, mask, base, calibration,
                description=description, dvc_stage=dvc_stage, git_rev=git_rev, reuse_existing=reuse_existing,
            )
            return [added.concept, added.version, added.base_model_fingerprint]

        concept_name, version, fingerprint = on_main_process(record)
        return self.registry.resolve_mask(f"{concept_name}@{version}", base_model=fingerprint)

    def _add_calibration(self, spec: ConceptSpec, stats: ActivationStats, base, layers, duration: float,
                         dvc_stage: str | None, git_rev: str | None) -> Calibration:
        prompts = self.registry.ensure_prompt_set(spec.targets, spec.references)
        parameter = next(iter(layers.modules.values())).weight
        return self.registry.add_calibration(
            stats,
            base,
            prompts,
            dtype=str(parameter.dtype).removeprefix("torch."),
            device=str(parameter.device),
            duration_s=duration,
            library_versions=library_versions(),
            dvc_stage=dvc_stage,
            git_rev=git_rev,
        )

    def derive(
        self,
        ref: str,
        *,
        skill_ratio: float,
        tau: int | None = None,
        select_ratio: float = 0.0,
        device: str | None = None,
        description: str = "",
        dvc_stage: str | None = None,
        git_rev: str | None = None,
        reuse_existing: bool = False,
    ) -> Mask:
        """A new mask version from the statistics stored for ``ref``'s calibration: no model run.

        The base model's weights are loaded (on the CPU) to score; their fingerprint must match.
        """
        source = self.registry.resolve_mask(ref)
        if source.calibration_id is None:
            raise InvalidArgumentError(f"{source.ref} has no stored calibration to derive from")
        calibration = self.registry.get_calibration(source.calibration_id)
        stats = self.registry.load_stats(calibration)
        pipe = self.base_pipeline(source)
        layers = hooked_layers(pipe, calibration.hook)
        mask = derive_mask(
            stats,
            {n: m.weight for n, m in layers.modules.items()},
            skill_ratio,
            tau=tau,
            select_ratio=select_ratio,
            device=device,
        )
        return self.registry.add_mask(
            source.concept, mask, source.base_model_fingerprint, calibration,
            description=description, dvc_stage=dvc_stage, git_rev=git_rev, reuse_existing=reuse_existing,
        )

    # -- file-based steps (the DVC pipeline) -------------------------------------------------

    def calibrate(
        self,
        concept: str | ConceptSpec,
        *,
        model: str | None = None,
        config: CalibrationConfig = CalibrationConfig(),
        dtype: str = "float32",
        device: str | None = "auto",
        progress: bool = False,
        reuse: bool = True,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
        pipe=None,
    ) -> CalibrationResult:
        """Calibrate ``concept`` on ``model`` and register the calibration (no mask); idempotent.

        With ``reuse`` (the default), a registered calibration of the same base model (by
        fingerprint), prompts, configuration, dtype, device and library versions is returned
        with its stored statistics and the model is not run. Identical statistics bytes always
        map to one calibration row. ``result.data`` is ``stats_to_bytes`` of the statistics.
        """
        spec = concept if isinstance(concept, ConceptSpec) else self.concept_spec(concept)
        validate_name(spec.name)
        model = model or default_model()
        pipe = pipe if pipe is not None else load_base_pipeline(model, dtype=dtype, device=device)
        layers = hooked_layers(pipe, config.hook)
        if reuse:
            found = self._find_calibration(spec, model_fingerprint(pipe), config, layers)
            if found is not None:
                return found
        started = time.perf_counter()
        stats = calibrate(pipe, spec.targets, spec.references, config, progress=progress)
        duration = time.perf_counter() - started
        base = self.registry.ensure_base_model(model, stats.fingerprint, architecture=architecture_of(pipe))
        self._ensure_concept(spec)
        calibration = self._add_calibration(spec, stats, base, layers, duration, dvc_stage, git_rev)
        return CalibrationResult(calibration, stats_to_bytes(stats), reused=False)

    def _find_calibration(self, spec: ConceptSpec, fingerprint: str, config: CalibrationConfig, layers) -> CalibrationResult | None:
        try:
            candidates = self.registry.list_calibrations(fingerprint)
        except NotFoundError:
            return None  # base model not registered yet
        parameter = next(iter(layers.modules.values())).weight
        wanted = {
            "prompt_set_hash": prompt_set_hash(spec.targets, spec.references),
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "device": str(parameter.device),
            "library_versions": library_versions(),
        }
        for calibration in reversed(candidates):
            # Compared as configurations: a row recorded before a field existed has its default.
            same_config = {**CalibrationConfig().to_dict(), **calibration.config} == config.to_dict()
            if same_config and all(getattr(calibration, key) == value for key, value in wanted.items()):
                try:
                    data = self.registry.store.get(calibration.stats_oid)
                except ArtifactError:
                    continue  # missing or corrupt object: calibrate again (which stores it again)
                return CalibrationResult(calibration, bytes(data), reused=True)
        return None

    def mask_from_stats(
        self,
        concept: str | ConceptSpec,
        stats_data: bytes,
        *,
        model: str | None = None,
        skill_ratio: float | None = None,
        tau: int | None = None,
        select_ratio: float = 0.0,
        device: str | None = None,
        description: str = "",
        dvc_stage: str | None = None,
        git_rev: str | None = None,
        source: str = "the statistics",
    ) -> MaskResult:
        """Derive and register a mask of ``concept`` from statistics bytes (no model run); idempotent.

        The base model (``model``; default: the one registered for the statistics' fingerprint,
        else ``$CPREG_MODEL``) is loaded on the CPU only for its hooked-layer weights, and its
        fingerprint must be the statistics'. The calibration is found by the statistics' object
        id, or registered from them with the concept's prompts when the registry lacks it. An
        existing mask version with the same content is returned instead of a new one
        (``result.reused``); ``result.data`` is ``mask_to_bytes`` of the mask (its sha256 is
        ``result.mask.artifact_oid``).
        ``source`` names the statistics in error messages.
        """
        spec = concept if isinstance(concept, ConceptSpec) else self.concept_spec(concept)
        validate_name(spec.name)
        stats = stats_from_bytes(stats_data)
        skill_ratio = spec.skill_ratio if skill_ratio is None else skill_ratio
        check_selection(skill_ratio, select_ratio, tau, calibrated_tau=stats.steps)
        if stats.fingerprint is None:
            raise InvalidArgumentError(f"{source} name no base model fingerprint")
        if model is None:
            try:
                model = self.registry.get_base_model(stats.fingerprint).name
            except NotFoundError:
                model = default_model()
        pipe = load_base_pipeline(model, device="cpu")
        found = model_fingerprint(pipe)
        if found != stats.fingerprint:
            raise InvalidArgumentError(
                f"{source} were calibrated on base model {_short(stats.fingerprint)}, "
                f"but {model!r} has fingerprint {_short(found)}"
            )
        oid = sha256_hex(stats_data)
        calibration = self._calibration_by_oid(stats.fingerprint, oid)
        wanted_prompts = prompt_set_hash(spec.targets, spec.references)
        if calibration is not None and calibration.prompt_set_hash != wanted_prompts:
            raise InvalidArgumentError(
                f"{source} were calibrated on other prompts than those of concept {spec.name!r} "
                f"(prompt set {calibration.prompt_set_hash[:12]}, not {wanted_prompts[:12]})"
            )
        if calibration is None and (stats.num_target_prompts, stats.num_reference_prompts) != (len(spec.targets), len(spec.references)):
            raise InvalidArgumentError(
                f"{source} cover {stats.num_target_prompts}/{stats.num_reference_prompts} target/reference prompts, "
                f"concept {spec.name!r} has {len(spec.targets)}/{len(spec.references)}"
            )
        layers = hooked_layers(pipe, stats.config.hook)
        mask = derive_mask(
            stats, {n: m.weight for n, m in layers.modules.items()}, skill_ratio,
            tau=tau, select_ratio=select_ratio, device=device,
        )
        data = mask_to_bytes(mask)
        oid = sha256_hex(data)
        base = self.registry.ensure_base_model(model, stats.fingerprint, architecture=architecture_of(pipe))
        concept_row = self._ensure_concept(spec)
        if calibration is None:
            prompts = self.registry.ensure_prompt_set(spec.targets, spec.references)
            # Registered from the file alone: how it was computed is unknown here.
            calibration = self.registry.add_calibration(
                stats, base, prompts, dtype="unknown", device="unknown", duration_s=0.0,
                library_versions={}, dvc_stage=dvc_stage, git_rev=git_rev,
            )
        entry, created = self.registry.get_or_add_mask(
            concept_row, mask, base, calibration, description=description, dvc_stage=dvc_stage, git_rev=git_rev,
        )
        if oid != entry.artifact_oid:  # pragma: no cover - mask_to_bytes is deterministic
            raise CpregError(f"the bytes of {entry.ref} are not reproducible")
        return MaskResult(entry, data, reused=not created)

    def _calibration_by_oid(self, fingerprint: str, oid: str) -> Calibration | None:
        try:
            candidates = self.registry.list_calibrations(fingerprint)
        except NotFoundError:
            return None
        return next((c for c in candidates if c.stats_oid == oid), None)

    def release_from_masks(
        self,
        name: str,
        members: list[tuple[str, bytes]],
        notes: str = "",
        *,
        sources: list[str] | None = None,
        dvc_stage: str | None = None,
        git_rev: str | None = None,
    ) -> ReleaseResult:
        """Compose release ``name`` from mask files' bytes, ``[(concept, bytes), ...]``; idempotent.

        Each file must be a registered mask version of its concept (found by content); when the
        latest version of ``name`` has the same member versions and union, it is returned and no
        new version is created (it keeps the stage and revision that made it). ``sources`` name
        the files in error messages.
        """
        validate_name(name, "release name")
        if not members:
            raise InvalidArgumentError("a release needs at least one member")
        sources = sources or [concept for concept, _ in members]
        entries = []
        for (concept, data), source in zip(members, sources, strict=True):
            try:
                mask_from_bytes(data)
            except ValueError as error:
                raise InvalidArgumentError(f"{source}: {error}") from None
            oid = sha256_hex(data)
            matches = [m for m in self.registry.list_masks(concept) if m.artifact_oid == oid]
            if not matches:
                raise InvalidArgumentError(
                    f"{source} is not a registered mask of concept {concept!r} in this registry "
                    f"(rerun its mask step, e.g. `dvc repro --force --single-item mask@{concept}`)"
                )
            entries.append(matches[0])  # the oldest version with this content, as get_or_add_mask reuses it
        unique = list({entry.id: entry for entry in entries}.values())
        release, created = self.registry.get_or_compose(name, unique, notes, dvc_stage=dvc_stage, git_rev=git_rev)
        ordered = sorted(unique, key=lambda entry: release.member_ids.index(entry.id))
        return ReleaseResult(release, tuple(ordered), self.registry.store.get(release.union_oid), reused=not created)

    def compose(self, name: str, refs: list[str], notes: str = "") -> Release:
        """A new version of release ``name``: the union of the masks ``refs``."""
        return self.registry.compose(name, refs, notes)

    # -- using masks ------------------------------------------------------------------------

    def resolve(self, ref: str) -> Mask | Release:
        return self.registry.resolve(ref)

    def load_mask(self, ref: str | Mask | Release) -> ConceptMask:
        """The verified mask of a mask version or a release's union."""
        return self.registry.load(ref)

    def base_pipeline(self, ref: str | Mask | Release, base: str | None = None, *, dtype: str = "float32",
                      device: str | None = "cpu", **from_pretrained_kwargs):
        """Load the base model recorded for ``ref`` (or ``base``) and check its fingerprint."""
        entity = ref if isinstance(ref, (Mask, Release)) else self.registry.resolve(ref)
        model = base or self.registry.get_base_model(entity.base_model_fingerprint).name
        pipe = load_base_pipeline(model, dtype=dtype, device=device, **from_pretrained_kwargs)
        self._check_fingerprint(pipe, entity, model)
        return pipe

    def _check_fingerprint(self, pipe, entity: Mask | Release, model: str) -> None:
        denoiser = component_module(pipe, denoiser_component(pipe))
        if next(denoiser.parameters()).dtype == torch.bfloat16:
            return  # bf16 rounds differently (docs/method.md): names and shapes are still checked on apply
        found = model_fingerprint(pipe)
        if found != entity.base_model_fingerprint:
            raise InvalidArgumentError(
                f"{entity.ref} was made on base model {entity.base_model_fingerprint[:23]}..., "
                f"but {model!r} has fingerprint {found[:23]}..."
            )

    def apply(self, pipe, ref: str | Mask | Release, *, fill: Fill | str = Fill.ZERO, seed: int = 0,
              replace: bool = False) -> MaskEdit:
        """Apply a mask or release to a loaded pipeline, on top of its edits; ``restore()`` (or ``with``) undoes it.

        The edit is labelled with the resolved ref (``nudity@prod`` -> ``nudity@3``) in
        :func:`~cpreg.editors.active_edits`. ``replace``: restore every edit of the pipeline first
        (:func:`~cpreg.editors.switch`, what a server does per request; see docs/editing.md).
        """
        entity = ref if isinstance(ref, (Mask, Release)) else self.resolve(ref)
        edit = switch if replace else apply_mask
        return edit(pipe, self.load_mask(entity), label=entity.ref, fill=fill, seed=seed)

    def load_pipeline(self, ref: str, base: str | None = None, *, fill: Fill | str = Fill.ZERO,
                      dtype: str = "float32", device: str | None = "auto", **from_pretrained_kwargs):
        """The base model of ``ref`` with its mask applied (the only edit on its stack): ``(pipe, edit)``."""
        pipe = self.base_pipeline(ref, base, dtype=dtype, device=device, **from_pretrained_kwargs)
        return pipe, self.apply(pipe, ref, fill=fill)

    def export(self, ref: str, out_dir: str | os.PathLike, *, base: str | None = None, fill: Fill | str = Fill.ZERO) -> Path:
        """Write a plain diffusers pipeline folder with ``ref`` applied and a model card."""
        entity = self.registry.resolve(ref)
        mask = self.load_mask(entity)
        pipe = self.base_pipeline(entity, base)
        return export_pipeline(pipe, mask, out_dir, self.model_card(entity, fill=Fill(fill)), fill=fill)

    def evaluate(self, ref: str, *, base: str | None = None, erased_prompts: list[str] | None = None,
                 retained_prompts: list[str] | None = None, classifier: str = "auto", clip_model: str | None = None,
                 device: str | None = "auto", **evaluate_kwargs) -> dict:
        """Erasure measurement of a mask or release (:func:`cpreg.evaluate.evaluate`).

        Default prompts: the targets the members were calibrated on (erased) and their references
        that are no member's target (retained).
        ``classifier``: ``auto``, ``demo``, ``nudenet``, ``clip`` or ``none``, resolved (with ``clip_model``)
        by :func:`cpreg.classifiers.resolve_classifier` before the model is loaded; without one the report
        says why.
        """
        from .classifiers import resolve_classifier
        from .evaluate import evaluate

        entity = self.registry.resolve(ref)
        members = self.registry.release_members(entity) if isinstance(entity, Release) else [entity]
        specs = [self.mask_spec(member) for member in members]
        erased = erased_prompts or list(dict.fromkeys(prompt for spec in specs for prompt in spec.targets))
        retained = retained_prompts or list(dict.fromkeys(  # another member's target is not "retained"
            prompt for spec in specs for prompt in spec.references if prompt and prompt not in erased))
        model = base or self.registry.get_base_model(entity.base_model_fingerprint).name
        chosen = resolve_classifier(classifier, model=model, concepts=specs, erased_prompts=erased,
                                    retained_prompts=retained, clip_model=clip_model, device=device)
        pipe = self.base_pipeline(entity, model, device=device)
        return evaluate(pipe, self.load_mask(entity), erased, retained, classifier=chosen.classifier,
                        classifier_reason=chosen.reason, header={"ref": entity.ref, "model": model}, **evaluate_kwargs)

    def model_card(self, entity: Mask | Release, *, fill: Fill = Fill.ZERO) -> str:
        """README.md of an exported pipeline: erased concepts, versions, parameters, lineage."""
        members = self.registry.release_members(entity) if isinstance(entity, Release) else [entity]
        base = self.registry.get_base_model(entity.base_model_fingerprint)
        lines = [
            f"# {base.name} with {entity.ref} erased",
            "",
            "Edited with cpreg (ConceptPrune, [arXiv 2405.19237](https://arxiv.org/abs/2405.19237)): skilled neurons of the",
            f"`{entity.hook}` layers were {'zeroed' if fill is Fill.ZERO else 'overwritten with small Gaussian noise'}.",
            "",
            f"- base model: `{base.name}` (fingerprint `{base.fingerprint}`, architecture {base.architecture})",
            f"- {'release' if isinstance(entity, Release) else 'mask'}: `{entity.ref}`, {entity.masked_total:,} weights pruned",
            "",
            "| concept | mask | skill_ratio | tau | select_ratio | weights | calibration | created |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mask in members:
            lines.append(
                f"| {mask.concept} | {mask.ref} | {mask.skill_ratio} | {mask.tau} | {mask.select_ratio} | "
                f"{mask.masked_total:,} | #{mask.calibration_id} | {mask.created_at:%Y-%m-%d} by {mask.created_by} |"
            )
        if isinstance(entity, Release) and entity.notes:
            lines += ["", f"Notes: {entity.notes}"]
        return "\n".join(lines) + "\n"
