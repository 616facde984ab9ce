"""Calibration statistics against a literal, slow implementation of the spec (docs/conceptprune.md).

The literal version (``literal_statistics`` in conftest.py) does exactly what the reference code does: one pipeline call per prompt,
the full loop of T steps, the global RNG re-seeded with ``torch.manual_seed(seed)`` before every
prompt and no generator passed, a forward hook on the *output* of ``ff.net.0`` (the GEGLU), UNet
calls counted as steps, and only steps ``t < tau`` kept. Rows are L2-normalised, squares summed per
column (in float64), ``N = sqrt``. The engine (batched, early-stopped, pre-hooks on ``ff.net.2``,
fp32 bmm) must agree to fp32 rounding, and the mask derived from its statistics must equal a
literal argsort selection exactly.
"""

from __future__ import annotations

import pytest
import torch

from cpreg.editors import CalibrationConfig, HookPoint, NoiseMode, calibrate, derive_mask, hooked_layers

TARGETS = ["a photo of a naked man", "a dog in the style of van gogh"]
REFERENCES = ["a photo of a man", "a photo of a dog"]
T, TAU, SEED = 6, 4, 0


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline("sd")


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_statistics_equal_the_literal_implementation(pipe, guidance_scale, literal_selection, literal_calibration):
    literal = literal_calibration(pipe, TARGETS, REFERENCES, steps=T, tau=TAU, guidance_scale=guidance_scale, seed=SEED)
    config = CalibrationConfig(num_inference_steps=T, tau=TAU, guidance_scale=guidance_scale, seed=SEED, batch_size=4)
    stats = calibrate(pipe, TARGETS, REFERENCES, config)

    ffn_names = set(hooked_layers(pipe, HookPoint.FFN_OUT).modules)
    assert set(stats.target) == set(literal["target"]) == ffn_names
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in ffn_names
    assert stats.recorded_steps == TAU
    for name in ffn_names:
        for ours, theirs in ((stats.target[name], literal["target"][name]), (stats.reference[name], literal["reference"][name])):
            assert ours.dtype == torch.float32 and ours.shape == theirs.shape
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-6)
            # each row contributes exactly 1 (unit norm): the column sums add up to the row count
            torch.testing.assert_close(ours.double().sum(1), theirs.sum(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(stats.target_norms()[name].double(), literal["target"][name].sqrt(), rtol=1e-4, atol=1e-6)

    # The literal selection (full argsort per row and step) gives exactly derive_mask's mask.
    weights = {name: module.weight for name, module in hooked_layers(pipe, HookPoint.FFN_OUT).modules.items()}
    for tau, select_ratio in ((TAU, 0.0), (TAU, 0.5), (2, 0.0)):
        mask = derive_mask(stats, weights, skill_ratio=0.05, tau=tau, select_ratio=select_ratio)
        expected = literal_selection(stats, weights, 0.05, tau, select_ratio)
        assert mask.num_masked > 0
        for name, layer in mask.layers.items():
            dense, counts = expected[name]
            assert torch.equal(layer.dense(), dense), name
            assert torch.equal(layer.skill_counts.to(torch.int64), counts.view(-1)[layer.indices]), name


def test_unconditional_half_is_part_of_the_statistics(pipe, literal_calibration):
    """With guidance > 1 the unconditional rows are counted: leaving them out is detectably different."""
    config = CalibrationConfig(num_inference_steps=T, tau=2, guidance_scale=7.5, seed=SEED, batch_size=4)
    stats = calibrate(pipe, TARGETS[:1], REFERENCES[:1], config)
    cond_only = literal_calibration(pipe, TARGETS[:1], REFERENCES[:1], steps=T, tau=2, guidance_scale=7.5, seed=SEED, drop_unconditional=True)
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    tokens = 8 * 8  # mid block of a 16x16 latent (one downsampling): 8x8 positions
    # one prompt, guidance batch of 2 rows -> 2 * tokens unit-norm rows per step
    torch.testing.assert_close(stats.target[name].sum(1), torch.full((2,), 2.0 * tokens), rtol=1e-5, atol=0)
    torch.testing.assert_close(cond_only["target"][name].sum(1), torch.full((2,), 1.0 * tokens, dtype=torch.float64))
    assert not torch.allclose(stats.target[name].double(), 2 * cond_only["target"][name], rtol=1e-3)


def test_batched_equals_unbatched_and_is_deterministic(pipe):
    targets = TARGETS + ["a red car in the style of monet"]
    references = REFERENCES + ["a photo of a red car"]
    base = dict(num_inference_steps=T, tau=TAU, seed=3)
    single = calibrate(pipe, targets, references, CalibrationConfig(**base, batch_size=1))
    for batch_size in (3, 4):  # batches of 3: [T T T] [R R R]; of 4: [T T T R] [R R] (mixed)
        batched = calibrate(pipe, targets, references, CalibrationConfig(**base, batch_size=batch_size))
        for name in single.target:
            torch.testing.assert_close(batched.target[name], single.target[name], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batched.reference[name], single.reference[name], rtol=1e-4, atol=1e-5)
    again = calibrate(pipe, targets, references, CalibrationConfig(**base, batch_size=4))
    for name in single.target:  # CPU fp32: bit-identical across runs
        assert torch.equal(again.target[name], batched.target[name])
        assert torch.equal(again.reference[name], batched.reference[name])
    assert again.num_target_prompts == 3 and again.num_reference_prompts == 3
    assert again.fingerprint == single.fingerprint and again.fingerprint.startswith("sha256:")


def test_statistics_of_prompt_shards_add_up(pipe):
    """Sums of squares add across prompt shards (what the distributed all-reduce relies on):
    the sum of two shards' statistics equals one run over all prompts."""
    config = CalibrationConfig(num_inference_steps=T, tau=2, batch_size=1)
    whole = calibrate(pipe, TARGETS, REFERENCES, config)
    first = calibrate(pipe, TARGETS[:1], REFERENCES[:1], config)
    second = calibrate(pipe, TARGETS[1:], REFERENCES[1:], config)
    for name in whole.target:
        torch.testing.assert_close(first.target[name] + second.target[name], whole.target[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            first.reference[name] + second.reference[name], whole.reference[name], rtol=1e-5, atol=1e-6
        )


def test_progress_bar_does_not_change_the_statistics(pipe):
    config = CalibrationConfig(num_inference_steps=T, tau=2, batch_size=4)
    quiet = calibrate(pipe, TARGETS, REFERENCES, config)
    shown = calibrate(pipe, TARGETS, REFERENCES, config, progress=True)
    assert all(torch.equal(shown.target[name], quiet.target[name]) for name in quiet.target)
    assert all(torch.equal(shown.reference[name], quiet.reference[name]) for name in quiet.reference)


def test_early_stop_equals_the_full_loop(pipe):
    """Stopping after step tau-1 gives the same first tau steps as recording all T steps."""
    full = calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(num_inference_steps=T, tau=T, batch_size=4))
    early = calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(num_inference_steps=T, tau=2, batch_size=4))
    assert full.recorded_steps == T and early.recorded_steps == 2
    for name in full.target:
        assert torch.equal(early.target[name], full.target[name][:2])
        assert torch.equal(early.reference[name], full.reference[name][:2])


def test_early_stop_makes_only_tau_denoiser_calls(pipe):
    calls = []  # completed UNet calls (a forward hook runs only after the call returned)
    handle = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(num_inference_steps=20, tau=3, batch_size=2))
    finally:
        handle.remove()
    assert len(calls) == 3 * 2  # tau calls for each of the 2 batches, out of T = 20


def test_hooks_are_removed_and_pipeline_still_runs(pipe):
    calibrate(pipe, TARGETS[:1], REFERENCES[:1], CalibrationConfig(num_inference_steps=4, tau=2))
    for module in pipe.unet.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    torch.manual_seed(0)
    latents = pipe("a dog", num_inference_steps=3, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def test_text_encoder_statistics_equal_a_literal_encoding(pipe):
    """``text_mlp``: one "step", the fc2 inputs of every padded token, target and reference sets."""
    stats = calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(hook="text_mlp", batch_size=3))
    assert stats.recorded_steps == 1 and stats.component == "text_encoder"
    sums = {}

    def record(name):
        def hook(module, args):
            rows = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (rows / rows.norm(dim=1, keepdim=True)).square().sum(0)

        return hook

    layers = {name: module for name, module in pipe.text_encoder.named_modules() if name.endswith("mlp.fc2")}
    for kind, prompts in (("target", TARGETS), ("reference", REFERENCES)):
        sums.clear()
        handles = [module.register_forward_pre_hook(record(name)) for name, module in layers.items()]
        try:
            with torch.no_grad():
                for prompt in prompts:
                    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                    pipe.text_encoder(ids)
        finally:
            for handle in handles:
                handle.remove()
        got = getattr(stats, kind)
        assert set(got) == set(sums)
        for name, value in sums.items():
            torch.testing.assert_close(got[name][0].double(), value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=10, tau=11), "tau"),
        (dict(num_inference_steps=10, tau=0), "tau"),
        (dict(num_inference_steps=0, tau=1), "num_inference_steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(hook="ffn_middle"), "ffn_middle"),
        (dict(noise="gpu"), "noise must be one of cpu, reference"),
        (dict(stats_dtype="bfloat16"), "stats_dtype must be one of float32, float16"),
    ],
)
def test_calibration_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationConfig(**kwargs)


def test_calibration_config_round_trips():
    config = CalibrationConfig(hook="attn2_v", num_inference_steps=20, tau=5, guidance_scale=3.0, seed=7, batch_size=2,
                               noise="reference", stats_dtype="float16")
    assert config.hook is HookPoint.ATTN2_V and config.recorded_steps == 5
    assert config.noise is NoiseMode.REFERENCE and config.stats_dtype.torch_dtype is torch.float16
    assert CalibrationConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["noise"] == "reference" and config.to_dict()["stats_dtype"] == "float16"
    assert CalibrationConfig(hook="text_mlp").recorded_steps == 1
    # A record written before the noise and stats_dtype fields existed reads back as the defaults.
    old = {key: value for key, value in config.to_dict().items() if key not in ("noise", "stats_dtype")}
    assert CalibrationConfig.from_dict(old) == CalibrationConfig(**{**old, "noise": "cpu", "stats_dtype": "float32"})


@pytest.mark.parametrize("targets, references", [([], ["a dog"]), (["a dog"], []), ([b"a dog"], ["a dog"]), (["a dog"], [None])])
def test_calibrate_rejects_bad_prompts(pipe, targets, references):
    with pytest.raises(ValueError, match="prompts"):
        calibrate(pipe, targets, references, CalibrationConfig(num_inference_steps=2, tau=1))


def test_the_calibrate_export_is_the_function_whatever_was_imported_first():
    """No editors submodule shares a name with an export: importing every submodule first (as the
    benchmarks do) must not turn ``cpreg.editors.calibrate`` into a module."""
    import importlib
    import pkgutil
    import subprocess
    import sys

    import cpreg.editors

    modules = [f"cpreg.editors.{info.name}" for info in pkgutil.iter_modules(cpreg.editors.__path__)]
    assert not set(name.rsplit(".", 1)[1] for name in modules) & set(cpreg.editors.__all__)
    code = "; ".join(f"import {name}" for name in modules) + "; from cpreg.editors import calibrate; print(callable(calibrate))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr[-2000:]
    assert importlib.import_module("cpreg.editors").calibrate.__module__ == "cpreg.editors.calibration"
