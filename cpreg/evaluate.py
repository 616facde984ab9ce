"""Measure an erasure: images before / after a mask, classifier accuracy, preservation, a classifier-free proxy.

For every prompt, ``samples`` images are generated with the base weights and with the mask
applied, from the same seeds (``seed``, ``seed + 1``...). A classifier (anything with
``matches(images, prompt) -> list[bool]``, e.g. :class:`cpreg.demo.classify.DemoClassifier`)
says whether each image shows what its prompt asks for; without one the accuracies are ``None``
with the reason in ``classifier``, never guessed.

Preservation is measured per retained concept group (``retained_drop_worst``: the largest accuracy
drop of any group, with a bootstrap interval over seeds, :mod:`cpreg.preservation`) and without a
classifier, image against image of the same seed: SSIM and PSNR, the foreground colour shift on
the demo models, CLIP scores where a local CLIP model is given (:mod:`cpreg.fidelity`).

The proxy needs no classifier and works on any Stable-Diffusion-like pipeline: the relative
change ``||eps_after - eps_before|| / ||eps_before||`` of the conditional noise prediction, on
fixed noisy latents at a few timesteps, averaged over the erased prompts and over the retained
prompts; ``ratio`` = erased / retained (large: the mask acts on the concept specifically).

Example:
    >>> report = evaluate(pipe, mask, ["a red zorblat on white"], ["a red circle on white"],
    ...                   classifier=load_classifier(), samples=8, control=True, out_dir="eval")
    >>> report["erased_accuracy_after"], report["erased_accuracy_after_ci95"]
    >>> report["retained_drop_worst"], report["retained_drop_worst_group"], report["retained_drop_worst_ci95"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
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
from .fidelity import colour_shift, ssim_psnr
from .grid import generate_images, labelled_grid
from .preservation import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_interval,
    breakdown,
    finite_mean,
    per_seed,
    summary,
    worst_drop,
)
from .registry import Release

if TYPE_CHECKING:
    from .workspace import Workspace

#: Timesteps (of 1000 training steps) at which the proxy compares noise predictions.
PROXY_TIMESTEPS = (900, 700, 500, 300, 100)
#: Why the colour shift is not measured on other models.
COLOUR_UNAVAILABLE = "defined for flat shapes on a plain background: measured on the demo models only"


def random_mask_like(mask: ConceptMask, seed: int = 0) -> ConceptMask:
    """A control mask: in every layer, as many weights as ``mask`` has, at uniformly random positions."""
    generator = torch.Generator("cpu").manual_seed(seed)
    layers = {}
    for name, layer in mask.layers.items():
        indices = torch.randperm(layer.size, generator=generator)[: layer.count].sort().values
        layers[name] = LayerMask(layer.shape, indices.to(torch.int64), torch.ones(layer.count, dtype=torch.uint8))
    return ConceptMask(layers=layers, hook=mask.hook, component=mask.component, fingerprint=mask.fingerprint,
                       component_params=mask.component_params, params={"control": "random", "seed": seed})


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


def _classified(classifier, images: Mapping[str, list[Image.Image]]) -> dict[str, dict[str, np.ndarray]]:
    """Per covered prompt and seed: ``accuracy`` (``matches``), and ``{attribute}_accuracy`` where the
    classifier has ``attribute_matches`` (the demo classifier: shape and colour)."""
    covers = getattr(classifier, "covers", None)
    measured: dict[str, dict[str, np.ndarray]] = {"accuracy": {}}
    for prompt, prompt_images in images.items():
        if covers is not None and not covers(prompt):
            continue
        measured["accuracy"][prompt] = np.array(classifier.matches(prompt_images, prompt), dtype=np.float64)
        if hasattr(classifier, "attribute_matches"):
            for attribute, hits in classifier.attribute_matches(prompt_images, prompt).items():
                measured.setdefault(f"{attribute}_accuracy", {})[prompt] = np.array(hits, dtype=np.float64)
    return measured


def _measured(images: Mapping[str, list[Image.Image]], classifier, clip_scorer) -> dict[str, dict[str, np.ndarray]]:
    """The per-image measurements of one set of images: classifier accuracies and CLIP scores."""
    measured = _classified(classifier, images) if classifier is not None else {}
    if clip_scorer is not None:
        measured["clip_score"] = {prompt: np.array(clip_scorer.scores(prompt_images, [prompt] * len(prompt_images)))
                                  for prompt, prompt_images in images.items()}
    return measured


def _compared(before: Mapping[str, list[Image.Image]], after: Mapping[str, list[Image.Image]],
              colour: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per prompt and seed, base vs. edited image: ``ssim``, ``psnr`` (and ``hue_shift_deg``, ``chroma_shift``)."""
    measured: dict[str, dict[str, np.ndarray]] = {"ssim": {}, "psnr": {}}
    if colour:
        measured.update(hue_shift_deg={}, chroma_shift={})
    for prompt, base_images in before.items():
        ssim, psnr = ssim_psnr(base_images, after[prompt])
        measured["ssim"][prompt], measured["psnr"][prompt] = np.array(ssim), np.array(psnr)
        if colour:
            shifts = [(np.nan, np.nan) if shift is None else shift for shift in colour_shift(base_images, after[prompt])]
            measured["hue_shift_deg"][prompt] = np.array([hue for hue, _ in shifts])
            measured["chroma_shift"][prompt] = np.array([chroma for _, chroma in shifts])
    return measured


@dataclass(frozen=True)
class _Prompts:
    erased: list[str]
    retained: list[str]
    groups: dict[str, list[str]]


def _count(measurement: Mapping[str, np.ndarray], prompts: Sequence[str], test) -> int:
    return int(sum(test(measurement[prompt]).sum() for prompt in prompts if prompt in measurement))


def _fidelity(measurements: dict[str, dict[str, np.ndarray]], sets: dict[str, list[str]], summaries: dict) -> dict:
    """SSIM and PSNR per prompt set; ``identical`` pairs (infinite PSNR) are left out of the PSNR mean."""
    return {name: {"ssim": summaries[name]["ssim"], "psnr": summaries[name]["psnr"],
                   "identical": _count(measurements["psnr"], members, np.isposinf),
                   "images": _count(measurements["ssim"], members, np.isfinite)} for name, members in sets.items()}


def _colour_fidelity(measurements: dict[str, dict[str, np.ndarray]], sets: dict[str, list[str]], summaries: dict) -> dict:
    """Mean hue and chroma shift per prompt set, over the pairs where both images have a foreground."""
    if "hue_shift_deg" not in measurements:
        return {"available": False, "reason": COLOUR_UNAVAILABLE}
    return {"available": True, **{
        name: {"hue_shift_deg": summaries[name]["hue_shift_deg"], "chroma_shift": summaries[name]["chroma_shift"],
               "images": _count(measurements["hue_shift_deg"], members, np.isfinite)} for name, members in sets.items()}}


def _variant(measurements: dict[str, dict[str, np.ndarray]], prompts: _Prompts, *, interval: bool,
             clip_model: str | None, clip_reason: str | None) -> dict:
    """The report of one edit (the mask or the random control) against the base images of the same seeds."""
    sets = {"erased": prompts.erased, "retained": prompts.retained}
    summaries = {name: summary(measurements, members) for name, members in sets.items()}

    def before_after(measure: str) -> dict:
        return {f"{name}_{when}": summaries[name].get(f"{measure}_{when}") for name in sets for when in ("before", "after")}

    before, after = measurements.get("accuracy_before", {}), measurements.get("accuracy_after", {})
    erased_per_seed = per_seed(after, prompts.erased)
    worst = worst_drop(before, after, prompts.groups, interval=interval)
    attributes = [name.removesuffix("_accuracy_after") for name in measurements if name.endswith("_accuracy_after")]
    return {
        "erased_accuracy_after": summaries["erased"].get("accuracy_after"),
        "retained_accuracy_after": summaries["retained"].get("accuracy_after"),
        "erased_accuracy_after_ci95": list(bootstrap_interval(erased_per_seed)) if interval and erased_per_seed is not None else None,
        "retained_drop_worst": worst["value"],
        "retained_drop_worst_group": worst["group"],
        "retained_drop_worst_ci95": worst["ci95"],
        "attribute_accuracy": {**{name: before_after(f"{name}_accuracy") for name in attributes},
                               "joint": before_after("accuracy")} if attributes else None,
        "fidelity": _fidelity(measurements, sets, summaries),
        "colour_fidelity": _colour_fidelity(measurements, sets, summaries),
        "clip_score": {"available": True, "model": clip_model, **before_after("clip_score")}
        if "clip_score_after" in measurements else {"available": False, "reason": clip_reason},
        "breakdown": breakdown(measurements, prompts.groups),
    }


def _bootstrap_settings(samples: int) -> dict:
    settings = {"method": "percentile bootstrap over seeds", "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                "level": BOOTSTRAP_LEVEL, "seeds": samples}
    return settings if samples > 1 else {**settings, "reason": "one seed per prompt: no interval (use --samples 2 or more)"}


def evaluate(
    pipe,
    mask: ConceptMask,
    erased_prompts: Sequence[str],
    retained_prompts: Sequence[str],
    *,
    retained_groups: Mapping[str, Sequence[str]] | None = None,
    classifier=None,
    classifier_reason: str | None = None,
    clip_scorer=None,
    clip_reason: str | None = None,
    colour_fidelity: bool = False,
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

    ``retained_groups`` ({name: prompts}, default one group ``retained``) are the concept groups of the
    breakdown and of ``retained_drop_worst``; ``clip_scorer`` (a :class:`cpreg.classifiers.ClipScorer`)
    adds CLIP scores, else ``clip_reason`` says why there are none; ``colour_fidelity`` adds the
    foreground colour shift (:mod:`cpreg.fidelity`; meaningful on the demo models' flat shapes).

    Returns a JSON-able dict (every key: ``docs/evaluation.md``): ``erased_accuracy_before`` /
    ``_after``, ``retained_accuracy_before`` / ``_after`` (fractions in [0, 1] over the prompts the
    classifier covers, or ``None`` without a classifier: ``classifier`` then says why, with
    ``classifier_reason``), the headline pair ``erased_accuracy_after`` / ``retained_drop_worst`` with
    their ``_ci95`` bootstrap intervals over seeds, ``attribute_accuracy``, ``fidelity`` (SSIM, PSNR),
    ``colour_fidelity``, ``clip_score``, ``breakdown`` (per group), ``bootstrap``, ``masked_fraction``
    (masked weights over all denoiser weights), ``masked``, ``proxy``, ``control`` (``None`` unless
    requested: the same numbers for a random mask of the same size per layer), ``grid`` (PNG path or
    ``None``), ``per_prompt`` and ``settings``. ``header`` (e.g. the ref and the model) comes first in
    the report, and in ``out_dir/report.json``.
    """
    erased_prompts, retained_prompts = list(erased_prompts), list(retained_prompts)
    if not erased_prompts:
        raise InvalidArgumentError("no erased prompts")
    if samples < 1:
        raise InvalidArgumentError(f"samples must be >= 1, got {samples}")
    groups = {name: list(members) for name, members in (retained_groups or {"retained": retained_prompts}).items()}
    strays = [prompt for members in groups.values() for prompt in members if prompt not in retained_prompts]
    if strays:
        raise InvalidArgumentError(f"retained group prompt {strays[0]!r} is not a retained prompt")
    prompt_sets = _Prompts(erased_prompts, retained_prompts, {name: members for name, members in groups.items() if members})
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

    measured = {label: _measured(sets, classifier, clip_scorer) for label, sets in images.items()}
    base = {f"{name}_before": values for name, values in measured["base"].items()}
    clip = {"clip_model": clip_scorer.name if clip_scorer is not None else None,
            "clip_reason": clip_reason or "no CLIP scorer given"}

    def variant(label: str) -> dict:
        measurements = {**base, **{f"{name}_after": values for name, values in measured[label].items()},
                        **_compared(images["base"], images[label], colour_fidelity)}
        return _variant(measurements, prompt_sets, interval=samples > 1, **clip)

    accuracy = measured["base"].get("accuracy", {})
    report: dict = {
        **(header or {}),
        "erased_accuracy_before": finite_mean(accuracy, erased_prompts),
        "retained_accuracy_before": finite_mean(accuracy, retained_prompts),
        **variant("edited"),
        "masked_fraction": mask.num_masked / denoiser_params if denoiser_params else 0.0,
        "masked": mask.num_masked,
        "masked_fraction_of_component": mask.fraction,
        "hook": mask.hook,
        "classifier": None,
        "proxy": _proxy(pipe, mask, erased_prompts, retained_prompts, seed),
        "control": None,
        "bootstrap": _bootstrap_settings(samples),
        "grid": None,
        "per_prompt": None,
        "settings": {**run, "fill": str(fill), "erased_prompts": erased_prompts, "retained_prompts": retained_prompts,
                     "retained_groups": prompt_sets.groups},
    }
    if classifier is None:
        reason = classifier_reason or "no classifier for this model: accuracies are not measured"
        report["classifier"] = {"available": False, "reason": reason}
    else:
        report["classifier"] = {"available": True, "name": type(classifier).__name__,
                                "covered_erased": sum(prompt in accuracy for prompt in erased_prompts),
                                "covered_retained": sum(prompt in accuracy for prompt in retained_prompts)}
        report["per_prompt"] = {key: {prompt: float(hits.mean()) for prompt, hits in measured[label]["accuracy"].items()}
                                for label, key in (("base", "before"), ("edited", "after"))}
    if control_mask is not None:
        report["control"] = {"masked": control_mask.num_masked,
                             "proxy": _proxy(pipe, control_mask, erased_prompts, retained_prompts, seed),
                             **variant("control")}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shown = erased_prompts[:4] + retained_prompts[:4]
        path = out / "grid.png"
        labelled_grid(images, shown, min(samples, 4)).save(path)
        report["grid"] = str(path)
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return report


def evaluate_ref(ws: Workspace, ref: str, *, base: str | None = None, erased_prompts: list[str] | None = None,
                 retained_prompts: list[str] | None = None, classifier: str = "auto", clip_model: str | None = None,
                 device: str | None = "auto", **evaluate_kwargs) -> dict:
    """Erasure and preservation measurement of a registered mask or release (:func:`evaluate`): ``Workspace.evaluate``.

    Default prompts: the targets the members were calibrated on (erased) and, decided by the
    model, the retained set of :func:`cpreg.prompts.retained_set` (demo models: every base shape,
    colour and background; others: the references, the catalog's other concepts and generic captions).
    ``classifier``: ``auto``, ``demo``, ``nudenet``, ``clip`` or ``none``, resolved (with ``clip_model``)
    by :func:`cpreg.classifiers.resolve_classifier` before the model is loaded; without one the report
    says why. CLIP scores use ``clip_model`` (:func:`cpreg.classifiers.resolve_clip_scorer`).
    """
    from .classifiers import resolve_classifier, resolve_clip_scorer
    from .models import DEMO_MODELS
    from .prompts import retained_set

    entity = ws.registry.resolve(ref)
    members = ws.registry.release_members(entity) if isinstance(entity, Release) else [entity]
    specs = [ws.mask_spec(member) for member in members]
    erased = erased_prompts or list(dict.fromkeys(prompt for spec in specs for prompt in spec.targets))
    model = base or ws.registry.get_base_model(entity.base_model_fingerprint).name
    retained = retained_set(model, specs, erased, retained_prompts)
    chosen = resolve_classifier(classifier, model=model, concepts=specs, erased_prompts=erased,
                                person_prompts=retained.person_prompts, clip_model=clip_model, device=device)
    scorer = resolve_clip_scorer(clip_model, device, chosen.classifier)
    pipe = ws.base_pipeline(entity, model, device=device)
    return evaluate(pipe, ws.load_mask(entity), erased, retained.prompts, retained_groups=retained.groups,
                    classifier=chosen.classifier, classifier_reason=chosen.reason, clip_scorer=scorer.scorer,
                    clip_reason=scorer.reason, colour_fidelity=model in DEMO_MODELS,
                    header={"ref": entity.ref, "model": model}, **evaluate_kwargs)
