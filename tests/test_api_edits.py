"""``cpreg.load_pipeline`` / ``apply`` / ``switch`` / ``active_edits`` / ``restore_all`` on a workspace.

A template workspace (two masks, an alias, a release) is computed once on the built-in tiny model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import cpreg
from cpreg.editors import ActiveEdit, CalibrationConfig, EditStackError, Fill, apply_mask
from cpreg.registry import NotFoundError
from cpreg.workspace import Workspace

FAST = CalibrationConfig(num_inference_steps=3, tau=2, batch_size=40)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("template") / ".cpreg"
    with Workspace(home) as ws:
        nudity = ws.compute("nudity", model="tiny", config=FAST, device="cpu")
        van_gogh = ws.compute("van-gogh", model="tiny", config=FAST, device="cpu")
        ws.registry.set_alias(nudity.ref, "prod")
        ws.compose("safe-v1", [nudity.ref, van_gogh.ref])
    return home


@pytest.fixture
def home(template, tmp_path) -> Path:
    copy = tmp_path / ".cpreg"
    shutil.copytree(template, copy)
    return copy


def _weights_are(snapshot, pipe, expected: dict[str, torch.Tensor]) -> bool:
    now = snapshot(pipe)
    return all(torch.equal(now[key], value) for key, value in expected.items())


def test_load_switch_and_restore_all_keep_the_stack(home, snapshot_parameters):
    with Workspace(home) as ws:
        masks = {ref: ws.load_mask(ref) for ref in ("safe-v1", "nudity@1", "van-gogh@1")}
        base = snapshot_parameters(ws.base_pipeline("safe-v1"))
    pipe = cpreg.load_pipeline("safe-v1", home=home, device="cpu")
    assert cpreg.active_edits(pipe) == [ActiveEdit("safe-v1@1", "unet", masks["safe-v1"].num_masked, Fill.ZERO)]
    assert pipe.cpreg_edit.label == "safe-v1@1"

    with pytest.raises(EditStackError, match="'safe-v1@1'"):
        cpreg.apply(pipe, "safe-v1", home=home, fill="noise")  # the release is applied already
    member = cpreg.apply(pipe, "nudity@prod", home=home)  # inside the release: stacks on top
    assert [entry.label for entry in cpreg.active_edits(pipe)] == ["safe-v1@1", "nudity@1"]
    with pytest.raises(EditStackError, match="'nudity@1'"):
        pipe.cpreg_edit.restore()

    edit = cpreg.switch(pipe, "van-gogh", home=home, fill="noise")
    assert not member.active and not pipe.cpreg_edit.active
    assert cpreg.active_edits(pipe) == [ActiveEdit("van-gogh@1", "unet", masks["van-gogh@1"].num_masked, Fill.NOISE)]
    edit.restore()
    with apply_mask(pipe, masks["van-gogh@1"], fill="noise"):
        expected = snapshot_parameters(pipe)
    cpreg.switch(pipe, "van-gogh@1", home=home, fill="noise")
    assert _weights_are(snapshot_parameters, pipe, expected)

    with pytest.raises(NotFoundError):
        cpreg.switch(pipe, "monet", home=home)  # nothing restored when the ref does not resolve
    assert [entry.label for entry in cpreg.active_edits(pipe)] == ["van-gogh@1"]

    cpreg.restore_all(pipe)
    assert cpreg.active_edits(pipe) == []
    assert _weights_are(snapshot_parameters, pipe, base)
