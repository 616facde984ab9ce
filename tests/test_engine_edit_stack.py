"""The stack of applied edits: any sequence of apply / restore / restore_all / switch is exact.

The property test replays random sequences on a tiny SD pipeline against a model of the stack
written here (a list in application order) and a literal replay of its masks on a copy of the
base weights; the other tests pin the errors and the sharing of components between pipelines.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from cpreg.editors import (
    ActiveEdit,
    ConceptMask,
    EditStackError,
    Fill,
    HookPoint,
    LayerMask,
    MaskMismatchError,
    active_edits,
    apply_mask,
    hooked_layers,
    restore_all,
    switch,
)
from cpreg.editors import edit as edit_module
from cpreg.editors.edit import _indices_on


def _mask(pipe, hook: HookPoint, positions: dict[str, torch.Tensor]) -> ConceptMask:
    """A mask of ``hook``'s layers with the given flat indices per layer (steps all 1)."""
    layers = hooked_layers(pipe, hook)
    mask_layers = {}
    for name, shape in layers.shapes().items():
        indices = positions[name].unique(sorted=True)
        mask_layers[name] = LayerMask(shape, indices, torch.ones(len(indices), dtype=torch.uint8))
    return ConceptMask(mask_layers, hook.value, layers.component, None, 10_000, {})


def _random_positions(pipe, hook: HookPoint, density: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.nonzero(torch.rand(rows * cols, generator=generator) < density).squeeze(1)
        for name, (rows, cols) in hooked_layers(pipe, hook).shapes().items()
    }


def _masks(pipe) -> dict[str, ConceptMask]:
    """Masks of the UNet and the text encoder that overlap, nest, and share positions.

    ``release`` and ``release-copy`` have the same positions (other step counts); ``member`` is
    inside ``release``; ``other`` overlaps both; ``text`` and ``text-wide`` overlap.
    """
    generator = torch.Generator().manual_seed(0)
    unet, text = HookPoint.FFN_OUT, HookPoint.TEXT_MLP
    release = _random_positions(pipe, unet, 0.3, generator)
    member = {name: indices[torch.rand(len(indices), generator=generator) < 0.5] for name, indices in release.items()}
    other = _random_positions(pipe, unet, 0.2, generator)
    text_small = _random_positions(pipe, text, 0.2, generator)
    text_more = _random_positions(pipe, text, 0.2, generator)
    masks = {
        "release": _mask(pipe, unet, release),
        "member": _mask(pipe, unet, member),
        "other": _mask(pipe, unet, other),
        "text": _mask(pipe, text, text_small),
        "text-wide": _mask(pipe, text, {name: torch.cat([text_small[name], text_more[name]]) for name in text_small}),
    }
    copy_layers = {name: LayerMask(layer.shape, layer.indices, layer.skill_counts + 1) for name, layer in masks["release"].layers.items()}
    masks["release-copy"] = ConceptMask(copy_layers, unet.value, "unet", None, 10_000, {})
    return masks


def _same_positions(name: str) -> str:
    """The test's own notion of "the same mask": names of masks with identical positions."""
    return "release" if name == "release-copy" else name


@torch.no_grad()
def _literal_state(base: dict[tuple[str, str], torch.Tensor], applied: list[dict]) -> dict[tuple[str, str], torch.Tensor]:
    """The base weights with ``applied`` replayed in order, written out: zero, or seeded noise
    of ``noise_scale`` (0.1) times the std of the weight as it was when the edit was applied."""
    state = {key: weight.clone() for key, weight in base.items()}
    for edit in applied:
        mask = edit["mask"]
        generator = torch.Generator().manual_seed(edit["seed"])
        for name in sorted(mask.layers):
            flat = state[(mask.component, name)].view(-1)
            indices = mask.layers[name].indices
            if edit["fill"] == "zero":
                flat[indices] = 0
            else:
                noise = torch.randn(len(indices), generator=generator) * (flat.float().std().item() * 0.1)
                flat[indices] = noise.to(flat.dtype)
    return state


def _weights_are(snapshot, pipe, expected: dict[str, torch.Tensor]) -> bool:
    """True when every weight and buffer of ``pipe`` equals ``expected`` (a snapshot) bit for bit."""
    now = snapshot(pipe)
    return now.keys() == expected.keys() and all(torch.equal(now[key], value) for key, value in expected.items())


def _edited_weights(pipe, masks) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (mask.component, name): getattr(pipe, mask.component).get_submodule(name).weight
        for mask in masks.values()
        for name in mask.layers
    }


@pytest.mark.parametrize(("seed", "dtype", "region"), [(0, torch.float32, None), (1, torch.float32, 100), (2, torch.bfloat16, 100)])
def test_random_sequences_of_edits_keep_the_literal_state(tiny_pipeline, snapshot_parameters, monkeypatch, seed, dtype, region):
    if region is not None:  # tiny layers are smaller than one CPU region: make regions small
        monkeypatch.setattr(edit_module, "_CPU_REGION", region)
    pipe = tiny_pipeline("sd", dtype=dtype)
    masks = _masks(pipe)
    everything = snapshot_parameters(pipe)
    weights = _edited_weights(pipe, masks)
    base = {key: weight.detach().clone() for key, weight in weights.items()}
    rng = random.Random(seed)
    applied: list[dict] = []  # the model of the stack: every active edit, in application order
    handles: list = []  # every handle ever returned, restored ones included
    outcomes = {"applied": 0, "switched": 0, "double apply refused": 0, "restored": 0, "out of order refused": 0,
                "already restored": 0, "restore_all": 0, "empty": 0}

    for step in range(250):
        action = rng.choices(["apply", "restore", "restore_all", "switch"], weights=[8, 6, 1, 2])[0]
        if action in ("apply", "switch"):
            name = rng.choice(sorted(masks))
            edit = {"mask": masks[name], "name": name, "label": f"{name}#{step}", "fill": rng.choice(["zero", "noise"]),
                    "seed": rng.randrange(3)}
            kwargs = {"label": edit["label"], "fill": edit["fill"], "seed": edit["seed"]}
            if action == "switch":
                handles.append(switch(pipe, masks[name], **kwargs))
                applied = [{**edit, "handle": handles[-1]}]
                outcomes["switched"] += 1
            else:
                twin = next((e for e in applied if _same_positions(e["name"]) == _same_positions(name)), None)
                if twin is None:
                    handles.append(apply_mask(pipe, masks[name], **kwargs))
                    applied.append({**edit, "handle": handles[-1]})
                    outcomes["applied"] += 1
                else:
                    with pytest.raises(EditStackError, match=re.escape(repr(twin["label"]))):
                        apply_mask(pipe, masks[name], **kwargs)
                    outcomes["double apply refused"] += 1
        elif action == "restore" and handles:  # mostly an active edit, sometimes any handle ever returned
            handle = rng.choice([e["handle"] for e in applied] if applied and rng.random() < 0.7 else handles)
            entry = next((e for e in applied if e["handle"] is handle), None)
            top = None if entry is None else [e for e in applied if e["mask"].component == entry["mask"].component][-1]
            if entry is None:
                handle.restore()
                outcomes["already restored"] += 1
            elif top is entry:
                handle.restore()
                applied = [e for e in applied if e is not entry]
                outcomes["restored"] += 1
            else:
                with pytest.raises(EditStackError, match=re.escape(repr(top["label"]))):
                    handle.restore()
                assert handle.active
                outcomes["out of order refused"] += 1
        elif action == "restore_all":
            restore_all(pipe)
            applied = []
            outcomes["restore_all"] += 1

        assert [entry.label for entry in active_edits(pipe)] == [e["label"] for e in applied], step
        assert all(e["handle"].active for e in applied)
        expected = _literal_state(base, applied)
        for key, weight in weights.items():
            assert torch.equal(weight, expected[key]), (step, action, key)
        if not applied:
            outcomes["empty"] += 1
            assert _weights_are(snapshot_parameters, pipe, everything), step
    assert all(count >= 3 for count in outcomes.values()), outcomes  # every branch was exercised


def test_applying_a_mask_twice_is_refused_and_changes_nothing(tiny_pipeline, snapshot_parameters):
    pipe = tiny_pipeline("sd")
    masks = _masks(pipe)
    apply_mask(pipe, masks["release"], label="safe-v1@1")
    before = snapshot_parameters(pipe)
    for twin, fill in ((masks["release"], "zero"), (masks["release"], "noise"), (masks["release-copy"], "zero")):
        with pytest.raises(EditStackError, match=r"cannot apply 'again': 'safe-v1@1' \(\d[\d,]* weights of the unet, zero fill\)"):
            apply_mask(pipe, twin, label="again", fill=fill)
    assert _weights_are(snapshot_parameters, pipe, before)
    assert active_edits(pipe) == [ActiveEdit("safe-v1@1", "unet", masks["release"].num_masked, Fill.ZERO)]


def test_out_of_order_restore_names_the_edit_on_top(tiny_pipeline, snapshot_parameters):
    pipe = tiny_pipeline("sd")
    masks = _masks(pipe)
    base = snapshot_parameters(pipe)
    release = apply_mask(pipe, masks["release"], label="safe-v1@1", fill="noise")
    member = apply_mask(pipe, masks["member"], label="nudity@2")
    text = apply_mask(pipe, masks["text"])  # another component: its own stack
    before = snapshot_parameters(pipe)
    with pytest.raises(EditStackError, match=r"cannot restore 'safe-v1@1' .*: 'nudity@2' \(.*\) was applied after it"):
        release.restore()
    assert release.active and _weights_are(snapshot_parameters, pipe, before)
    assert [entry.label for entry in active_edits(pipe)] == ["safe-v1@1", "nudity@2", None]
    member.restore()
    release.restore()  # the text encoder's edit is above, but touches other weights
    text.restore()
    text.restore()  # idempotent
    assert _weights_are(snapshot_parameters, pipe, base)
    assert active_edits(pipe) == []


def test_pipelines_sharing_a_component_share_its_stack(tiny_pipeline, snapshot_parameters):
    pipe = tiny_pipeline("sd")
    masks = _masks(pipe)
    base = snapshot_parameters(pipe)
    other = type(pipe)(**pipe.components)
    assert other.unet is pipe.unet
    edit = apply_mask(pipe, masks["release"], label="safe-v1@1")
    assert active_edits(other) == active_edits(pipe)
    with pytest.raises(EditStackError, match="safe-v1@1"):
        apply_mask(other, masks["release"])
    restore_all(other)
    assert not edit.active and active_edits(pipe) == []
    assert _weights_are(snapshot_parameters, pipe, base)


def test_switch_restores_everything_then_applies(tiny_pipeline, snapshot_parameters):
    pipe = tiny_pipeline("sd")
    masks = _masks(pipe)
    apply_mask(pipe, masks["release"], label="safe-v1@1")
    apply_mask(pipe, masks["text"], label="text")
    edit = switch(pipe, masks["member"], label="nudity@2", fill="noise")
    assert active_edits(pipe) == [ActiveEdit("nudity@2", "unet", masks["member"].num_masked, Fill.NOISE)]
    expected = snapshot_parameters(pipe)
    edit.restore()
    with apply_mask(pipe, masks["member"], fill="noise"):
        assert _weights_are(snapshot_parameters, pipe, expected)


def test_a_failed_switch_keeps_the_current_edit(tiny_pipeline, snapshot_parameters):
    pipe = tiny_pipeline("sd")
    masks = _masks(pipe)
    apply_mask(pipe, masks["release"], label="safe-v1@1")
    before = snapshot_parameters(pipe)
    wrong_shape = {name: LayerMask((1, 1), torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.uint8))
                   for name in masks["member"].layers}
    misfit = ConceptMask(wrong_shape, "ffn_out", "unet", None, 10_000, {})
    with pytest.raises(MaskMismatchError):
        switch(pipe, misfit, label="misfit")
    with pytest.raises(ValueError, match="'speckle'"):
        switch(pipe, masks["member"], fill="speckle")
    assert [entry.label for entry in active_edits(pipe)] == ["safe-v1@1"]
    assert _weights_are(snapshot_parameters, pipe, before)


def test_indices_are_moved_to_a_device_once_per_mask():
    indices = torch.arange(10)
    assert _indices_on(indices, torch.device("cpu")) is indices
    on_meta = _indices_on(indices, torch.device("meta"))
    assert on_meta.device.type == "meta" and _indices_on(indices, torch.device("meta")) is on_meta
