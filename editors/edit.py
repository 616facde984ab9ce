"""A reversible sparse edit: prune the masked weights of a live pipeline, and undo it exactly.

Only the masked entries and their original values are held, like a PEFT adapter holds only its
delta. ``restore()`` writes the saved values back, so weights are bit-identical afterwards.

Applied edits form a stack on the component they change (the ``unet`` or ``text_encoder``
module, where the weights are; PEFT likewise records ``merged_adapters`` on each layer): edits
are undone last in, first out, a mask whose positions are already applied is refused, and
:func:`active_edits` lists what is applied. Pipelines that share a component share its stack.
See docs/editing.md.

Example:
    >>> with apply_mask(pipe, mask, label="nudity@3"):
    ...     erased = pipe("a photo of a naked man").images[0]
    >>> original = pipe("a photo of a naked man").images[0]  # weights restored
    >>> edit = switch(pipe, release, label="safe-v1@2", fill="noise")  # restore all, then apply
    >>> active_edits(pipe)
    [ActiveEdit(label='safe-v1@2', component='unet', masked=1559935, fill=<Fill.NOISE: 'noise'>)]
    >>> restore_all(pipe)  # the base weights, bit for bit
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import CpregError
from .hooks import component_module
from .mask import ConceptMask
from .options import Fill


class MaskMismatchError(CpregError, ValueError):
    """The mask's layers or shapes do not match the model."""


class EditStackError(CpregError, RuntimeError):
    """An edit that would corrupt the weights: restored out of order, or its mask already applied."""


@dataclass(frozen=True)
class ActiveEdit:
    """One applied edit as :func:`active_edits` lists it.

    Attributes:
        label: the name given on apply (``cpreg`` uses the registry ref, ``safe-v1@2``), or None.
        component: the pipeline component whose weights it changed (``unet``...).
        masked: how many weights it overwrote; fill: with what.
    """

    label: str | None
    component: str
    masked: int
    fill: Fill

    def __str__(self) -> str:
        name = "an unlabelled edit" if self.label is None else repr(self.label)
        return f"{name} ({self.masked:,} weights of the {self.component}, {self.fill.value} fill)"


@dataclass
class _SavedLayer:
    weight: nn.Parameter
    indices: torch.Tensor
    original: torch.Tensor

    @torch.no_grad()
    def write_back(self) -> None:
        self.weight.view(-1).index_copy_(0, self.indices, self.original)


_STACK = "_cpreg_edits"  # attribute of an edited component module: its MaskEdits, bottom to top
_APPLY_ORDER = itertools.count()  # orders the edits of different components in active_edits
_DEVICE_INDICES = WeakIdKeyDictionary()  # a mask's CPU indices -> {device: the same indices there}
_CPU_REGION = 1 << 20  # weights (4 MB in fp32) restored, read and overwritten together on the CPU


class MaskEdit:
    """Handle of an applied mask: ``restore()`` undoes it; also a context manager.

    Attributes:
        mask: the applied mask; label: its name in :func:`active_edits` and in errors;
        fill: what the masked weights became; active: True until restored.
    """

    def __init__(self, mask: ConceptMask, label: str | None, fill: Fill, stack: list[MaskEdit], saved: list[_SavedLayer]) -> None:
        self.mask = mask
        self.label = label
        self.fill = fill
        self.active = True
        self._stack = stack
        self._saved = saved
        self._order = next(_APPLY_ORDER)

    @property
    def info(self) -> ActiveEdit:
        return ActiveEdit(self.label, self.mask.component, self.mask.num_masked, self.fill)

    def __repr__(self) -> str:
        return f"<MaskEdit {self.info}{'' if self.active else ', restored'}>"

    def restore(self) -> None:
        """Write the original values back; a no-op once restored.

        Raises:
            EditStackError: an edit of the same component applied after this one is still
                applied (restore that one first, or everything with :func:`restore_all`).
        """
        if not self.active:
            return
        top = self._stack[-1]
        if top is not self:
            raise EditStackError(
                f"cannot restore {self.info}: {top.info} was applied after it and is still applied;"
                " restore that one first, or everything with restore_all(pipe)"
            )
        for layer in self._pop():
            layer.write_back()

    def _pop(self) -> list[_SavedLayer]:
        """Take this edit, the top of its stack, off it; the caller writes the returned values back."""
        assert self._stack[-1] is self
        self._stack.pop()
        saved, self._saved, self.active = self._saved, [], False
        return saved

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


def apply_mask(
    pipe,
    mask: ConceptMask,
    *,
    label: str | None = None,
    fill: Fill | str = Fill.ZERO,
    noise_scale: float = 0.1,
    seed: int = 0,
) -> MaskEdit:
    """Prune ``mask``'s weights of ``pipe`` in place, on top of the edits already applied.

    The whole mask is checked against the model before any weight changes. Returns the handle
    that restores the weights (``restore()``, or use it as a context manager).

    Args:
        label: the edit's name in :func:`active_edits` and in errors (a registry ref...).
        fill: ``"zero"`` or ``"noise"`` (see :class:`Fill`).
        noise_scale: noise std relative to each layer's weight std (``fill="noise"`` only).
        seed: seed of the noise (a CPU generator, so every device writes the same values).

    Raises:
        MaskMismatchError: the mask's layers or shapes are not the model's.
        EditStackError: an applied edit has exactly the positions of ``mask`` (the same mask,
            whatever its fill or label): applying it again is refused.
    """
    fill = Fill(fill)
    return _push(pipe, mask, check_mask_matches(pipe, mask), label, fill, noise_scale, seed, {})


def switch(
    pipe,
    mask: ConceptMask,
    *,
    label: str | None = None,
    fill: Fill | str = Fill.ZERO,
    noise_scale: float = 0.1,
    seed: int = 0,
) -> MaskEdit:
    """Restore every edit of ``pipe``, then apply ``mask``: what a generation server does per request.

    ``mask`` is checked against the model first, so one that does not fit raises
    :class:`MaskMismatchError` with the current edits still applied. Arguments as in
    :func:`apply_mask`. Not thread-safe: hold one lock around ``switch`` and the generation.

    Example:
        >>> with lock:
        ...     switch(pipe, masks[request.ref], label=request.ref)
        ...     image = pipe(request.prompt).images[0]
    """
    fill = Fill(fill)
    weights = check_mask_matches(pipe, mask)
    # Every edit comes off, top first; the layers the new mask edits too are written back during
    # the apply, region by region (see _rewrite), the others now.
    edited = {id(weight) for weight in weights.values()}
    deferred: dict[int, list[_SavedLayer]] = {}
    for edit in reversed(_applied_edits(pipe)):
        for layer in edit._pop():
            if id(layer.weight) in edited:
                deferred.setdefault(id(layer.weight), []).append(layer)
            else:
                layer.write_back()
    return _push(pipe, mask, weights, label, fill, noise_scale, seed, deferred)


def active_edits(pipe) -> list[ActiveEdit]:
    """The edits applied to ``pipe``'s components, first applied (bottom) to last (top)."""
    return [edit.info for edit in _applied_edits(pipe)]


def restore_all(pipe) -> None:
    """Restore every edit of ``pipe``, top to bottom: the weights are the base ones again, bit for bit."""
    for edit in reversed(_applied_edits(pipe)):
        edit.restore()


def _applied_edits(pipe) -> list[MaskEdit]:
    modules = {id(module): module for module in pipe.components.values() if isinstance(module, nn.Module)}
    edits = [edit for module in modules.values() for edit in vars(module).get(_STACK, ())]
    return sorted(edits, key=lambda edit: edit._order)


def _same_positions(a: ConceptMask, b: ConceptMask) -> bool:
    """True when ``a`` and ``b`` overwrite exactly the same weights (step counts aside)."""
    positions_a = {name: layer.indices for name, layer in a.layers.items() if layer.count}
    positions_b = {name: layer.indices for name, layer in b.layers.items() if layer.count}
    return positions_a.keys() == positions_b.keys() and all(
        torch.equal(indices, positions_b[name]) for name, indices in positions_a.items()
    )


def _indices_on(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``indices`` on ``device``, copied there once per mask and device rather than on every apply."""
    if indices.device == device:
        return indices
    copies = _DEVICE_INDICES.setdefault(indices, {})
    if device not in copies:
        copies[device] = indices.to(device)
    return copies[device]


def _region_starts(weight: torch.Tensor, indices: torch.Tensor) -> list[int]:
    """Offsets into the sorted ``indices`` where each region of the flat weight starts, and the end.

    Regions are ``_CPU_REGION`` weights long on the CPU; elsewhere the whole weight is one region.
    """
    if weight.device.type != "cpu":
        return [0, indices.numel()]
    bounds = torch.arange(_CPU_REGION, max(weight.numel(), _CPU_REGION), _CPU_REGION, device=indices.device)
    return [0, *torch.searchsorted(indices, bounds).tolist(), indices.numel()]


def _rewrite(weight: torch.Tensor, restores: list[_SavedLayer], indices: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
    """Write ``restores`` back (top first), then save ``weight``'s ``indices`` and write zeros (or
    ``noise``) there; returns the saved values.

    Done region by region of the weight: every position sees the same writes and reads in the
    same order as whole-layer passes would make, while the region just restored and read is
    still in the cache when it is overwritten (15-30% less time per switch on the CPU,
    docs/benchmarks.md).
    """
    flat = weight.view(-1)
    original = torch.empty(indices.numel(), dtype=flat.dtype, device=flat.device)
    restore_starts = [_region_starts(weight, layer.indices) for layer in restores]
    starts = _region_starts(weight, indices)
    for region in range(len(starts) - 1):
        for layer, bounds in zip(restores, restore_starts):
            part = slice(bounds[region], bounds[region + 1])
            flat.index_copy_(0, layer.indices[part], layer.original[part])
        part = slice(starts[region], starts[region + 1])
        torch.index_select(flat, 0, indices[part], out=original[part])
        if noise is None:
            flat.index_fill_(0, indices[part], 0)
        else:
            flat.index_copy_(0, indices[part], noise[part])
    return original


@torch.no_grad()
def _push(pipe, mask: ConceptMask, weights: dict[str, nn.Parameter], label: str | None, fill: Fill,
          noise_scale: float, seed: int, deferred: dict[int, list[_SavedLayer]]) -> MaskEdit:
    """Overwrite ``mask``'s positions of the checked ``weights``; put the edit on its component's stack.

    ``deferred``: per ``id(weight)``, saved values of edits already taken off their stacks, to
    write back (top first) before the weight is overwritten.
    """
    stack: list[MaskEdit] = vars(component_module(pipe, mask.component)).setdefault(_STACK, [])
    for edit in stack:
        if edit.mask is mask or _same_positions(edit.mask, mask):
            name = "this mask" if label is None else repr(label)
            raise EditStackError(
                f"cannot apply {name}: {edit.info} with the same positions is already applied;"
                " restore it first, or use switch(pipe, mask)"
            )
    generator = torch.Generator("cpu").manual_seed(seed)
    saved = []
    for name in sorted(mask.layers):
        weight = weights[name]
        indices = _indices_on(mask.layers[name].indices, weight.device)
        restores, noise = deferred.get(id(weight), []), None
        if fill is Fill.NOISE:  # the noise scale is the std of the weight with the edits restored
            for layer in restores:
                layer.write_back()
            restores = []
            std = weight.float().std().item() * noise_scale
            noise = (torch.randn(indices.numel(), generator=generator) * std).to(device=weight.device, dtype=weight.dtype)
        saved.append(_SavedLayer(weight, indices, _rewrite(weight, restores, indices, noise)))
    edit = MaskEdit(mask, label, fill, stack, saved)
    stack.append(edit)
    return edit
