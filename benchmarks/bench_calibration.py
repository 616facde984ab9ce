"""Benchmark: ConceptPrune calibration and mask derivation.

In one run, on the same model and prompts, this times

(a) ``engine``:  ``cpreg.editors.calibrate`` (T steps scheduled, stops after tau, batched, no decode);
(b) ``literal``: the reference-code way: one pipeline call per prompt, the full T steps, the
    image decoded (default ``output_type``), the global RNG re-seeded per prompt, a forward hook
    on every ``ff.net.0`` output accumulating the statistics of steps < tau;
(c) ``bare``:    the same batches through the pipeline, stopped after tau denoiser calls by a
    pre-hook, with no layer hooks: the floor for (a); ``(a_loop - c) / c`` is the hook overhead,
    ``a_loop`` being (a) without the model fingerprint it also computes (timed separately);
(d) ``derive``:  ``derive_mask`` from synthetic statistics for the 16 SD 1.5 ``ff.net.2`` shapes.

Models: ``tiny`` (the tiny random SD pipeline of cpreg.tiny) or ``sd15`` (the Stable Diffusion 1.5
architecture -- UNet, CLIP ViT-L/14 text encoder, VAE -- with random weights built from its
config; nothing is downloaded; the tokenizer is the tiny offline one). Scheduler: DDIM, so T
steps are exactly T denoiser calls.

Examples:
    python benchmarks/bench_calibration.py --model tiny
    python benchmarks/bench_calibration.py --model sd15 --targets 2 --references 2 --batch-size 4
    python benchmarks/bench_calibration.py --model sd15 --device cuda --targets 8 --references 8 --repeats 3
    python benchmarks/bench_calibration.py --derive-only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time

import torch

from cpreg.editors import CalibrationConfig, calibrate, derive_mask, model_fingerprint

from benchmarking_utils import (  # this folder's shared pieces
    SD15_FFN_SHAPES,
    build,
    machine,
    prompts,
    relative_difference,
    report,
    run_bare,
    summary,
    sync,
    synthetic_layers,
    time_calls,
    timer,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def engine_config(args) -> CalibrationConfig:
    """The calibration the engine (a) runs and the bare loop (c) mirrors."""
    return CalibrationConfig(
        num_inference_steps=args.steps,
        tau=args.tau,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        height=args.size,
        width=args.size,
    )


def run_literal(pipe, targets, references, args) -> dict:
    """The reference code's way: per prompt, full T steps, decoded image, hook on ff.net.0 outputs."""
    geglus = {name[:-1] + "2": module for name, module in pipe.unet.named_modules() if name.endswith("ff.net.0")}
    sums = {"target": {}, "reference": {}}
    state = {"calls": 0, "set": "target"}

    def count(module, args_, kwargs):
        state["calls"] += 1

    def record(name):
        def hook(module, inputs, output):
            step = state["calls"] - 1
            if step >= args.tau:
                return
            rows = output.detach().double().reshape(-1, output.shape[-1])  # float64: the exact reference
            rows = rows / rows.norm(dim=1, keepdim=True)
            table = sums[state["set"]]
            if name not in table:
                table[name] = torch.zeros(args.tau, rows.shape[1], device=rows.device, dtype=torch.float64)
            table[name][step] += rows.square().sum(0)

        return hook

    handles = [pipe.unet.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [module.register_forward_hook(record(name)) for name, module in geglus.items()]
    try:
        for kind, group in (("target", targets), ("reference", references)):
            for prompt in group:
                state["calls"], state["set"] = 0, kind
                torch.manual_seed(args.seed)
                image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size).images[0]
                assert state["calls"] == args.steps and image.size == (args.size, args.size)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def bench_per_call(pipe, targets, references, args) -> dict:
    """Hook overhead per denoiser call: one UNet forward on a fixed guidance batch, alternately with
    and without the engine's recording hooks (the same ones ``calibrate`` registers), many times."""
    from cpreg.editors.calibration import _Recorder
    from cpreg.editors.hooks import hooked_layers

    items = (targets + references)[: args.batch_size]
    device = pipe.unet.device
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(items, device, 1, True, negative_prompt=None)[:2]
        embeddings = torch.cat([uncond, cond])
        latents = torch.randn(len(items), 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        latents = torch.cat([latents, latents]).to(device=device, dtype=pipe.unet.dtype)
    layers = hooked_layers(pipe, "ffn_out")
    recorder = _Recorder(layers, 1, device)
    recorder.start_batch([0] * len(items))

    def forward():
        with torch.no_grad():
            pipe.unet(latents, 500, encoder_hidden_states=embeddings)

    spent = [0.0]

    def timed_hook(name):
        # the engine's own hook, plus a clock around it: the time the hooks take inside the call,
        # a measure that load from other processes slows down alike with the call itself
        record = recorder.layer_hook(name)

        def hook(module, inputs):
            sync(args.device)
            start = time.perf_counter()
            record(module, inputs)
            sync(args.device)
            spent[0] += time.perf_counter() - start

        return hook

    forward()  # warm-up
    bare, hooked, bare_cpu, hooked_cpu, shares = [], [], [], [], []
    for _ in range(args.per_call):
        with timer(bare, args.device, bare_cpu):
            forward()
        handles = [module.register_forward_pre_hook(timed_hook(name)) for name, module in layers.modules.items()]
        spent[0] = 0.0
        try:
            with timer(hooked, args.device, hooked_cpu):
                forward()
        finally:
            for handle in handles:
                handle.remove()
        shares.append(spent[0] / (hooked[-1] - spent[0]))
    ratios = [h / b - 1 for h, b in zip(hooked, bare)]
    result = {
        "batch_rows": latents.shape[0],
        "bare_s": bare,
        "hooked_s": hooked,
        "bare_cpu_s": bare_cpu,
        "hooked_cpu_s": hooked_cpu,
        "overhead_min_wall": min(hooked) / min(bare) - 1,
        "overhead_min_cpu": min(hooked_cpu) / min(bare_cpu) - 1,
        "overhead_median_pair_wall": statistics.median(ratios),
        "hook_time_over_rest": shares,
        "hook_time_over_rest_median": statistics.median(shares),
    }
    log(
        f"per call ({latents.shape[0]} rows): bare min {min(bare):.3f} s, hooked min {min(hooked):.3f} s;"
        f" overhead {result['overhead_min_wall']:+.2%} (min wall), {result['overhead_min_cpu']:+.2%} (min CPU),"
        f" {result['overhead_median_pair_wall']:+.2%} (median of pairs); time inside the hooks:"
        f" {result['hook_time_over_rest_median']:+.2%} of the rest of the call (median)"
    )
    return result


def bench_derive(args) -> dict:
    stats, weights = synthetic_layers(SD15_FFN_SHAPES, args.tau, args.device)
    assert len(weights) == 16 and sum(w.numel() for w in weights.values()) == 49_561_600
    mask = derive_mask(stats, weights, skill_ratio=0.01, tau=args.tau)  # warm-up
    times = time_calls(lambda: derive_mask(stats, weights, skill_ratio=0.01, tau=args.tau), args.derive_repeats, args.device)
    log(f"derive_mask: {[round(t, 3) for t in times]} s, {mask.num_masked} masked ({mask.fraction:.4%} of UNet weights)")
    return {**summary(times), "masked": mask.num_masked, "layers": 16, "weights": 49_561_600}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--targets", type=int, default=None, help="target prompts (default: tiny 8, sd15 2)")
    parser.add_argument("--references", type=int, default=None, help="reference prompts (default: tiny 8, sd15 2)")
    parser.add_argument("--steps", type=int, default=50, help="T, scheduled denoising steps")
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per engine batch (default: all prompts)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: tiny 32, sd15 256)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved engine/bare repeats (default: tiny 5, sd15 2)")
    parser.add_argument("--derive-repeats", type=int, default=5)
    parser.add_argument("--skip-literal", action="store_true", help="do not run (b), the slow literal loop")
    parser.add_argument("--skip-loops", action="store_true", help="do not run (a) and (c), the engine and bare loops")
    parser.add_argument(
        "--per-call", type=int, default=0, help="also time N alternating UNet calls with/without the engine's hooks"
    )
    parser.add_argument("--skip-derive", action="store_true")
    parser.add_argument("--derive-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    args.targets = args.targets if args.targets is not None else (8 if tiny else 2)
    args.references = args.references if args.references is not None else (8 if tiny else 2)
    args.size = args.size or (32 if tiny else 256)
    args.repeats = args.repeats or (5 if tiny else 2)
    args.batch_size = args.batch_size or (args.targets + args.references)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    result = {
        "args": vars(args),
        "machine": machine(args.device),
    }
    if not args.derive_only:
        log(f"building {args.model} on {args.device} ({args.dtype})")
        start = time.perf_counter()
        pipe = build(args.model, args.device, dtype)
        result["build_s"] = time.perf_counter() - start
        targets, references = prompts(args.targets, args.references)
        result["prompts"] = {"targets": targets, "references": references}
        n = len(targets) + len(references)

        log("warm-up")
        config = engine_config(args)
        warm = dataclasses.replace(config, num_inference_steps=2, tau=1)
        run_bare(pipe, targets[:1] + references[:1], warm)
        calibrate(pipe, targets[:1], references[:1], warm)

        if args.per_call:
            result["per_call"] = bench_per_call(pipe, targets, references, args)
    if not args.derive_only and not args.skip_loops:
        fingerprint, fingerprint_cpu = [], []
        with timer(fingerprint, args.device, fingerprint_cpu):
            model_fingerprint(pipe)
        log(f"model_fingerprint: {fingerprint[0]:.2f} s")
        engine, engine_cpu, bare, bare_cpu, engine_stats = [], [], [], [], None
        # Interleaved repeats; the minimum is the run least disturbed by other load on the machine.
        for repeat in range(args.repeats):
            with timer(bare, args.device, bare_cpu):
                calls = run_bare(pipe, targets + references, config)
            log(f"bare loop #{repeat}: {bare[-1]:.2f} s wall, {bare_cpu[-1]:.2f} s CPU ({calls} denoiser calls)")
            with timer(engine, args.device, engine_cpu):
                engine_stats = calibrate(pipe, targets, references, config)
            log(f"engine calibrate #{repeat}: {engine[-1]:.2f} s wall, {engine_cpu[-1]:.2f} s CPU")
        # the engine also fingerprints the model; the hook overhead compares the loops alone
        engine_loop = min(engine) - fingerprint[0]
        engine_loop_cpu = min(engine_cpu) - fingerprint_cpu[0]
        result.update(
            fingerprint_s=fingerprint[0],
            engine_s=engine,
            engine_cpu_s=engine_cpu,
            bare_s=bare,
            bare_cpu_s=bare_cpu,
            engine_min_s=min(engine),
            engine_loop_min_s=engine_loop,
            bare_min_s=min(bare),
            hook_overhead_wall=engine_loop / min(bare) - 1,
            hook_overhead_cpu=engine_loop_cpu / min(bare_cpu) - 1,
            engine_denoiser_calls=math.ceil(n / args.batch_size) * args.tau,
        )
        log(f"hook overhead: {result['hook_overhead_wall']:+.2%} wall, {result['hook_overhead_cpu']:+.2%} CPU time")
        if not args.skip_literal:
            literal, literal_cpu = [], []
            with timer(literal, args.device, literal_cpu):
                sums = run_literal(pipe, targets, references, args)
            result.update(
                literal_s=literal[0],
                literal_cpu_s=literal_cpu[0],
                literal_denoiser_calls=n * args.steps,
                speedup_vs_literal=literal[0] / min(engine),
                speedup_vs_literal_cpu=literal_cpu[0] / min(engine_cpu),
                max_relative_difference=relative_difference(engine_stats, sums),
            )
            log(
                f"literal: {literal[0]:.2f} s wall, {literal_cpu[0]:.2f} s CPU; speedup {result['speedup_vs_literal']:.1f}x;"
                f" statistics differ by {result['max_relative_difference']}"
            )
    if not args.skip_derive:
        result["derive"] = bench_derive(args)
    report(result, args.json)
    return result


if __name__ == "__main__":
    main()
