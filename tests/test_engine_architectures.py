"""Every hook point on tiny SD, and the SDXL (UNet) and SD3 (DiT) architectures, end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpreg.editors import (
    CalibrationConfig,
    HookPoint,
    apply_mask,
    calibrate,
    denoiser_component,
    derive_mask,
    hooked_layers,
    model_fingerprint,
)

TARGETS = ["a photo of a naked man", "a dog in the style of van gogh"]
REFERENCES = ["a photo of a man", "a photo of a dog"]

# the transformer blocks of the tiny SD UNet, by full module path (mid_block is registered last)
SD_BLOCKS = [
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "down_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.0.attentions.0.transformer_blocks.0",
    "up_blocks.0.attentions.1.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
    "mid_block.attentions.0.transformer_blocks.0",
]
SD_LAYERS = {
    "ffn_out": ("unet", [f"{block}.ff.net.2" for block in SD_BLOCKS]),
    "ffn_in": ("unet", [f"{block}.ff.net.0.proj" for block in SD_BLOCKS]),
    "attn2_k": ("unet", [f"{block}.attn2.to_k" for block in SD_BLOCKS]),
    "attn2_v": ("unet", [f"{block}.attn2.to_v" for block in SD_BLOCKS]),
    "text_mlp": ("text_encoder", ["encoder.layers.0.mlp.fc2", "encoder.layers.1.mlp.fc2"]),
}


def _mask_for(pipe, hook, skill_ratio=0.25, steps=4, tau=2, batch_size=4):
    stats = calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(hook=hook, num_inference_steps=steps, tau=tau, batch_size=batch_size))
    layers = hooked_layers(pipe, hook)
    mask = derive_mask(stats, {name: module.weight for name, module in layers.modules.items()}, skill_ratio=skill_ratio)
    return stats, layers, mask


@pytest.fixture(scope="module")
def sd(tiny_pipeline):
    return tiny_pipeline("sd")


@pytest.mark.parametrize("hook", list(SD_LAYERS))
def test_every_hook_point_on_tiny_sd(sd, snapshot_parameters, hook):
    component, expected = SD_LAYERS[hook]
    stats, layers, mask = _mask_for(sd, hook)
    assert layers.component == stats.component == mask.component == component
    assert sorted(layers.modules) == sorted(expected)
    assert list(stats.target) == list(layers.modules) == list(mask.layers)
    root = getattr(sd, component)
    for name, layer in mask.layers.items():
        module = root.get_submodule(name)  # a full module path inside the component
        assert isinstance(module, nn.Linear)
        assert layer.shape == tuple(module.weight.shape) == stats.layer_shapes[name]
        assert stats.target[name].shape == (stats.recorded_steps, module.in_features)
        assert layer.count > 0, f"{hook}: empty mask for {name}"
    assert stats.recorded_steps == (1 if hook == "text_mlp" else 2)
    assert mask.hook == hook and mask.fingerprint == model_fingerprint(sd)
    assert mask.component_params == sum(p.numel() for p in root.parameters())
    # the mask applies to this pipeline and is undone exactly
    before = snapshot_parameters(sd)
    with apply_mask(sd, mask):
        for name, layer in mask.layers.items():
            assert float(root.get_submodule(name).weight.detach().view(-1)[layer.indices].abs().sum()) == 0
    after = snapshot_parameters(sd)
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_sd_layer_names_are_full_paths_not_positions(sd):
    names = list(hooked_layers(sd, "ffn_out").modules)
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in names
    # diffusers registers mid_block after up_blocks: module order is not execution order
    assert names.index("mid_block.attentions.0.transformer_blocks.0.ff.net.2") == len(names) - 1


def test_sdxl_architecture(tiny_pipeline, literal_calibration):
    pipe = tiny_pipeline("sdxl")
    assert denoiser_component(pipe) == "unet"
    stats, layers, mask = _mask_for(pipe, "ffn_out")
    expected = {
        f"{prefix}.transformer_blocks.{i}.ff.net.2"
        for prefix in ("down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "mid_block.attentions.0")
        for i in (0, 1)  # two transformer blocks per attention in the inner level, as in SDXL
    }
    assert set(mask.layers) == expected
    assert all(layer.count > 0 for layer in mask.layers.values())
    # the literal per-prompt loop (global RNG, full T steps) agrees here too
    literal = literal_calibration(pipe, TARGETS, REFERENCES, steps=4, tau=2, guidance_scale=7.5, seed=0)
    for name in expected:
        torch.testing.assert_close(stats.target[name].double(), literal["target"][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.reference[name].double(), literal["reference"][name], rtol=1e-4, atol=1e-6)
    for hook in ("attn2_k", "text_mlp"):
        _, _, other = _mask_for(pipe, hook)
        assert other.num_masked > 0
        assert other.component == ("unet" if hook == "attn2_k" else "text_encoder")


def test_sd3_architecture(tiny_pipeline, literal_calibration):
    pipe = tiny_pipeline("sd3")
    assert denoiser_component(pipe) == "transformer"
    stats, layers, mask = _mask_for(pipe, "ffn_out")
    assert mask.component == "transformer"
    # the image stream's FFN in every block; the text stream's (ff_context) where the block has one
    assert set(mask.layers) == {"transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.ff.net.2"}
    assert all(layer.count > 0 for layer in mask.layers.values())
    literal = literal_calibration(pipe, TARGETS, REFERENCES, steps=4, tau=2, guidance_scale=7.5, seed=0)
    for name in mask.layers:
        torch.testing.assert_close(stats.target[name].double(), literal["target"][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.reference[name].double(), literal["reference"][name], rtol=1e-4, atol=1e-6)
    for hook in ("ffn_in", "text_mlp"):
        _, _, other = _mask_for(pipe, hook)
        assert other.num_masked > 0


@pytest.mark.parametrize("hook", ["attn2_k", "attn2_v"])
def test_sd3_has_no_cross_attention_hooks(tiny_pipeline, hook):
    pipe = tiny_pipeline("sd3")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=rf"{hook}.*SD3Transformer2DModel.*cross-attention"):
            hooked_layers(pipe, hook)
        with pytest.raises(ValueError, match="cross-attention"):
            calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(hook=hook, num_inference_steps=4, tau=2))
    finally:
        handle.remove()
    assert not calls  # refused before any denoising


@pytest.mark.parametrize("architecture", ["sdxl", "sd3"])
def test_batching_does_not_change_statistics(tiny_pipeline, architecture):
    pipe = tiny_pipeline(architecture)
    one, _, mask_one = _mask_for(pipe, "ffn_out", batch_size=1)
    three, _, _ = _mask_for(pipe, "ffn_out", batch_size=3)
    for name in one.target:
        torch.testing.assert_close(three.target[name], one.target[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(three.reference[name], one.reference[name], rtol=1e-4, atol=1e-5)


def test_unknown_hook_point_and_component(sd):
    with pytest.raises(ValueError):
        hooked_layers(sd, "ffn_middle")
    assert {hook.value for hook in HookPoint} == set(SD_LAYERS)
    assert [hook.uses_denoiser for hook in HookPoint] == [True, True, True, True, False]
