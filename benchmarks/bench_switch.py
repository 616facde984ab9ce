"""Benchmark: switching the mask applied to a live SD 1.5-sized UNet (restore all, apply another).

This is what a generation server does per request: ``cpreg.editors.switch(pipe, mask)``. Two
masks over the 16 SD 1.5 ``ff.net.2`` layers (shapes (320|640|1280, 4x that), 49,561,600
weights), each derived with ``derive_mask`` (skill_ratio 0.01, tau 10) from its own synthetic
statistics and bench_calibration's synthetic weights (so about 1.56 M weights each, the size of
its ``derive`` benchmark, 3.1% of those layers) are switched alternately:
every switch restores one mask's weights and prunes the other's. Also timed: the two halves
(``restore_all`` alone, ``apply_mask`` onto the base weights alone), the noise fill, and the
same switches written the way ``apply_mask``/``restore`` worked before the edit stack (legacy).

Models: ``unet`` (default): SD 1.5's ``UNet2DConditionModel`` built from its config with random
weights (859.5 M parameters, 3.4 GB in float32; nothing is downloaded); ``layers``: only the 16
``nn.Linear`` layers under the same paths. Either sits in a minimal pipeline object (``unet`` and
``components``), all the engine needs. Times are per switch: wall clock and this process's CPU
time (all threads); the load average before and after is recorded, as the machine may be shared.

Examples:
    python benchmarks/bench_switch.py
    python benchmarks/bench_switch.py --threads 1 --repeats 100 --json switch.json
    python benchmarks/bench_switch.py --model layers --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from bench_calibration import log
from benchmarking_utils import SD15_FFN, SD15_FFN_SHAPES, build_sd15_unet, machine, report, synthetic_layers, timer
from torch import nn

from cpreg.editors import ConceptMask, apply_mask, derive_mask, edit, restore_all, switch

TAU = 10


def build_layers() -> nn.Module:
    """A module holding only the 16 SD 1.5 ``ff.net.2`` layers, under their UNet paths."""
    root = nn.Module()
    for prefix, width in SD15_FFN:
        parent = root
        *parts, leaf = f"{prefix}.transformer_blocks.0.ff.net.2".split(".")
        for part in parts:
            if getattr(parent, part, None) is None:
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(4 * width, width))
    return root


def build(model: str, device: str) -> SimpleNamespace:
    torch.manual_seed(0)
    unet = build_sd15_unet() if model == "unet" else build_layers()
    unet = unet.to(device).eval()
    return SimpleNamespace(unet=unet, components={"unet": unet})


def derive_masks(pipe, device: str) -> list[ConceptMask]:
    """Two masks of about 1.56 M weights each (bench_calibration's ``derive`` size).

    The 16 layers get bench_calibration's synthetic Gaussian weights (std 1/sqrt(in_features));
    ``derive_mask`` then runs on two sets of synthetic statistics.
    """
    runs = [synthetic_layers(SD15_FFN_SHAPES, TAU, device, seed=seed) for seed in (0, 1)]
    weights = {name: pipe.unet.get_submodule(name).weight for name in runs[0][1]}
    with torch.no_grad():
        for name, weight in runs[0][1].items():
            weights[name].copy_(weight)
    return [derive_mask(stats, weights, skill_ratio=0.01, tau=TAU) for stats, _ in runs]


def summary(wall: list[float], cpu: list[float]) -> dict:
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "min_ms": 1000 * min(wall),
        "median_ms": 1000 * statistics.median(wall),
        "cpu_min_ms": 1000 * min(cpu),
        "cpu_median_ms": 1000 * statistics.median(cpu),
    }


def bench_switch(pipe, masks: list[ConceptMask], fill: str, repeats: int, device: str) -> dict:
    """``repeats`` switches between the two masks, after one warm-up switch."""
    switch(pipe, masks[1], label="mask-1", fill=fill)
    wall, cpu = [], []
    for i in range(repeats):
        with timer(wall, device, cpu):
            switch(pipe, masks[i % 2], label=f"mask-{i % 2}", fill=fill)
    restore_all(pipe)
    log(f"switch, {fill} fill: min {1000 * min(wall):.2f} ms, median {1000 * statistics.median(wall):.2f} ms ({repeats} switches)")
    return summary(wall, cpu)


def bench_legacy(pipe, masks: list[ConceptMask], repeats: int, device: str) -> dict:
    """The same switches written as ``apply_mask`` and ``restore`` were before the edit stack
    (commit 0107156): ``flat[indices]`` reads and writes, the indices moved to the weight's
    device on every apply, two whole passes per layer."""
    weights = {name: pipe.unet.get_submodule(name).weight for name in masks[0].layers}

    @torch.no_grad()
    def apply(mask: ConceptMask) -> list:
        saved = []
        for name in sorted(mask.layers):
            flat, indices = weights[name].view(-1), mask.layers[name].indices.to(weights[name].device)
            saved.append((flat, indices, flat[indices].clone()))
            flat[indices] = 0
        return saved

    @torch.no_grad()
    def restore(saved: list) -> None:
        for flat, indices, original in reversed(saved):
            flat[indices] = original

    saved, wall, cpu = apply(masks[1]), [], []
    for i in range(repeats):
        with timer(wall, device, cpu):
            restore(saved)
            saved = apply(masks[i % 2])
    restore(saved)
    log(f"legacy switch (restore, then apply), zero fill: min {1000 * min(wall):.2f} ms, median {1000 * statistics.median(wall):.2f} ms")
    return summary(wall, cpu)


def bench_halves(pipe, masks: list[ConceptMask], repeats: int, device: str) -> dict:
    """``apply_mask`` onto the base weights (zero fill) and ``restore_all``, timed apart."""
    (apply_wall, apply_cpu), (restore_wall, restore_cpu) = ([], []), ([], [])
    for i in range(repeats):
        with timer(apply_wall, device, apply_cpu):
            apply_mask(pipe, masks[i % 2])
        with timer(restore_wall, device, restore_cpu):
            restore_all(pipe)
    log(f"apply_mask alone: min {1000 * min(apply_wall):.2f} ms; restore_all alone: min {1000 * min(restore_wall):.2f} ms")
    return {"apply_zero": summary(apply_wall, apply_cpu), "restore_all": summary(restore_wall, restore_cpu)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("unet", "layers"), default="unet")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=50, help="timed switches with the zero fill (and halves)")
    parser.add_argument("--noise-repeats", type=int, default=20, help="timed switches with the noise fill")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-region", type=int, default=None,
                        help="weights restored, read and overwritten together on the CPU (default: the engine's; 100000000: whole-layer passes)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_region:
        edit._CPU_REGION = args.cpu_region
    args.cpu_region = edit._CPU_REGION
    result = {
        "args": vars(args),
        "machine": machine(args.device),
        "load_average_before": os.getloadavg(),
    }
    log(f"building {args.model} on {args.device}")
    start = time.perf_counter()
    pipe = build(args.model, args.device)
    result["build_s"] = time.perf_counter() - start
    masks = derive_masks(pipe, args.device)
    result["masked"] = [mask.num_masked for mask in masks]
    log(f"masks of {result['masked']} weights")
    result["switch_zero"] = bench_switch(pipe, masks, "zero", args.repeats, args.device)
    result["switch_noise"] = bench_switch(pipe, masks, "noise", args.noise_repeats, args.device)
    result.update(bench_halves(pipe, masks, args.repeats, args.device))
    result["legacy_switch_zero"] = bench_legacy(pipe, masks, args.repeats, args.device)
    result["load_average_after"] = os.getloadavg()
    report(result, args.json)
    return result


if __name__ == "__main__":
    main()
