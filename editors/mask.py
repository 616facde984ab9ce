"""Sparse skilled-neuron masks: the positions to prune, per layer, and how often each was skilled.

A :class:`ConceptMask` holds, for every hooked layer, the sorted flat indices of the masked
weights into ``weight.view(-1)`` and, for each, the number of the first ``tau`` steps in which it
was skilled (so a stricter ``select_ratio`` can be applied later without the statistics).

Example:
    >>> mask = derive_mask(stats, layer_weights, skill_ratio=0.01)
    >>> mask.num_masked, mask.fraction
    (1003520, 0.00117)
    >>> both = union([nudity_mask, van_gogh_mask])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class LayerMask:
    """Masked positions of one ``[out_features, in_features]`` weight.

    ``indices``: int64, strictly increasing flat indices; ``skill_counts``: uint8, same length, >= 1:
    in how many of the first ``tau`` steps each weight was skilled (the ``steps`` column of the files).
    """

    shape: tuple[int, int]
    indices: torch.Tensor
    skill_counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dtype != torch.int64 or self.skill_counts.dtype != torch.uint8:
            raise InvalidArgumentError("LayerMask needs int64 indices and uint8 skill_counts")
        if self.indices.shape != self.skill_counts.shape or self.indices.dim() != 1:
            raise InvalidArgumentError("LayerMask indices and skill_counts must be 1-D of equal length")
        size = self.shape[0] * self.shape[1]
        if len(self.indices) and (
            self.indices[0] < 0 or self.indices[-1] >= size or bool((self.indices[1:] <= self.indices[:-1]).any())
        ):
            raise InvalidArgumentError(f"LayerMask indices must be strictly increasing within [0, {size})")

    @classmethod
    def from_counts(cls, counts: torch.Tensor, threshold: float = 0.0) -> LayerMask:
        """Mask the positions of a ``[out, in]`` step-count tensor whose count exceeds ``threshold``."""
        flat = counts.reshape(-1)
        indices = torch.nonzero(flat > threshold).squeeze(1)
        return cls(tuple(counts.shape), indices.cpu(), flat[indices].to(torch.uint8).cpu())

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def dense(self) -> torch.Tensor:
        """Boolean ``[out, in]`` tensor, True where pruned."""
        out = torch.zeros(self.size, dtype=torch.bool)
        out[self.indices] = True
        return out.view(self.shape)

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of every masked weight."""
        return self.indices // self.shape[1], self.indices % self.shape[1]

    def equals(self, other: LayerMask) -> bool:
        return (
            self.shape == other.shape
            and torch.equal(self.indices, other.indices)
            and torch.equal(self.skill_counts, other.skill_counts)
        )


@dataclass(frozen=True)
class ConceptMask:
    """A skilled-neuron mask over every layer of one hook point of one base model.

    Attributes:
        layers: layer path -> :class:`LayerMask` (layers with nothing masked are kept, empty).
        hook: hook point value (``ffn_out``...); ``component``: pipeline attribute (``unet``...).
        fingerprint: base-model fingerprint, see :func:`~cpreg.editors.fingerprint.model_fingerprint`.
        component_params: number of weights of the component (denominator of ``fraction``).
        params: how the mask was made (``skill_ratio``, ``tau``, ``select_ratio``...), JSON-able.
    """

    layers: dict[str, LayerMask]
    hook: str
    component: str
    fingerprint: str | None
    component_params: int
    params: dict = field(default_factory=dict)

    @property
    def num_masked(self) -> int:
        return sum(layer.count for layer in self.layers.values())

    @property
    def fraction(self) -> float:
        """Masked weights over all weights of the component (the paper's "% of UNet weights")."""
        return self.num_masked / self.component_params if self.component_params else 0.0

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: layer.shape for name, layer in self.layers.items()}

    def counts(self) -> dict[str, int]:
        """Masked weights per layer."""
        return {name: layer.count for name, layer in self.layers.items()}

    def report(self) -> dict:
        """Per-layer and total counts, densities and the fraction of all component weights."""
        return {
            "layers": {
                name: {"masked": layer.count, "weights": layer.size, "density": layer.count / layer.size}
                for name, layer in self.layers.items()
            },
            "masked": self.num_masked,
            "hooked_weights": sum(layer.size for layer in self.layers.values()),
            "component_weights": self.component_params,
            "fraction": self.fraction,
        }

    def with_select_ratio(self, select_ratio: float) -> ConceptMask:
        """Keep only weights skilled in more than ``select_ratio * tau`` steps.

        Raises:
            ValueError: ``select_ratio`` is outside [0, 1) (as in ``derive_mask``) or below the
                mask's own, or the mask records no ``tau`` (a union of masks).
        """
        from .select import check_selection  # select imports this module

        check_selection(select_ratio=select_ratio)
        if "tau" not in self.params:
            raise InvalidArgumentError("this mask records no tau (a union of masks?): derive it again to change select_ratio")
        tau = int(self.params["tau"])
        if select_ratio < float(self.params.get("select_ratio", 0.0)):
            raise InvalidArgumentError("a stored mask can only be made stricter (higher select_ratio)")
        layers = {}
        for name, layer in self.layers.items():
            keep = layer.skill_counts.to(torch.float32) > select_ratio * tau
            layers[name] = LayerMask(layer.shape, layer.indices[keep], layer.skill_counts[keep])
        return replace(self, layers=layers, params={**self.params, "select_ratio": select_ratio})

    def equals(self, other: ConceptMask) -> bool:
        return (
            self.layers.keys() == other.layers.keys()
            and all(layer.equals(other.layers[name]) for name, layer in self.layers.items())
            and (self.hook, self.component, self.fingerprint) == (other.hook, other.component, other.fingerprint)
        )


def check_compatible(masks: Sequence[ConceptMask], labels: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the first mask whose base model, hook point or layers differ."""
    if not masks:
        raise InvalidArgumentError("no masks given")
    labels = list(labels) if labels is not None else [f"mask #{i}" for i in range(len(masks))]
    first = masks[0]
    for mask, label in zip(masks[1:], labels[1:]):
        for what in ("fingerprint", "hook", "component"):
            if getattr(mask, what) != getattr(first, what):
                raise InvalidArgumentError(
                    f"{label} has {what} {getattr(mask, what)!r}, {labels[0]} has {getattr(first, what)!r}"
                )
        if mask.layer_shapes() != first.layer_shapes():
            raise InvalidArgumentError(f"{label} has other layers or shapes than {labels[0]}")


def union(masks: Sequence[ConceptMask], labels: Sequence[str] | None = None) -> ConceptMask:
    """Element-wise OR of compatible masks; each position keeps its largest step count.

    The result does not depend on the order of ``masks``.
    """
    check_compatible(masks, labels)
    first = masks[0]
    layers = {}
    for name, layer in first.layers.items():
        indices = torch.cat([mask.layers[name].indices for mask in masks])
        counts = torch.cat([mask.layers[name].skill_counts for mask in masks])
        unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        merged = torch.zeros(unique.shape, dtype=torch.uint8).scatter_reduce(0, inverse, counts, reduce="amax")
        layers[name] = LayerMask(layer.shape, unique, merged)
    return ConceptMask(
        layers=layers,
        hook=first.hook,
        component=first.component,
        fingerprint=first.fingerprint,
        component_params=first.component_params,
        params={"union_of": len(masks)},
    )


def overlap(a: ConceptMask, b: ConceptMask) -> dict:
    """Per-layer and total counts, intersection and IoU of two compatible masks."""
    check_compatible([a, b], ["A", "B"])
    layers = {}
    for name, layer in a.layers.items():
        other = b.layers[name]
        both = int(torch.isin(layer.indices, other.indices, assume_unique=True).sum())
        either = layer.count + other.count - both
        layers[name] = {"a": layer.count, "b": other.count, "both": both, "iou": both / either if either else 0.0}
    both = sum(row["both"] for row in layers.values())
    either = a.num_masked + b.num_masked - both
    return {"layers": layers, "a": a.num_masked, "b": b.num_masked, "both": both, "iou": both / either if either else 0.0}
