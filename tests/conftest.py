"""Shared fixtures: tiny random pipelines (no download) and literal reference implementations.

Heavy imports (diffusers, transformers) happen inside the fixtures, so test modules that do not
use them do not pay for them.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pipeline():
    """Factory ``tiny_pipeline(architecture="sd", seed=0, dtype=None)`` -> a fresh, private pipeline.

    Every call returns an independent deep copy of a session-cached template (building is cheap,
    but copying is cheaper and keeps the weights identical across tests), in eval mode, with the
    progress bar off. Tests may modify the returned pipeline freely.
    """
    from cpreg.tiny import build_tiny_pipeline

    templates: dict[tuple[str, int], object] = {}

    def make(architecture: str = "sd", seed: int = 0, dtype: torch.dtype | None = None):
        key = (architecture, seed)
        if key not in templates:
            templates[key] = build_tiny_pipeline(architecture, seed=seed)
        pipe = copy.deepcopy(templates[key])
        if dtype is not None:
            pipe.to(dtype=dtype)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def shared_tiny_sd(tiny_pipeline):
    """One tiny SD pipeline shared by read-only tests (never modify its weights)."""
    return tiny_pipeline("sd")


def all_parameters(pipe) -> dict[str, torch.Tensor]:
    """Clone of every parameter and buffer of every ``nn.Module`` component of ``pipe``."""
    state = {}
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, tensor in module.state_dict(keep_vars=False).items():
                state[f"{component}.{name}"] = tensor.detach().clone()
    return state


@pytest.fixture(scope="session")
def snapshot_parameters():
    """``snapshot(pipe)`` -> ``{"component.param": tensor}`` clone of all weights and buffers."""
    return all_parameters


def literal_skill_counts(weight: torch.Tensor, target_norms: torch.Tensor, reference_norms: torch.Tensor, skill_ratio: float,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The spec's selection, written out: a full descending argsort of every row at every step.

    Scores are products in ``dtype`` (float32, or float16 as the reference code). Returns int64
    ``[out, in]``: in how many of the given steps each weight was skilled.
    """
    absolute = weight.detach().abs().to(dtype)
    out_features, in_features = absolute.shape
    k = math.floor(skill_ratio * in_features)
    counts = torch.zeros(out_features, in_features, dtype=torch.int64)
    for step in range(target_norms.shape[0]):
        target_scores = absolute * target_norms[step].to(dtype)  # S*[i, j] = |W[i, j]| N*[j]
        reference_scores = absolute * reference_norms[step].to(dtype)  # S[i, j] = |W[i, j]| N[j]
        for row in range(out_features):
            order = torch.argsort(target_scores[row], descending=True, stable=True)
            for column in order[:k].tolist():
                if target_scores[row, column] > reference_scores[row, column]:
                    counts[row, column] += 1
    return counts


def literal_mask(stats, weights, skill_ratio: float, tau: int, select_ratio: float = 0.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (dense bool mask, int64 step counts)}``: mask = count > select_ratio * tau, scored in the statistics' dtype."""
    result = {}
    for name, target in stats.target.items():
        counts = literal_skill_counts(weights[name], target[:tau].sqrt(), stats.reference[name][:tau].sqrt(), skill_ratio,
                                      stats.config.stats_dtype.torch_dtype)
        result[name] = (counts > select_ratio * tau, counts)
    return result


@pytest.fixture(scope="session")
def literal_selection():
    """``literal_selection(stats, weights, skill_ratio, tau, select_ratio=0.0)``, see :func:`literal_mask`."""
    return literal_mask


def literal_statistics(pipe, targets, references, *, steps, tau, guidance_scale, seed, drop_unconditional=False,
                       dtype=torch.float64):
    """The spec's calibration, written out slowly: sums of squares ``[tau, inner]`` per layer.

    One pipeline call per prompt, the full loop of ``steps`` denoising steps, the global RNG
    re-seeded with ``torch.manual_seed(seed)`` before every prompt and no generator passed. A
    forward hook on the *output* of every FeedForward's ``net.0`` (GEGLU in UNets, GELU in SD3)
    records X; denoiser calls are counted as steps; rows (every token of every batch row) are
    L2-normalised and their squares summed per column in ``dtype``. ``dtype=torch.float16`` is
    the reference code's arithmetic instead: X and its normalisation in fp16, and per call the
    column norms ``n`` of the rows accumulated as norms, ``c = n`` then ``c = sqrt(c² + n²)`` in
    fp16 (its ``ColumnNormCalculator``), reported as ``c²``. Returns ``{"target": {...},
    "reference": {...}}`` keyed by the ``net.2`` path the statistics belong to.
    ``drop_unconditional`` (only to show a test can tell the difference) keeps the conditional
    half of the guidance batch.
    """
    from diffusers.models.attention import FeedForward

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    first_layers = {
        f"{name}.net.2": module.net[0] for name, module in denoiser.named_modules() if isinstance(module, FeedForward)
    }
    sums = {"target": {}, "reference": {}}
    norms = {"target": {}, "reference": {}}  # float16: the reference's running column norms per (layer, step)
    state = {"calls": 0, "set": None}

    def count_call(module, args, kwargs):
        state["calls"] += 1

    def record(layer):
        def hook(module, args, output):
            step = state["calls"] - 1  # the denoiser call this activation belongs to
            if step >= tau:
                return
            x = output.detach().to(dtype)
            if drop_unconditional and guidance_scale > 1:
                x = x[x.shape[0] // 2 :]
            rows = x.reshape(-1, x.shape[-1])
            rows = rows / rows.norm(dim=1, keepdim=True)
            if dtype is torch.float16:
                new, running = rows.norm(dim=0), norms[state["set"]].get((layer, step))
                norms[state["set"]][layer, step] = new if running is None else (running.square() + new.square()).sqrt()
                return
            table = sums[state["set"]]
            table.setdefault(layer, torch.zeros(tau, rows.shape[1], dtype=dtype))
            table[layer][step] += rows.square().sum(0)

        return hook

    handles = [denoiser.register_forward_pre_hook(count_call, with_kwargs=True)]
    handles += [module.register_forward_hook(record(layer)) for layer, module in first_layers.items()]
    try:
        for kind, prompts in (("target", targets), ("reference", references)):
            for prompt in prompts:
                state["calls"], state["set"] = 0, kind
                torch.manual_seed(seed)
                pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent")
                assert state["calls"] == steps  # the full loop ran
    finally:
        for handle in handles:
            handle.remove()
    for kind, running in norms.items():
        for (layer, step), column_norms in running.items():
            sums[kind].setdefault(layer, torch.zeros(tau, column_norms.shape[0], dtype=dtype))[step] = column_norms.square()
    return sums


@pytest.fixture(scope="session")
def literal_calibration():
    """``literal_calibration(pipe, targets, references, *, steps, tau, guidance_scale, seed, dtype)``, see :func:`literal_statistics`."""
    return literal_statistics


@pytest.fixture
def home(template, tmp_path) -> Path:
    """A private copy of the requesting module's ``template`` workspace: its ``.cpreg`` and ``prompts`` folders."""
    workspace = tmp_path / "ws" / ".cpreg"
    shutil.copytree(template, workspace)
    shutil.copytree(template.parent / "prompts", tmp_path / "prompts")
    return workspace
