"""The file-based, idempotent steps of the DVC pipeline (``docs/dvc.md``).

``calibrate`` (statistics and a calibration row, no mask), ``mask_from_stats`` (a mask from
statistics bytes, no model run) and ``release_from_masks`` (a release from mask files' bytes)
reuse what the registry already holds instead of making new versions; each returns what it did
with ``reused``. They are the workspace methods of the same names.

Example:
    >>> result = ws.calibrate("nudity", model="tiny", config=CalibrationConfig(num_inference_steps=5, tau=2))
    >>> ws.mask_from_stats("nudity", result.data, skill_ratio=0.02).reused
    False
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .artifacts import ArtifactError, mask_from_bytes, mask_to_bytes, sha256_hex, stats_from_bytes, stats_to_bytes
from .catalog import ConceptSpec
from .compute import add_calibration
from .editors import CalibrationConfig, check_selection, derive_mask, hooked_layers, model_fingerprint
from .editors import calibrate as calibrate_statistics
from .errors import CpregError, InvalidArgumentError
from .models import architecture_of, default_model, load_base_pipeline
from .registry import Calibration, Mask, NotFoundError, Release, prompt_set_hash
from .registry.refs import validate_name
from .settings import library_versions

if TYPE_CHECKING:
    from .workspace import Workspace


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


def calibrate(
    ws: Workspace,
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
    spec = concept if isinstance(concept, ConceptSpec) else ws.concept_spec(concept)
    validate_name(spec.name)
    model = model or default_model()
    pipe = pipe if pipe is not None else load_base_pipeline(model, dtype=dtype, device=device)
    layers = hooked_layers(pipe, config.hook)
    if reuse:
        found = _find_calibration(ws, spec, model_fingerprint(pipe), config, layers)
        if found is not None:
            return found
    started = time.perf_counter()
    stats = calibrate_statistics(pipe, spec.targets, spec.references, config, progress=progress)
    duration = time.perf_counter() - started
    base = ws.registry.ensure_base_model(model, stats.fingerprint, architecture=architecture_of(pipe))
    ws.ensure_concept(spec)
    calibration = add_calibration(ws, spec, stats, base, layers, duration, dvc_stage, git_rev)
    return CalibrationResult(calibration, stats_to_bytes(stats), reused=False)


def _find_calibration(ws: Workspace, spec: ConceptSpec, fingerprint: str, config: CalibrationConfig, layers) -> CalibrationResult | None:
    try:
        candidates = ws.registry.list_calibrations(fingerprint)
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
                data = ws.registry.store.get(calibration.stats_oid)
            except ArtifactError:
                continue  # missing or corrupt object: calibrate again (which stores it again)
            return CalibrationResult(calibration, bytes(data), reused=True)
    return None


def mask_from_stats(
    ws: Workspace,
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
    spec = concept if isinstance(concept, ConceptSpec) else ws.concept_spec(concept)
    validate_name(spec.name)
    stats = stats_from_bytes(stats_data)
    skill_ratio = spec.skill_ratio if skill_ratio is None else skill_ratio
    check_selection(skill_ratio, select_ratio, tau, calibrated_tau=stats.recorded_steps)
    if stats.fingerprint is None:
        raise InvalidArgumentError(f"{source} name no base model fingerprint")
    if model is None:
        try:
            model = ws.registry.get_base_model(stats.fingerprint).name
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
    calibration = _calibration_by_oid(ws, stats.fingerprint, oid)
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
    base = ws.registry.ensure_base_model(model, stats.fingerprint, architecture=architecture_of(pipe))
    concept_row = ws.ensure_concept(spec)
    if calibration is None:
        prompts = ws.registry.ensure_prompt_set(spec.targets, spec.references)
        # Registered from the file alone: how it was computed is unknown here.
        calibration = ws.registry.add_calibration(
            stats, base, prompts, dtype="unknown", device="unknown", duration_s=0.0,
            library_versions={}, dvc_stage=dvc_stage, git_rev=git_rev,
        )
    entry, created = ws.registry.get_or_add_mask(
        concept_row, mask, base, calibration, description=description, dvc_stage=dvc_stage, git_rev=git_rev,
    )
    if oid != entry.artifact_oid:  # pragma: no cover - mask_to_bytes is deterministic
        raise CpregError(f"the bytes of {entry.ref} are not reproducible")
    return MaskResult(entry, data, reused=not created)


def _calibration_by_oid(ws: Workspace, fingerprint: str, oid: str) -> Calibration | None:
    try:
        candidates = ws.registry.list_calibrations(fingerprint)
    except NotFoundError:
        return None
    return next((c for c in candidates if c.stats_oid == oid), None)


def release_from_masks(
    ws: Workspace,
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
        matches = [m for m in ws.registry.list_masks(concept) if m.artifact_oid == oid]
        if not matches:
            raise InvalidArgumentError(
                f"{source} is not a registered mask of concept {concept!r} in this registry "
                f"(rerun its mask step, e.g. `dvc repro --force --single-item mask@{concept}`)"
            )
        entries.append(matches[0])  # the oldest version with this content, as get_or_add_mask reuses it
    unique = list({entry.id: entry for entry in entries}.values())
    release, created = ws.registry.get_or_compose(name, unique, notes, dvc_stage=dvc_stage, git_rev=git_rev)
    ordered = sorted(unique, key=lambda entry: release.member_ids.index(entry.id))
    return ReleaseResult(release, tuple(ordered), ws.registry.store.get(release.union_oid), reused=not created)
