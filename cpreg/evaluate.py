"""Measure an erasure: images before / after a mask, classifier accuracy, a classifier-free proxy.

For every prompt, ``samples`` images are generated with the base weights and with the mask
applied, from the same seeds (``seed``, ``seed + 1``...). A classifier (anything with
``matches(images, prompt) -> list[bool]``, e.g. :class:`cpreg.demo.classify.DemoClassifier`)
says whether each image shows what its prompt asks for; without one the accuracies are ``None``
with the reason in ``classifier``, never guessed.

The proxy needs no classifier and works on any Stable-Diffusion-like pipeline: the relative
change ``||eps_after - eps_before|| / ||eps_before||`` of the conditional noise prediction, on
fixed noisy latents at a few timesteps, averaged over the erased prompts and over the retained
prompts; ``ratio`` = erased / retained (large: the mask acts on the concept specifically).

Example:
    >>> report = evaluate(pipe, mask, ["a red zorblat on white"], ["a red circle on white"],
    ...                   classifier=load_classifier(), samples=8, control=True, out_dir="eval")
    >>> report["erased_accuracy_before"], report["erased_accuracy_after"]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .editors import (
    ConceptMask,
    LayerMask,
    apply_mask,
    component_module,
    denoiser_component,
)
from .errors import InvalidArgumentError
from .grid import generate_images, labelled_grid
from .registry import Release

if TYPE_CHECKING:
    from .workspace import Workspace

#: Timesteps (of 1000 training steps) at which the proxy compares noise predictions.
PROXY_TIMESTEPS = (900, 700, 500, 300, 100)


def random_mask_like(mask: ConceptMask, seed: int = 0) -> ConceptMask:
    """A control mask: in every layer, as many weights as ``mask`` has, at uniformly random positions."""
    generator = torch.Generator("cpu").manual_seed(seed)
    layers = {}
    for name, layer in mask.layers.items():
        indices = torch.randperm(layer.size, generator=generator)[: layer.count].sort().values
        layers[name] = LayerMask(layer.shape, indices.to(torch.int64), torch.ones(layer.count, dtype=torch.uint8))
    return ConceptMask(layers=layers, hook=mask.hook, component=mask.component, fingerprint=mask.fingerprint,
                       component_params=mask.component_params, params={"control": "random", "seed": seed})


def _accuracy(classifier, images: dict[str, list[Image.Image]]) -> tuple[float, dict[str, float]]:
    per_prompt = {prompt: sum(hits) / len(hits) for prompt, ims in images.items() for hits in [classifier.matches(ims, prompt)]}
    return sum(per_prompt.values()) / len(per_prompt), per_prompt


@torch.no_grad()
def _noise_predictions(pipe, prompts: Sequence[str], seed: int) -> torch.Tensor:
    """Conditional noise predictions ``[prompts, timesteps, C, H, W]`` on fixed noisy latents (SD-style pipelines)."""
    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    device = next(unet.parameters()).device
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    context = text_encoder(ids)[0].to(unet.dtype)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((len(PROXY_TIMESTEPS), unet.config.in_channels, *size), generator=generator)
    out = []
    for prompt_context in context:
        t = torch.tensor(PROXY_TIMESTEPS, device=device)
        sample = latents.to(device=device, dtype=unet.dtype)
        cond = prompt_context.unsqueeze(0).expand(len(PROXY_TIMESTEPS), -1, -1)
        out.append(unet(sample, t, encoder_hidden_states=cond).sample.float().cpu())
    return torch.stack(out)


def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    dims = tuple(range(1, before.dim()))
    change = (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1).clamp_min(1e-12)
    return float(change.mean()) if dims else float(change)


def _proxy(pipe, mask: ConceptMask, erased: Sequence[str], retained: Sequence[str], seed: int) -> dict:
    if not all(hasattr(pipe, name) for name in ("tokenizer", "text_encoder", "unet")) or getattr(pipe, "unet", None) is None:
        return {"available": False, "reason": "the proxy needs a UNet pipeline with one text encoder (Stable Diffusion 1.x/2.x)"}
    prompts = list(erased) + list(retained)
    before = _noise_predictions(pipe, prompts, seed)
    with apply_mask(pipe, mask):
        after = _noise_predictions(pipe, prompts, seed)
    n = len(erased)
    erased_change = _relative_change(before[:n], after[:n])
    retained_change = _relative_change(before[n:], after[n:])
    return {
        "available": True,
        "timesteps": list(PROXY_TIMESTEPS),
        "erased_change": erased_change,
        "retained_change": retained_change,
        "ratio": erased_change / retained_change if retained_change > 0 else None,
    }


def evaluate(
    pipe,
    mask: ConceptMask,
    erased_prompts: Sequence[str],
    retained_prompts: Sequence[str],
    *,
    classifier=None,
    classifier_reason: str | None = None,
    samples: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    control: bool = False,
    control_seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    fill: str = "zero",
    header: dict | None = None,
) -> dict:
    """Compare ``pipe`` with and without ``mask`` on the erased and the retained prompts.

    Returns a JSON-able dict; top-level keys: ``erased_accuracy_before``, ``erased_accuracy_after``,
    ``retained_accuracy_before``, ``retained_accuracy_after`` (fractions in [0, 1], or ``None``
    when no classifier is given: ``classifier`` then says why, with ``classifier_reason``),
    ``masked_fraction`` (masked weights over all denoiser weights), ``masked``, ``proxy``, ``control``
    (``None`` unless requested: the same numbers for a random mask of the same size per layer),
    ``grid`` (PNG path or ``None``), ``per_prompt`` and ``settings``. ``header`` (e.g. the ref and the
    model) comes first in the report, and in ``out_dir/report.json``.
    """
    erased_prompts, retained_prompts = list(erased_prompts), list(retained_prompts)
    if not erased_prompts:
        raise InvalidArgumentError("no erased prompts")
    if samples < 1:
        raise InvalidArgumentError(f"samples must be >= 1, got {samples}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    denoiser_params = sum(p.numel() for p in component_module(pipe, denoiser_component(pipe)).parameters())
    prompts = erased_prompts + retained_prompts
    run = {"samples": samples, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, "batch_size": batch_size}

    masks = {"base": None, "edited": mask}
    control_mask = random_mask_like(mask, control_seed) if control else None
    if control_mask is not None:
        masks["control"] = control_mask
    images: dict[str, dict[str, list[Image.Image]]] = {}
    for label, m in masks.items():
        if m is None:
            images[label] = generate_images(pipe, prompts, **run)
        else:
            with apply_mask(pipe, m, fill=fill):
                images[label] = generate_images(pipe, prompts, **run)

    report: dict = {
        **(header or {}),
        "erased_accuracy_before": None,
        "erased_accuracy_after": None,
        "retained_accuracy_before": None,
        "retained_accuracy_after": None,
        "masked_fraction": mask.num_masked / denoiser_params if denoiser_params else 0.0,
        "masked": mask.num_masked,
        "masked_fraction_of_component": mask.fraction,
        "hook": mask.hook,
        "classifier": None,
        "proxy": _proxy(pipe, mask, erased_prompts, retained_prompts, seed),
        "control": None,
        "grid": None,
        "per_prompt": None,
        "settings": {**run, "fill": str(fill), "erased_prompts": erased_prompts, "retained_prompts": retained_prompts},
    }
    if classifier is None:
        reason = classifier_reason or "no classifier for this model: accuracies are not measured"
        report["classifier"] = {"available": False, "reason": reason}
    else:
        report["classifier"] = {"available": True, "name": type(classifier).__name__}
        per_prompt = {}
        for label, key in (("base", "before"), ("edited", "after")):
            sets = images[label]
            erased_acc, erased_rows = _accuracy(classifier, {p: sets[p] for p in erased_prompts})
            report[f"erased_accuracy_{key}"] = erased_acc
            if retained_prompts:
                retained_acc, retained_rows = _accuracy(classifier, {p: sets[p] for p in retained_prompts})
                report[f"retained_accuracy_{key}"] = retained_acc
            else:
                retained_rows = {}
            per_prompt[key] = {**erased_rows, **retained_rows}
        report["per_prompt"] = per_prompt
    if control_mask is not None:
        entry: dict = {"masked": control_mask.num_masked,
                       "proxy": _proxy(pipe, control_mask, erased_prompts, retained_prompts, seed)}
        if classifier is not None:
            entry["erased_accuracy_after"] = _accuracy(classifier, {p: images["control"][p] for p in erased_prompts})[0]
            entry["retained_accuracy_after"] = (
                _accuracy(classifier, {p: images["control"][p] for p in retained_prompts})[0] if retained_prompts else None)
        report["control"] = entry
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shown = erased_prompts[:4] + retained_prompts[:4]
        path = out / "grid.png"
        labelled_grid(images, shown, min(samples, 4)).save(path)
        report["grid"] = str(path)
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def evaluate_ref(ws: Workspace, ref: str, *, base: str | None = None, erased_prompts: list[str] | None = None,
             retained_prompts: list[str] | None = None, classifier: str = "auto", clip_model: str | None = None,
             device: str | None = "auto", **evaluate_kwargs) -> dict:
    """Erasure measurement of a registered mask or release (:func:`evaluate`): ``Workspace.evaluate``.

    Default prompts: the targets the members were calibrated on (erased) and their references
    that are no member's target (retained).
    ``classifier``: ``auto``, ``demo``, ``nudenet``, ``clip`` or ``none``, resolved (with ``clip_model``)
    by :func:`cpreg.classifiers.resolve_classifier` before the model is loaded; without one the report
    says why.
    """
    from .classifiers import resolve_classifier

    entity = ws.registry.resolve(ref)
    members = ws.registry.release_members(entity) if isinstance(entity, Release) else [entity]
    specs = [ws.mask_spec(member) for member in members]
    erased = erased_prompts or list(dict.fromkeys(prompt for spec in specs for prompt in spec.targets))
    retained = retained_prompts or list(dict.fromkeys(  # another member's target is not "retained"
        prompt for spec in specs for prompt in spec.references if prompt and prompt not in erased))
    model = base or ws.registry.get_base_model(entity.base_model_fingerprint).name
    chosen = resolve_classifier(classifier, model=model, concepts=specs, erased_prompts=erased,
                                retained_prompts=retained, clip_model=clip_model, device=device)
    pipe = ws.base_pipeline(entity, model, device=device)
    return evaluate(pipe, ws.load_mask(entity), erased, retained, classifier=chosen.classifier,
                    classifier_reason=chosen.reason, header={"ref": entity.ref, "model": model}, **evaluate_kwargs)
