"""Compute masks: calibrate a concept on a base model, or derive a new mask from stored statistics.

The methods :meth:`Workspace.compute <cpreg.workspace.Workspace.compute>` and
:meth:`~cpreg.workspace.Workspace.derive` are these functions; they import torch and diffusers.

Example:
    >>> mask = ws.compute("nudity", model="tiny", config=CalibrationConfig(num_inference_steps=5, tau=2))
    >>> stricter = ws.derive(mask.ref, skill_ratio=0.02)  # no model run
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .catalog import ConceptSpec
from .distributed import distributed_calibrate, init_distributed, on_main_process
from .editors import ActivationStats, CalibrationConfig, check_selection, derive_mask, hooked_layers
from .errors import InvalidArgumentError
from .models import architecture_of, default_model, load_base_pipeline
from .registry import Calibration, Mask
from .registry.refs import validate_name
from .settings import library_versions

if TYPE_CHECKING:
    from .workspace import Workspace


def compute(
    ws: Workspace,
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
    spec = concept if isinstance(concept, ConceptSpec) else ws.concept_spec(concept)
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
        base = ws.registry.ensure_base_model(model, stats.fingerprint, architecture=architecture_of(pipe))
        concept_row = ws.ensure_concept(spec)
        calibration = add_calibration(ws, spec, stats, base, layers, duration, dvc_stage, git_rev)
        added = ws.registry.add_mask(
            concept_row, mask, base, calibration,
            description=description, dvc_stage=dvc_stage, git_rev=git_rev, reuse_existing=reuse_existing,
        )
        return [added.concept, added.version, added.base_model_fingerprint]

    concept_name, version, fingerprint = on_main_process(record)
    return ws.registry.resolve_mask(f"{concept_name}@{version}", base_model=fingerprint)


def add_calibration(ws: Workspace, spec: ConceptSpec, stats: ActivationStats, base, layers, duration: float,
                     dvc_stage: str | None, git_rev: str | None) -> Calibration:
    prompts = ws.registry.ensure_prompt_set(spec.targets, spec.references)
    parameter = next(iter(layers.modules.values())).weight
    return ws.registry.add_calibration(
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
    ws: Workspace,
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
    source = ws.registry.resolve_mask(ref)
    if source.calibration_id is None:
        raise InvalidArgumentError(f"{source.ref} has no stored calibration to derive from")
    calibration = ws.registry.get_calibration(source.calibration_id)
    stats = ws.registry.load_stats(calibration)
    pipe = ws.base_pipeline(source)
    layers = hooked_layers(pipe, calibration.hook)
    mask = derive_mask(
        stats,
        {n: m.weight for n, m in layers.modules.items()},
        skill_ratio,
        tau=tau,
        select_ratio=select_ratio,
        device=device,
    )
    return ws.registry.add_mask(
        source.concept, mask, source.base_model_fingerprint, calibration,
        description=description, dvc_stage=dvc_stage, git_rev=git_rev, reuse_existing=reuse_existing,
    )
