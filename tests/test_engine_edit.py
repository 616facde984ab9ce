"""Pruning a live pipeline: a planted concept is found and erased; apply/restore is exact and safe.

The planted concept
-------------------
In a tiny random SD pipeline we wire, by construction, a concept "zorblat" into a few known
GEGLU inner units of every ``ff.net.2``:

* text encoder: hidden channel ``c`` is zero in every token and position embedding, and no
  attention/MLP output writes to it; only the token ``zor`` (the tiny BPE splits "zorblat" into
  ``zor bl a t``, and ``zor`` occurs in no other word) has a large value there. After the final
  LayerNorm, channel ``c`` is about 5 at that token and small everywhere else.
* every UNet transformer block: residual channel ``r`` is zero before cross-attention (``proj_in``
  and ``attn1.to_out`` do not write it, ``norm2`` makes it a constant query input). Head 0 of
  ``attn2`` has one key dimension reading text channel ``c`` (so every spatial position attends to
  ``zor`` when present) and one value dimension reading it, written to residual channel ``r``
  only. ``proj_out`` ignores channel ``r``, so the signal leaves the block only through the FFN.
* FFN: the planted units' gates read only channel ``r`` with a negative bias, so they are off
  (gelu of -4 or less) without the token and strongly on with it; no other unit reads channel ``r``.
  Their ``ff.net.2`` weights are 4x the default init bound, so that their Wanda score beats
  every other column even if one column held all the unconditional rows' norm (see below).

So by construction the planted units are the target prompts' dominant activations, are silent for
other prompts, and carry the concept's influence on the noise prediction.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpreg.editors import (
    CalibrationConfig,
    ConceptMask,
    Fill,
    HookPoint,
    LayerMask,
    MaskMismatchError,
    apply_mask,
    calibrate,
    check_mask_matches,
    derive_mask,
    hooked_layers,
)

TEXT_CHANNEL = 0  # text-encoder hidden channel that carries the concept
RESIDUAL_CHANNEL = 0  # residual channel of every UNet transformer block that carries it
UNITS_PER = 32  # one planted unit per 32 inner units: 4 of 128, 8 of 256


def _text_core(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)


@torch.no_grad()
def plant_concept(pipe, token_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Wire ``token_id`` into planted units of every ``ff.net.2`` (see module docstring).

    Returns ``{ff.net.2 path: planted inner-unit indices}``.
    """
    generator = torch.Generator().manual_seed(seed)
    c, r = TEXT_CHANNEL, RESIDUAL_CHANNEL
    text = _text_core(pipe.text_encoder)
    text.embeddings.token_embedding.weight[:, c] = 0
    text.embeddings.token_embedding.weight[token_id, c] = 10.0
    text.embeddings.position_embedding.weight[:, c] = 0
    for layer in text.encoder.layers:
        for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
            linear.weight[c] = 0
            linear.bias[c] = 0

    planted = {}
    for name, module in hooked_layers(pipe, HookPoint.FFN_OUT).modules.items():
        block_path = name.removesuffix(".ff.net.2")
        block = pipe.unet.get_submodule(block_path)
        transformer = pipe.unet.get_submodule(block_path.rsplit(".transformer_blocks.", 1)[0])
        transformer.proj_in.weight[r] = 0
        transformer.proj_in.bias[r] = 0
        transformer.proj_out.weight[:, r] = 0  # the residual channel never leaves the block
        block.attn1.to_out[0].weight[r] = 0
        block.attn1.to_out[0].bias[r] = 0
        block.norm2.weight[r] = 0  # query input channel r: the constant 1
        block.norm2.bias[r] = 1.0
        attn = block.attn2
        head = attn.inner_dim // attn.heads
        attn.to_q.weight[:, r] = 0
        attn.to_q.weight[:head] = 0
        attn.to_q.weight[0, r] = 1.0
        attn.to_k.weight[:head] = 0
        attn.to_k.weight[0, c] = 12.0  # score of `zor` ~ 12 * 5 * scale: all positions attend to it
        attn.to_v.weight[:head] = 0
        attn.to_v.weight[1, c] = 1.0
        attn.to_out[0].weight[:, :head] = 0
        attn.to_out[0].weight[r] = 0
        attn.to_out[0].bias[r] = 0
        attn.to_out[0].weight[r, 1] = 0.4  # residual channel r ~ 2 with the token, ~0 without

        proj, down = block.ff.net[0].proj, block.ff.net[2]
        inner = down.in_features
        units = torch.arange(inner // UNITS_PER) * UNITS_PER + 3
        proj.weight[:, r] = 0  # no other unit reads the concept channel
        proj.weight[units] = 0  # value half: constant 3
        proj.bias[units] = 3.0
        proj.weight[inner + units, r] = 6.0  # gate half: 6 * LN(h)[r] - 8
        proj.bias[inner + units] = -8.0
        signs = torch.randint(0, 2, (down.out_features, len(units)), generator=generator) * 2 - 1
        # 4x the default init's bound. The n planted units share the unit norm of every conditional
        # target row, so their N*^2 is about rows/2/n, while any other column has at most rows/2
        # (all of the unconditional rows' norm): |W| N* of a planted weight is at least 4/sqrt(n) > 1
        # times any other weight's of its row (n <= 8 here), so the top-k of every row is planted
        down.weight[:, units] = signs.float() * 4 / math.sqrt(inner)
        planted[name] = units
    return planted


def _encode(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _noise_predictions(pipe, prompts, timesteps=(900, 500, 100)):
    embeddings = _encode(pipe, prompts)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).expand(len(prompts), -1, -1, -1)
    with torch.no_grad():
        return torch.stack([pipe.unet(latents, t, encoder_hidden_states=embeddings).sample for t in timesteps], 1)


TARGETS = ["a zorblat dog", "a zorblat cat", "a red zorblat", "a zorblat in the city"]
REFERENCES = ["a dog", "a cat", "a red car", "the city"]
OTHERS = ["a photo of a man", "a blue house", "a landscape painting", "a church"]


@pytest.fixture(scope="module")
def planted(tiny_pipeline):
    pipe = tiny_pipeline("sd")
    zor = pipe.tokenizer.convert_tokens_to_ids("zor")
    assert zor in pipe.tokenizer("zorblat").input_ids
    for prompt in REFERENCES + OTHERS:  # the planted token occurs in target prompts only
        assert zor not in pipe.tokenizer(prompt).input_ids
    units = plant_concept(pipe, zor)
    return pipe, units


def test_planted_units_fire_only_for_the_concept(planted):
    """Sanity check of the construction itself."""
    pipe, units = planted
    activations = {}
    handles = [
        pipe.unet.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: activations.__setitem__(name, args[0]))
        for name in units
    ]
    try:
        _noise_predictions(pipe, TARGETS[:2] + OTHERS[:2], timesteps=(500,))
    finally:
        for handle in handles:
            handle.remove()
    for name, columns in units.items():
        x = activations[name][..., columns]  # [prompt, token, unit]
        assert float(x[:2].min()) > 3.0, name  # on at every spatial position with the token
        assert float(x[2:].abs().max()) < 0.2, name  # off without it


@pytest.fixture(scope="module")
def planted_stats(planted):
    pipe, _ = planted
    return calibrate(pipe, TARGETS[:3], REFERENCES[:3], CalibrationConfig(num_inference_steps=10, tau=4, batch_size=6))


def _weights(pipe):
    return {name: module.weight for name, module in hooked_layers(pipe, HookPoint.FFN_OUT).modules.items()}


def test_planted_columns_are_selected(planted, planted_stats):
    pipe, units = planted
    # k = floor(in / 32) = the number of planted units: every row's top-k is exactly the planted units
    mask = derive_mask(planted_stats, _weights(pipe), skill_ratio=1 / UNITS_PER)
    for name, layer in mask.layers.items():
        planted_cols = torch.zeros(layer.shape, dtype=torch.bool)
        planted_cols[:, units[name]] = True
        dense = layer.dense()
        assert int((dense & planted_cols).sum()) == int(planted_cols.sum()), f"{name}: recall < 1"
        assert int((dense & ~planted_cols).sum()) == 0, f"{name}: precision < 1"
    # a larger k still finds all planted weights (recall 1) plus some others
    wide = derive_mask(planted_stats, _weights(pipe), skill_ratio=4 / UNITS_PER)
    for name, layer in wide.layers.items():
        rows, cols = layer.rows_cols()
        assert int(torch.isin(cols, units[name]).sum()) == layer.shape[0] * len(units[name])
        assert layer.count > layer.shape[0] * len(units[name])


def test_pruning_the_planted_units_erases_the_concept(planted, planted_stats):
    pipe, units = planted
    mask = derive_mask(planted_stats, _weights(pipe), skill_ratio=1 / UNITS_PER)
    prompts = TARGETS + REFERENCES + OTHERS
    before = _noise_predictions(pipe, prompts)
    with apply_mask(pipe, mask):
        after = _noise_predictions(pipe, prompts)
    restored = _noise_predictions(pipe, prompts)
    assert torch.equal(restored, before)

    n = len(TARGETS)
    target_before, reference_before, others_before = before[:n], before[n : 2 * n], before[2 * n :]
    target_after, others_after = after[:n], after[2 * n :]
    distance_before = (target_before - reference_before).flatten(1).norm(dim=1)
    distance_after = (target_after - reference_before).flatten(1).norm(dim=1)
    # The concept dominated the target predictions (the prompts differ otherwise only by one word)...
    assert bool((distance_before > 0.5 * reference_before.flatten(1).norm(dim=1)).all())
    # ...and pruning moves every target prediction most of the way to its reference prediction
    # (including "a zorblat in the city", not used for calibration).
    assert bool((distance_after < 0.2 * distance_before).all()), (distance_after / distance_before).tolist()
    # Prompts without the concept barely move.
    relative = (others_after - others_before).flatten(1).norm(dim=1) / others_before.flatten(1).norm(dim=1)
    assert float(relative.max()) < 1e-4, relative.tolist()
    relative_ref = (after[n : 2 * n] - reference_before).flatten(1).norm(dim=1) / reference_before.flatten(1).norm(dim=1)
    assert float(relative_ref.max()) < 1e-4


# ----------------------------------------------------------------------------- apply / restore


@pytest.fixture(scope="module")
def sd_mask(shared_tiny_sd):
    stats = calibrate(
        shared_tiny_sd,
        ["a dog in the style of van gogh", "a naked man"],
        ["a photo of a dog", "a photo of a man"],
        CalibrationConfig(num_inference_steps=6, tau=3, batch_size=4),
    )
    mask = derive_mask(stats, _weights(shared_tiny_sd), skill_ratio=0.05)
    assert mask.num_masked > 100 and all(layer.count for layer in mask.layers.values())
    return mask


def _masked_keys(mask):
    return {f"{mask.component}.{name}.weight": layer for name, layer in mask.layers.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_zeroes_exactly_the_mask_and_restore_is_bit_identical(tiny_pipeline, snapshot_parameters, sd_mask, dtype):
    pipe = tiny_pipeline("sd", dtype=dtype)
    original = snapshot_parameters(pipe)
    masked = _masked_keys(sd_mask)
    edit = apply_mask(pipe, sd_mask)
    assert edit.active
    during = snapshot_parameters(pipe)
    for key, value in during.items():
        if key in masked:
            dense = masked[key].dense()
            assert value.dtype == dtype
            assert bool((value[dense] == 0).all()), key
            assert torch.equal(value[~dense], original[key][~dense]), key
            assert bool((original[key][dense] != 0).any())
        else:
            assert torch.equal(value, original[key]), key
    edit.restore()
    assert not edit.active
    edit.restore()  # idempotent
    after = snapshot_parameters(pipe)
    for key, value in original.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_fill_touches_only_masked_positions_and_is_seeded(tiny_pipeline, snapshot_parameters, sd_mask, dtype):
    pipe = tiny_pipeline("sd", dtype=dtype)
    original = snapshot_parameters(pipe)
    masked = _masked_keys(sd_mask)
    with apply_mask(pipe, sd_mask, fill="noise", seed=5):
        first = snapshot_parameters(pipe)
    with apply_mask(pipe, sd_mask, fill=Fill.NOISE, seed=5):
        second = snapshot_parameters(pipe)
    with apply_mask(pipe, sd_mask, fill="noise", seed=6):
        third = snapshot_parameters(pipe)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key  # deterministic for a seed
        if key not in masked:
            assert torch.equal(value, original[key]), key
            continue
        dense = masked[key].dense()
        assert bool((value[dense] != 0).all()), key  # noise, not zeros
        assert not torch.equal(value[dense], original[key][dense])
        assert torch.equal(value[~dense], original[key][~dense]), key
        assert not torch.equal(value[dense], third[key][dense])  # another seed, other noise
        std = original[key].float().std()
        assert float(value[dense].float().abs().max()) < 0.1 * 6 * std  # N(0, (0.1 std)^2): < 6 sigma
    everything = torch.cat([first[key][masked[key].dense()].float() / original[key].float().std() for key in masked])
    assert 0.08 < float(everything.std()) < 0.12  # noise_scale 0.1 of each layer's std (n > 100)
    after = snapshot_parameters(pipe)
    for key, value in original.items():
        assert torch.equal(after[key], value), key


def test_context_manager_restores_even_after_an_error(tiny_pipeline, snapshot_parameters, sd_mask):
    pipe = tiny_pipeline("sd")
    original = snapshot_parameters(pipe)
    name = next(iter(sd_mask.layers))
    weight = pipe.unet.get_submodule(name).weight
    with pytest.raises(RuntimeError, match="boom"):
        with apply_mask(pipe, sd_mask) as edit:
            assert edit.active
            assert float(weight.detach().view(-1)[sd_mask.layers[name].indices].abs().sum()) == 0
            raise RuntimeError("boom")
    assert not edit.active
    after = snapshot_parameters(pipe)
    assert all(torch.equal(after[key], value) for key, value in original.items())


def test_nested_overlapping_edits_restore_exactly(tiny_pipeline, snapshot_parameters, sd_mask):
    pipe = tiny_pipeline("sd")
    original = snapshot_parameters(pipe)
    stricter = sd_mask.with_select_ratio(0.4)  # a subset: overlaps sd_mask everywhere it has entries
    assert 0 < stricter.num_masked < sd_mask.num_masked
    with apply_mask(pipe, sd_mask, fill="noise", seed=1):
        with apply_mask(pipe, stricter):
            pass
    after = snapshot_parameters(pipe)
    assert all(torch.equal(after[key], value) for key, value in original.items())


def _refused(pipe, mask, snapshot, match):
    before = snapshot(pipe)
    with pytest.raises(MaskMismatchError, match=match):
        apply_mask(pipe, mask)
    with pytest.raises(MaskMismatchError, match=match):
        check_mask_matches(pipe, mask)
    after = snapshot(pipe)
    assert all(torch.equal(after[key], value) for key, value in before.items()), "a weight changed"


def test_mask_of_another_architecture_is_refused(tiny_pipeline, snapshot_parameters, sd_mask):
    sdxl = tiny_pipeline("sdxl")
    sdxl_stats = calibrate(sdxl, ["a naked man"], ["a man"], CalibrationConfig(num_inference_steps=4, tau=2))
    sdxl_mask = derive_mask(sdxl_stats, _weights(sdxl), skill_ratio=0.05)
    # SDXL's first layer also exists in tiny SD with the same shape: the check must go on to the next
    first, second = list(sdxl_mask.layers)[:2]
    assert first == "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert second == "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2"
    _refused(tiny_pipeline("sd"), sdxl_mask, snapshot_parameters, second.replace(".", r"\."))
    # and an SD mask on SDXL is refused naming the first SD layer SDXL lacks or shapes differently
    sd_first = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert next(iter(sd_mask.layers)) == sd_first
    _refused(sdxl, sd_mask, snapshot_parameters, sd_first.replace(".", r"\."))
    sd3 = tiny_pipeline("sd3")
    _refused(sd3, sd_mask, snapshot_parameters, "unet")  # no such component


def test_mask_with_a_wrong_layer_name_or_shape_is_refused(tiny_pipeline, snapshot_parameters, sd_mask):
    pipe = tiny_pipeline("sd")
    layers = dict(sd_mask.layers)
    last = list(layers)[-1]  # earlier layers are valid: nothing may be written before the check fails
    renamed = dict(layers)
    renamed["mid_block.attentions.0.transformer_blocks.0.ff.net.9"] = renamed.pop(last)
    bad_name = ConceptMask(**{**sd_mask.__dict__, "layers": renamed})
    _refused(pipe, bad_name, snapshot_parameters, r"mid_block\.attentions\.0\.transformer_blocks\.0\.ff\.net\.9")

    out_features, in_features = layers[last].shape
    wrong_shape = dict(layers)
    wrong_shape[last] = LayerMask((out_features, in_features // 2), torch.tensor([0, 5]), torch.tensor([1, 1], dtype=torch.uint8))
    bad_shape = ConceptMask(**{**sd_mask.__dict__, "layers": wrong_shape})
    _refused(pipe, bad_shape, snapshot_parameters, last.replace(".", r"\."))

    not_a_weight = dict(layers)
    norm = "mid_block.attentions.0.transformer_blocks.0.norm3"  # a LayerNorm: 1-D weight
    not_a_weight[norm] = LayerMask((1, 64), torch.tensor([0]), torch.tensor([1], dtype=torch.uint8))
    _refused(pipe, ConceptMask(**{**sd_mask.__dict__, "layers": not_a_weight}), snapshot_parameters, norm.replace(".", r"\."))

    other_component = ConceptMask(**{**sd_mask.__dict__, "component": "transformer"})
    _refused(pipe, other_component, snapshot_parameters, "transformer")
