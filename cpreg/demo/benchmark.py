"""Measurements of the demo model and of ConceptPrune on it (the tables of ``docs/erasure.md``).

    python -m cpreg.demo.benchmark quality  [--samples 4]            # demo model: right shape / colour?
    python -m cpreg.demo.benchmark planted  [--samples 8] [--hooks ffn_out,...] [--ratios 0.01,0.05,0.1]
    python -m cpreg.demo.benchmark concepts [--samples 8]            # demo concepts circle / red (ffn_out)
    python -m cpreg.demo.benchmark taus     [--taus 1,2,5,10]        # planted, ffn_out: tau sweep from stored stats
    python -m cpreg.demo.benchmark release                           # planted: union of zorblat and circle masks

Each prints a markdown table and writes JSON with every number (``--json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..editors import (
    CalibrationConfig,
    HookPoint,
    calibrate,
    derive_mask,
    hooked_layers,
)
from ..evaluate import evaluate
from . import load_classifier
from .vocabulary import (
    BACKGROUND_NAMES,
    BASE_SHAPES,
    COLOUR_NAMES,
    caption,
    reference_prompts,
    retained_prompts,
    target_prompts,
)
from .plant import load_planted_pipeline, planted_ffn_in_indices, planted_ffn_out_indices


def _pipe(planted: bool):
    from diffusers import DiffusionPipeline

    from . import MODEL_DIR

    pipe = load_planted_pipeline() if planted else DiffusionPipeline.from_pretrained(MODEL_DIR, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quality(samples: int, seed: int, steps: int) -> dict:
    """Fraction of images with the requested shape, colour and both, over every base prompt."""
    pipe, classifier = _pipe(False), load_classifier()
    prompts = [caption(s, c, b) for s in BASE_SHAPES for c in COLOUR_NAMES for b in BACKGROUND_NAMES]
    from ..evaluate import _generate

    images = _generate(pipe, prompts, samples, seed, steps, 7.5, 40)
    shape = colour = both = n = 0
    per_shape: dict[str, list[int]] = {}
    for prompt, ims in images.items():
        words = prompt.split()
        for pred in classifier.predict(ims):
            ok_s, ok_c = pred["shape"] == words[2], pred["colour"] == words[1]
            shape, colour, both, n = shape + ok_s, colour + ok_c, both + (ok_s and ok_c), n + 1
            per_shape.setdefault(words[2], []).append(ok_s and ok_c)
    return {"images": n, "shape": shape / n, "colour": colour / n, "both": both / n,
            "per_shape": {k: sum(v) / len(v) for k, v in per_shape.items()}, "samples": samples, "steps": steps}


def precision_recall(mask, truth: dict[str, torch.Tensor], delta: dict[str, torch.Tensor] | None = None,
                     rows_are_neurons: bool = False) -> dict:
    """Precision and recall of ``mask`` against the planted weights ``truth`` (flat indices per layer).

    With ``delta`` (layer -> ``|W_planted - W_base|``), also ``delta_recall``: the share of the planted
    change that the mask covers; and ``neuron_recall``: the share of planted neurons (columns of
    ``ff.net.2``; value/gate rows of ``ff.net.0.proj`` with ``rows_are_neurons``) with a masked weight.
    """
    tp = masked = total = 0
    covered = changed = hit_neurons = neurons = 0.0
    for name, indices in truth.items():
        layer = mask.layers[name]
        hits = layer.indices[torch.isin(layer.indices, indices)]
        tp += hits.numel()
        masked += layer.count
        total += indices.numel()
        if delta is not None:
            flat = delta[name].reshape(-1)
            covered += float(flat[hits].sum())
            changed += float(flat[indices].sum())
            if rows_are_neurons:  # GEGLU: rows j and inner + j are one neuron
                inner = layer.shape[0] // 2
                columns, hit = torch.unique(indices // layer.shape[1] % inner), torch.unique(hits // layer.shape[1] % inner)
            else:
                columns, hit = torch.unique(indices % layer.shape[1]), torch.unique(hits % layer.shape[1])
            hit_neurons += int(torch.isin(columns, hit).sum())
            neurons += columns.numel()
    out = {"precision": tp / masked if masked else 0.0, "recall": tp / total if total else 0.0}
    if delta is not None:
        out["delta_recall"] = covered / changed if changed else 0.0
        out["neuron_recall"] = hit_neurons / neurons if neurons else 0.0
    return out


def planted(samples: int, seed: int, steps: int, hooks: list[str], ratios: list[float], eval_ratio: dict,
            tau: int, control: bool, out: Path | None) -> dict:
    pipe, classifier = _pipe(True), load_classifier()
    truth = {"ffn_out": planted_ffn_out_indices(pipe), "ffn_in": planted_ffn_in_indices(pipe)}
    base = _pipe(False).unet
    delta = {hook: {name: (pipe.unet.get_submodule(name).weight - base.get_submodule(name).weight).abs().detach()
                    for name in layers} for hook, layers in truth.items()}
    results = {}
    for hook in hooks:
        start = time.time()
        stats = calibrate(pipe, target_prompts(), reference_prompts(),
                          CalibrationConfig(hook=HookPoint(hook), num_inference_steps=50, tau=tau, batch_size=20))
        weights = {name: m.weight for name, m in hooked_layers(pipe, hook).modules.items()}
        rows = []
        for ratio in ratios:
            mask = derive_mask(stats, weights, skill_ratio=ratio, tau=min(tau, stats.recorded_steps))
            row = {"skill_ratio": ratio, "masked": mask.num_masked, "fraction_of_component": mask.fraction}
            if hook in truth:
                row.update(precision_recall(mask, truth[hook], delta[hook], rows_are_neurons=hook == "ffn_in"))
            if ratio == eval_ratio.get(hook, eval_ratio.get("*")) or "all" in eval_ratio:
                report = evaluate(pipe, mask, target_prompts(), retained_prompts(), classifier=classifier,
                                  samples=samples, seed=seed, steps=steps, control=control,
                                  out_dir=(out / f"{hook}-{ratio}") if out else None)
                row["eval"] = {k: report[k] for k in ("erased_accuracy_before", "erased_accuracy_after",
                                                      "retained_accuracy_before", "retained_accuracy_after",
                                                      "masked_fraction", "proxy", "control", "grid")}
            rows.append(row)
        results[hook] = {"rows": rows, "seconds": time.time() - start}
        print(json.dumps({hook: results[hook]}, default=float)[:2000], flush=True)
    return results


def concepts(samples: int, seed: int, steps: int, ratios: list[float], out: Path | None) -> dict:
    """ConceptPrune (ffn_out) on concepts the demo model learned from data: the shape circle, the colour red."""
    pipe, classifier = _pipe(False), load_classifier()
    specs = {
        "circle": ([caption("circle", c, b) for b in BACKGROUND_NAMES for c in COLOUR_NAMES],
                   [caption(BASE_SHAPES[1 + i % 3], c, b) for i, (b, c) in enumerate(
                       (b, c) for b in BACKGROUND_NAMES for c in COLOUR_NAMES)],
                   [caption(s, c, "white") for s in BASE_SHAPES[1:] for c in COLOUR_NAMES[:2]]),
        "red": ([caption(s, "red", b) for b in BACKGROUND_NAMES for s in BASE_SHAPES],
                [caption(s, COLOUR_NAMES[1 + i % 4], b) for i, (b, s) in enumerate(
                    (b, s) for b in BACKGROUND_NAMES for s in BASE_SHAPES)],
                [caption(s, c, "white") for s in BASE_SHAPES[:2] for c in COLOUR_NAMES[1:]]),
    }
    results = {}
    for name, (targets, references, retained) in specs.items():
        stats = calibrate(pipe, targets, references, CalibrationConfig(num_inference_steps=50, tau=10, batch_size=20))
        weights = {n: m.weight for n, m in hooked_layers(pipe, "ffn_out").modules.items()}
        rows = []
        for ratio in ratios:
            mask = derive_mask(stats, weights, skill_ratio=ratio)
            report = evaluate(pipe, mask, targets, retained, classifier=classifier, samples=samples, seed=seed,
                              steps=steps, control=False, out_dir=(out / f"{name}-{ratio}") if out else None)
            rows.append({"skill_ratio": ratio, **{k: report[k] for k in (
                "erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before",
                "retained_accuracy_after", "masked_fraction", "proxy")}})
        results[name] = rows
        print(json.dumps({name: rows}, default=float)[:2000], flush=True)
    return results


def taus(samples: int, seed: int, steps: int, ratio: float, tau_list: list[int]) -> dict:
    """ffn_out on the planted model: masks for several tau from one calibration (stored statistics)."""
    pipe, classifier = _pipe(True), load_classifier()
    truth = planted_ffn_out_indices(pipe)
    stats = calibrate(pipe, target_prompts(), reference_prompts(),
                      CalibrationConfig(num_inference_steps=50, tau=max(tau_list), batch_size=20))
    weights = {n: m.weight for n, m in hooked_layers(pipe, "ffn_out").modules.items()}
    rows = []
    for tau in tau_list:
        mask = derive_mask(stats, weights, skill_ratio=ratio, tau=tau)
        report = evaluate(pipe, mask, target_prompts(), retained_prompts(), classifier=classifier, samples=samples,
                          seed=seed, steps=steps)
        rows.append({"tau": tau, "skill_ratio": ratio, "masked": mask.num_masked, **precision_recall(mask, truth),
                     **{k: report[k] for k in ("erased_accuracy_before", "erased_accuracy_after",
                                               "retained_accuracy_before", "retained_accuracy_after")}})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def release(samples: int, seed: int, steps: int, ratio: float) -> dict:
    """A two-concept release on the planted model: union of the zorblat and the circle masks (ffn_out)."""
    from ..editors import union

    pipe, classifier = _pipe(True), load_classifier()
    weights = {n: m.weight for n, m in hooked_layers(pipe, "ffn_out").modules.items()}
    circle_targets = [caption("circle", c, b) for b in BACKGROUND_NAMES for c in COLOUR_NAMES]
    circle_refs = [caption(BASE_SHAPES[1 + i % 3], c, b) for i, (b, c) in enumerate(
        (b, c) for b in BACKGROUND_NAMES for c in COLOUR_NAMES)]
    config = CalibrationConfig(num_inference_steps=50, tau=10, batch_size=20)
    masks = [derive_mask(calibrate(pipe, t, r, config), weights, skill_ratio=ratio)
             for t, r in ((target_prompts(), reference_prompts()), (circle_targets, circle_refs))]
    both = union(masks, ["zorblat", "circle"])
    erased = target_prompts()[:5] + circle_targets[:5]
    retained = [caption(s, c, "black") for s in BASE_SHAPES[1:] for c in COLOUR_NAMES[:3]]
    report = evaluate(pipe, both, erased, retained, classifier=classifier, samples=samples, seed=seed, steps=steps,
                      control=True)
    return {"masked": both.num_masked, "members": [m.num_masked for m in masks],
            **{k: report[k] for k in ("erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before",
                                      "retained_accuracy_after", "masked_fraction", "proxy", "control", "per_prompt")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cpreg.demo.benchmark")
    parser.add_argument("what", choices=["quality", "planted", "concepts", "taus", "release"])
    parser.add_argument("--taus", default="1,2,5,10")
    parser.add_argument("--ratio", type=float, default=0.02, help="skill_ratio of taus / release")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--hooks", default="ffn_out,ffn_in,attn2_k,attn2_v,text_mlp")
    parser.add_argument("--ratios", default="0.01,0.02,0.05,0.1")
    parser.add_argument("--eval-ratio", default="*=0.1", help="hook=ratio,... evaluated with images ('all=1': every ratio)")
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, help="folder for grids")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.what == "quality":
        result = quality(args.samples, args.seed, args.steps)
    elif args.what == "planted":
        eval_ratio = {k: float(v) for k, v in (item.split("=") for item in args.eval_ratio.split(","))}
        result = planted(args.samples, args.seed, args.steps, args.hooks.split(","), ratios, eval_ratio, args.tau,
                         not args.no_control, args.out)
    elif args.what == "concepts":
        result = concepts(args.samples, args.seed, args.steps, ratios, args.out)
    elif args.what == "taus":
        result = taus(args.samples, args.seed, args.steps, args.ratio, [int(t) for t in args.taus.split(",")])
    else:
        result = release(args.samples, args.seed, args.steps, args.ratio)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
