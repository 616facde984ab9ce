"""A reversible sparse edit: prune the masked weights of a live pipeline, and undo it exactly.

Only the masked entries and their original values are held, like a PEFT adapter holds only its
delta. ``restore()`` writes the saved values back, so weights are bit-identical afterwards.

Example:
    >>> with apply_mask(pipe, mask):
    ...     erased = pipe("a photo of a naked man").images[0]
    >>> original = pipe("a photo of a naked man").images[0]  # weights restored
    >>> handle = apply_mask(pipe, mask, fill="noise")  # hide the pruned positions
    >>> handle.restore()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CpregError
from .hooks import component_module
from .mask import ConceptMask
from .options import Fill


class MaskMismatchError(CpregError, ValueError):
    """The mask's layers or shapes do not match the model."""


@dataclass
class _SavedLayer:
    weight: nn.Parameter
    indices: torch.Tensor
    original: torch.Tensor


class MaskEdit:
    """Handle of an applied mask: ``restore()`` undoes it; also a context manager."""

    def __init__(self, saved: list[_SavedLayer]) -> None:
        self._saved = saved
        self.active = True

    @torch.no_grad()
    def restore(self) -> None:
        """Write the original values back (idempotent)."""
        if not self.active:
            return
        for layer in reversed(self._saved):
            layer.weight.view(-1)[layer.indices] = layer.original
        self._saved = []
        self.active = False

    def __enter__(self) -> MaskEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def check_mask_matches(pipe, mask: ConceptMask) -> dict[str, nn.Parameter]:
    """The weights the mask edits, or :class:`MaskMismatchError` naming the first mismatch."""
    try:
        root = component_module(pipe, mask.component)
    except ValueError as error:
        raise MaskMismatchError(f"mask edits `{mask.component}`: {error}") from None
    weights = {}
    for name, layer in mask.layers.items():
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise MaskMismatchError(f"mask layer `{name}` does not exist in the model's {mask.component}") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(layer.shape):
            shape = None if weight is None else tuple(weight.shape)
            raise MaskMismatchError(f"mask layer `{name}` has shape {tuple(layer.shape)}, the model's is {shape}")
        if not weight.is_contiguous():
            raise MaskMismatchError(f"layer `{name}` has a non-contiguous weight")
        weights[name] = weight
    return weights


@torch.no_grad()
def apply_mask(
    pipe,
    mask: ConceptMask,
    *,
    fill: Fill | str = Fill.ZERO,
    noise_scale: float = 0.1,
    seed: int = 0,
) -> MaskEdit:
    """Prune ``mask``'s weights of ``pipe`` in place; return the handle that restores them.

    The whole mask is checked against the model before any weight changes.

    Args:
        fill: ``"zero"`` or ``"noise"`` (see :class:`Fill`).
        noise_scale: noise std relative to each layer's weight std (``fill="noise"`` only).
        seed: seed of the noise (a CPU generator, so every device writes the same values).
    """
    fill = Fill(fill)
    weights = check_mask_matches(pipe, mask)
    generator = torch.Generator("cpu").manual_seed(seed)
    saved = []
    for name in sorted(mask.layers):
        layer, weight = mask.layers[name], weights[name]
        indices = layer.indices.to(weight.device)
        flat = weight.view(-1)
        saved.append(_SavedLayer(weight, indices, flat[indices].clone()))
        if fill is Fill.ZERO:
            flat[indices] = 0
        else:
            std = weight.float().std().item() * noise_scale
            noise = torch.randn(layer.count, generator=generator) * std
            flat[indices] = noise.to(device=weight.device, dtype=weight.dtype)
    return MaskEdit(saved)
