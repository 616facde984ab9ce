"""Skilled-neuron selection: Wanda scores, per-step skilled sets, and their union over tau steps.

For step ``t`` and layer weight ``W [out, in]``: ``S*[i, j] = |W[i, j]| * N*[t, j]`` (target) and
``S[i, j] = |W[i, j]| * N[t, j]`` (reference). Weight ``(i, j)`` is *skilled* at ``t`` when ``j``
is among the ``k = floor(skill_ratio * in)`` largest entries of row ``i`` of ``S*`` and
``S*[i, j] > S[i, j]``. The mask keeps weights skilled in more than ``select_ratio * tau`` of
the first ``tau`` steps.

Example:
    >>> weights = {name: m.weight for name, m in hooked_layers(pipe, "ffn_out").modules.items()}
    >>> mask = derive_mask(stats, weights, skill_ratio=0.01, tau=10)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import InvalidArgumentError
from .mask import ConceptMask, LayerMask
from .stats import ActivationStats


def skill_counts(
    weight: torch.Tensor,
    target_norms: torch.Tensor,
    reference_norms: torch.Tensor,
    skill_ratio: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Number of steps in which each weight is skilled: uint8 ``[out, in]``, on ``weight``'s device.

    Args:
        weight: the layer weight ``[out, in]`` (any float dtype).
        target_norms / reference_norms: ``N*`` and ``N``, ``[steps, in]``; every step is counted.
        skill_ratio: fraction of each row's inputs kept by the top-k.
        dtype: the scores' dtype: fp32, or fp16 as the reference code (products, top-k and the
            comparison rounded to fp16).

    Only the ``k`` top entries of each row are compared with the reference score, and they are
    scattered into the counts: no full sort, no dense per-step mask.
    """
    absolute = weight.detach().abs().to(dtype)
    target_norms = target_norms.to(device=absolute.device, dtype=dtype)
    reference_norms = reference_norms.to(device=absolute.device, dtype=dtype)
    k = math.floor(skill_ratio * absolute.shape[1])
    counts = torch.zeros(absolute.shape, dtype=torch.uint8, device=absolute.device)
    if k == 0:
        return counts
    for step in range(target_norms.shape[0]):
        top_scores, columns = torch.topk(absolute * target_norms[step], k, dim=1, sorted=False)
        reference_scores = absolute.gather(1, columns) * reference_norms[step][columns]
        counts.scatter_add_(1, columns, (top_scores > reference_scores).to(torch.uint8))
    return counts


def check_selection(
    skill_ratio: float | None = None, select_ratio: float = 0.0, tau: int | None = None, *, calibrated_tau: int | None = None
) -> None:
    """Refuse selection parameters :func:`derive_mask` cannot use, before any model run or scoring.

    Parameters given as ``None`` are not checked.

    Example:
        >>> check_selection(0.02, 0.0, tau=12, calibrated_tau=10)
        Traceback (most recent call last):
        cpreg.errors.InvalidArgumentError: tau must be in [1, 10] (the calibrated steps), got 12
    """
    if skill_ratio is not None and not 0.0 < skill_ratio <= 1.0:
        raise InvalidArgumentError(f"skill_ratio must be in (0, 1], got {skill_ratio}")
    if not 0.0 <= select_ratio < 1.0:
        raise InvalidArgumentError(f"select_ratio must be in [0, 1), got {select_ratio}")
    if tau is not None and calibrated_tau is not None and not 1 <= tau <= calibrated_tau:
        raise InvalidArgumentError(f"tau must be in [1, {calibrated_tau}] (the calibrated steps), got {tau}")
    if tau is not None and tau > 255:
        raise InvalidArgumentError("tau above 255 does not fit the uint8 step counts")


def derive_mask(
    stats: ActivationStats,
    weights: Mapping[str, torch.Tensor],
    skill_ratio: float,
    tau: int | None = None,
    select_ratio: float = 0.0,
    device: torch.device | str | None = None,
) -> ConceptMask:
    """Derive a mask from stored statistics and the hooked layers' weights.

    Args:
        stats: calibration statistics (any tau up to the calibrated one can be used).
        weights: layer path -> weight ``[out, in]``; must cover every layer of ``stats``.
        skill_ratio: in (0, 1]; the paper uses 0.01 (styles) and 0.02 (objects).
        tau: number of first steps to use; default all calibrated steps.
        select_ratio: in [0, 1); 0 takes the union over the ``tau`` steps.
        device: where to score (default: the weights' device; pass ``"cuda"`` for speed).

    Scores are computed in the statistics' dtype (``stats.config.stats_dtype``: fp32, or fp16 as
    the reference code).
    """
    tau = stats.recorded_steps if tau is None else tau
    check_selection(skill_ratio, select_ratio, tau, calibrated_tau=stats.recorded_steps)
    target_norms, reference_norms = stats.target_norms(), stats.reference_norms()
    scores_dtype = stats.config.stats_dtype.torch_dtype
    layers = {}
    for name, shape in stats.layer_shapes.items():
        if name not in weights:
            raise InvalidArgumentError(f"no weight given for layer `{name}`")
        weight = weights[name]
        if tuple(weight.shape) != tuple(shape):
            raise InvalidArgumentError(f"layer `{name}`: weight shape {tuple(weight.shape)} != calibrated {tuple(shape)}")
        if device is not None:
            weight = weight.to(device)
        counts = skill_counts(weight, target_norms[name][:tau], reference_norms[name][:tau], skill_ratio, scores_dtype)
        layers[name] = LayerMask.from_counts(counts, select_ratio * tau)
    return ConceptMask(
        layers=layers,
        hook=stats.config.hook.value,
        component=stats.component,
        fingerprint=stats.fingerprint,
        component_params=stats.component_params,
        params={"skill_ratio": skill_ratio, "tau": tau, "select_ratio": select_ratio},
    )
