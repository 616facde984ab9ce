"""One prepared GPU run: CUDA correctness and the headline speed figures of cpreg (issue 18).

Usage:
    bash benchmarks/gpu_check.sh /tmp/out         # one H200: SD 1.5 architecture, 512x512, under 8 minutes
    bash benchmarks/gpu_check.sh /tmp/out --dry   # the CPU: the tiny pipeline, small counts, the same code paths
    python benchmarks/gpu_check.py --out /tmp/out [--dry]

Writes ``OUT/gpu_check.json``, rewritten after every section, and the log ``OUT/gpu_check.log``.
Models have random weights built from their configs (see ``benchmarking_utils``); nothing is
downloaded. Sections, in order:

- ``environment``: versions, the device, the plan;
- ``build``: the plan's model (SD 1.5 architecture, or tiny when dry) in fp32 and fp16 on its device;
- ``cuda_vs_cpu``: fp32 statistics of the tiny pipeline on CUDA (TF32 off) against the CPU's;
- ``dtypes``: the fp16 and bf16 models calibrate (statistics fp32); their masks against the fp32 mask;
- ``edit_exactness``: ``apply_mask``/``restore``, the edit stack's ``restore_all`` and ``switch``, bit-exact;
- ``noise_reference``: ``CalibrationConfig(noise="reference")``, where that field exists;
- ``calibration_speed``: 20 + 20 prompts, T 50, tau 10, fp16, batch sizes 8/16/40: ``calibrate``
  against the bare loop, UNet calls, rows per second, hook overhead, CUDA memory peak;
- ``derive_apply_switch``: ``derive_mask`` on the device for an SD 1.5-sized mask, apply/restore, switch;
- ``later``: GPU figures of modules not built yet (sign-recovery attack, serve throughput);
- ``summary``: the headline figures against their targets.

Each section has a time budget: one that would not fit in what is left of the run's budget is
skipped, with the reason; one that raises records its error, and the others' results stay.
The exit status is 1 when a section failed or raised, else 0.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cpreg.editors import (
    ActivationStats,
    CalibrationConfig,
    ConceptMask,
    EditStackError,
    active_edits,
    apply_mask,
    calibrate,
    derive_mask,
    hooked_layers,
    model_fingerprint,
    overlap,
    restore_all,
    switch,
)

from benchmarking_utils import (  # this folder's shared pieces
    build,
    prompts,
    relative_difference,
    run_bare,
    sums,
    summary,
    synthetic_layers,
    time_calls,
    timer,
)

log = logging.getLogger("gpu_check")

TINY_SKILL_RATIO = 0.05  # the tiny model's FFN layers have 128 or 256 inputs: k = 6 or 12 per row
#: Largest relative L2 difference of one (set, layer, step) statistics vector between CUDA and CPU fp32.
NORMWISE_TOLERANCE = 1e-4
#: The headline targets (docs/benchmarks.md, "GPU"), on the medians of the timed repeats.
TARGETS = {"calibrate_s": 3.0, "hook_overhead": 0.05, "derive_s": 0.2, "switch_s": 0.005}
#: Later GPU figures -> the module each waits for.
LATER = {"sign_recovery": "cpreg.attacks", "serve_throughput": "cpreg.serve"}


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: :data:`FULL` on CUDA, :data:`DRY` on the CPU."""

    model: str  # a benchmarking_utils.build model: "sd15" or "tiny"
    device: str
    dtype: str  # of the model the edit and speed sections use (float16 is slow on a CPU)
    size: int  # image height and width
    steps: int  # T
    tau: int
    skill_ratio: float
    check_prompts: int  # target prompts (and as many references) of the correctness sections
    speed_prompts: int  # target prompts (and as many references) of calibration_speed
    batch_sizes: tuple[int, ...]
    speed_repeats: int  # bare / calibrate pairs per batch size
    edit_repeats: int  # timed derive, apply/restore and switch calls
    total_s: float  # the whole run's budget

    def calibration(self, batch_size: int) -> CalibrationConfig:
        return CalibrationConfig(
            num_inference_steps=self.steps, tau=self.tau, batch_size=batch_size, height=self.size, width=self.size
        )


FULL = Plan(
    model="sd15", device="cuda", dtype="float16", size=512, steps=50, tau=10, skill_ratio=0.01,
    check_prompts=4, speed_prompts=20, batch_sizes=(8, 16, 40), speed_repeats=2, edit_repeats=20, total_s=420.0,
)  # fmt: skip
DRY = Plan(
    model="tiny", device="cpu", dtype="float32", size=32, steps=4, tau=2, skill_ratio=TINY_SKILL_RATIO,
    check_prompts=2, speed_prompts=2, batch_sizes=(2, 4), speed_repeats=1, edit_repeats=3, total_s=900.0,
)  # fmt: skip


class NotRun(Exception):
    """A section that does not run here; ``status`` is ``skipped`` or ``not built``, the message says why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class Run:
    """The state of one run: its plan, the clock, the models built and the results so far."""

    plan: Plan
    json_path: Path
    started: float = field(default_factory=time.perf_counter)
    section_end: float = math.inf
    pipes: dict[str, object] = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def left_s(self) -> float:
        """Seconds left of the run's budget."""
        return self.plan.total_s - (time.perf_counter() - self.started)

    def section_over(self) -> bool:
        """True once the running section has spent its budget (loops check it between runs)."""
        return time.perf_counter() > self.section_end

    def pipe(self, dtype: str | None = None):
        """The plan's model in ``dtype`` (float32 or, by default, the plan's), as the build section left it."""
        dtype = dtype or self.plan.dtype
        if dtype not in self.pipes:
            raise NotRun("skipped", "no model: the build section did not finish")
        return self.pipes[dtype]

    def write(self) -> None:
        """Write the results so far (atomically: a reader never sees half a file)."""
        self.results["elapsed_s"] = time.perf_counter() - self.started
        partial = self.json_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.results, indent=2))
        os.replace(partial, self.json_path)


# ---------------------------------------------------------------------------------------- helpers


def cuda_on(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise NotRun("skipped", "no CUDA")


@contextmanager
def strict_fp32():
    """TF32 off for CUDA matrix products and convolutions (cuDNN allows it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def memory_peak(peaks: list, device: str):
    """Append the peak CUDA memory allocated inside the block (the model's weights included); no-op on the CPU."""
    if not cuda_on(device):
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    peaks.append(torch.cuda.max_memory_allocated())


def as_dtype(pipe, dtype: torch.dtype):
    """A copy of ``pipe`` in ``dtype`` on the same device."""
    return copy.deepcopy(pipe).to(dtype=dtype)


def unet_params(pipe) -> int:
    return sum(parameter.numel() for parameter in pipe.unet.parameters())


def ffn_weights(pipe) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in hooked_layers(pipe, "ffn_out").modules.items()}


def jaccard(a: ConceptMask, b: ConceptMask) -> float:
    """Intersection over union of two masks of one architecture (fingerprints aside: a bf16 load hashes apart)."""
    return overlap(dataclasses.replace(a, fingerprint=None), dataclasses.replace(b, fingerprint=None))["iou"]


def calibrated_mask(
    pipe, targets: Sequence[str], references: Sequence[str], config: CalibrationConfig, run: Run, skill_ratio: float
) -> tuple[ActivationStats, ConceptMask, dict]:
    """Calibrate ``pipe``, derive its mask on the run's device; also a row describing both."""
    seconds: list[float] = []
    with timer(seconds, run.plan.device):
        stats = calibrate(pipe, targets, references, config)
    mask = derive_mask(stats, ffn_weights(pipe), skill_ratio, device=run.plan.device)
    values = [*stats.target.values(), *stats.reference.values()]
    row = {
        "calibrate_s": seconds[0],
        "stats_dtypes": sorted({str(value.dtype).removeprefix("torch.") for value in values}),
        "finite": all(bool(torch.isfinite(value).all()) for value in values),
        "masked": mask.num_masked,
    }
    return stats, mask, row


def sound(row: dict) -> bool:
    """True when a :func:`calibrated_mask` row has fp32, finite statistics."""
    return row["stats_dtypes"] == ["float32"] and row["finite"]


def synthetic_inputs(pipe, run: Run, seed: int) -> tuple[ActivationStats, dict[str, torch.Tensor]]:
    """Random statistics and weights on the device for ``pipe``'s ffn_out layers (SD 1.5: about 1.5 M masked)."""
    shapes = hooked_layers(pipe, "ffn_out").shapes()
    return synthetic_layers(shapes, run.plan.tau, run.plan.device, seed, unet_params(pipe))


def synthetic_mask(pipe, run: Run, seed: int) -> ConceptMask:
    """A release-sized mask of ``pipe`` from :func:`synthetic_inputs`."""
    stats, weights = synthetic_inputs(pipe, run, seed)
    return derive_mask(stats, weights, run.plan.skill_ratio, device=run.plan.device)


def weights_as_expected(pipe, base: dict[str, torch.Tensor], zeroed: ConceptMask | None = None) -> bool:
    """True when every UNet parameter equals ``base`` bit for bit, except ``zeroed``'s positions, which are 0."""
    for name, parameter in pipe.unet.named_parameters():
        expected = base[name]
        layer = zeroed.layers.get(name.removesuffix(".weight")) if zeroed is not None else None
        if layer is not None:
            indices = layer.indices.to(expected.device)
            expected = expected.reshape(-1).index_fill(0, indices, 0).view_as(expected)
        if not torch.equal(parameter.detach(), expected):
            return False
    return True


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # a copy of the tree without its repository
    return done.stdout.strip()


# --------------------------------------------------------------------------------------- sections


def environment(run: Run) -> dict:
    """Versions, the device and the plan."""
    import diffusers
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "commit": git_commit(),
        "plan": dataclasses.asdict(run.plan),
        "calibration_config_fields": [item.name for item in dataclasses.fields(CalibrationConfig)],
    }


def build_models(run: Run) -> dict:
    """The plan's model in fp32 and in the plan's dtype on its device, for the sections after this one."""
    plan = run.plan
    if plan.device == "cuda":
        require_cuda()
    seconds: list[float] = []
    with timer(seconds, plan.device):
        fp32 = build(plan.model, plan.device, torch.float32)
        run.pipes["float32"] = fp32
        if plan.dtype != "float32":
            run.pipes[plan.dtype] = as_dtype(fp32, getattr(torch, plan.dtype))
    weights = ffn_weights(fp32)
    return {
        "model": plan.model,
        "device": plan.device,
        "build_s": seconds[0],
        "unet_params": unet_params(fp32),
        "ffn_layers": len(weights),
        "ffn_weights": sum(weight.numel() for weight in weights.values()),
        "cuda_memory_allocated_bytes": torch.cuda.memory_allocated() if cuda_on(plan.device) else None,
    }


def check_cuda_vs_cpu(run: Run) -> dict:
    """fp32 statistics of the tiny pipeline on CUDA (TF32 off) equal the CPU's within NORMWISE_TOLERANCE."""
    require_cuda()
    plan = run.plan
    cpu_pipe = build("tiny", "cpu", torch.float32)
    cuda_pipe = copy.deepcopy(cpu_pipe).to("cuda")
    targets, references = prompts(plan.check_prompts, plan.check_prompts)
    config = CalibrationConfig(num_inference_steps=plan.steps, tau=plan.tau, batch_size=2 * plan.check_prompts)
    cpu_stats = calibrate(cpu_pipe, targets, references, config)
    with strict_fp32():
        cuda_stats = calibrate(cuda_pipe, targets, references, config)
    difference = relative_difference(cuda_stats, sums(cpu_stats))
    cpu_mask = derive_mask(cpu_stats, ffn_weights(cpu_pipe), TINY_SKILL_RATIO)
    cuda_mask = derive_mask(cuda_stats, ffn_weights(cuda_pipe), TINY_SKILL_RATIO)
    same_fingerprint = cpu_stats.fingerprint == cuda_stats.fingerprint
    log.info("CUDA vs CPU statistics: %s (tolerance: normwise %g)", difference, NORMWISE_TOLERANCE)
    return {
        "model": "tiny",
        "config": config.to_dict(),
        "tf32": False,
        "difference": difference,
        "tolerance": {"normwise": NORMWISE_TOLERANCE},
        "fingerprints_equal": same_fingerprint,
        "masked": {"cpu": cpu_mask.num_masked, "cuda": cuda_mask.num_masked},
        "mask_jaccard": jaccard(cuda_mask, cpu_mask),
        "passed": difference["normwise"] <= NORMWISE_TOLERANCE and same_fingerprint,
    }


def check_dtypes(run: Run) -> dict:
    """fp16 and bf16 models calibrate with fp32 statistics; their masks against the fp32 (TF32 off) mask."""
    plan = run.plan
    fp32 = run.pipe("float32")
    targets, references = prompts(plan.check_prompts, plan.check_prompts)
    config = plan.calibration(2 * plan.check_prompts)
    with strict_fp32():
        exact_stats, exact_mask, exact_row = calibrated_mask(fp32, targets, references, config, run, plan.skill_ratio)
    rows = {"float32": exact_row}
    for name in ("float16", "bfloat16"):
        pipe = run.pipes[name] if name in run.pipes else as_dtype(fp32, getattr(torch, name))
        stats, mask, row = calibrated_mask(pipe, targets, references, config, run, plan.skill_ratio)
        rows[name] = {
            **row,
            "difference_vs_float32": relative_difference(stats, sums(exact_stats)),
            "jaccard_vs_float32": jaccard(mask, exact_mask),
        }
        log.info("%s: %s", name, rows[name])
        del pipe  # a copy made here goes before the next sections
    if cuda_on(plan.device):
        torch.cuda.empty_cache()
    return {"config": config.to_dict(), "tf32_for_float32": False, "dtypes": rows, "passed": all(map(sound, rows.values()))}


def check_edit_exactness(run: Run) -> dict:
    """apply_mask/restore, a stack of two, restore_all and switch leave the UNet bit-exact."""
    pipe = run.pipe()
    a, b = synthetic_mask(pipe, run, seed=0), synthetic_mask(pipe, run, seed=1)
    base = {name: parameter.detach().clone() for name, parameter in pipe.unet.named_parameters()}
    checks = {}
    try:
        with apply_mask(pipe, a, label="a"):
            checks["apply_zeroes_the_mask_only"] = weights_as_expected(pipe, base, zeroed=a)
        checks["restore_bit_exact"] = weights_as_expected(pipe, base)
        with apply_mask(pipe, a, label="a", fill="noise"):
            checks["noise_changes_the_weights"] = not weights_as_expected(pipe, base)
        checks["noise_restore_bit_exact"] = weights_as_expected(pipe, base)
        apply_mask(pipe, a, label="a")
        apply_mask(pipe, b, label="b")
        checks["stack_of_two"] = [edit.label for edit in active_edits(pipe)] == ["a", "b"]
        try:
            apply_mask(pipe, a, label="a again")
            checks["double_apply_refused"] = False
        except EditStackError:
            checks["double_apply_refused"] = True
        restore_all(pipe)
        checks["restore_all_bit_exact"] = weights_as_expected(pipe, base) and not active_edits(pipe)
        switch(pipe, a, label="a")
        switch(pipe, b, label="b")
        checks["switch_leaves_one_edit"] = [edit.label for edit in active_edits(pipe)] == ["b"]
        checks["switch_zeroes_the_new_mask_only"] = weights_as_expected(pipe, base, zeroed=b)
        restore_all(pipe)
        checks["switch_restore_all_bit_exact"] = weights_as_expected(pipe, base)
    finally:
        restore_all(pipe)
    log.info("edit checks: %s", checks)
    masked = {"a": a.num_masked, "b": b.num_masked}
    return {"dtype": run.plan.dtype, "masked": masked, "checks": checks, "passed": all(checks.values())}


def check_noise_reference(run: Run) -> dict:
    """``noise="reference"`` calibration (in the plan's dtype) against the default CPU noise.

    "not built" where ``CalibrationConfig`` has no ``noise`` field.
    """
    names = {item.name for item in dataclasses.fields(CalibrationConfig)}
    if "noise" not in names:
        raise NotRun("not built", "CalibrationConfig has no `noise` field on this branch")
    plan = run.plan
    pipe = run.pipe()
    targets, references = prompts(plan.check_prompts, plan.check_prompts)
    config = plan.calibration(2 * plan.check_prompts)
    cpu_stats, cpu_mask, cpu_row = calibrated_mask(pipe, targets, references, config, run, plan.skill_ratio)
    reference_config = dataclasses.replace(config, noise="reference")
    stats, mask, row = calibrated_mask(pipe, targets, references, reference_config, run, plan.skill_ratio)
    again, _, _ = calibrated_mask(pipe, targets, references, reference_config, run, plan.skill_ratio)
    row.update(
        difference_vs_cpu_noise=relative_difference(stats, sums(cpu_stats)),
        jaccard_vs_cpu_noise=jaccard(mask, cpu_mask),
        difference_between_two_runs=relative_difference(again, sums(stats)),
    )
    log.info("noise=reference: %s", row)
    return {
        "dtype": plan.dtype,
        "stats_dtype_field": "stats_dtype" in names,
        "cpu_noise": cpu_row,
        "reference_noise": row,
        "passed": sound(cpu_row) and sound(row),
    }


def time_calibration(run: Run) -> dict:
    """calibrate (in the plan's dtype) against the bare loop per batch size; see :func:`time_batch_size`."""
    plan = run.plan
    pipe = run.pipe()
    targets, references = prompts(plan.speed_prompts, plan.speed_prompts)
    fingerprint: list[float] = []
    with timer(fingerprint, plan.device):
        model_fingerprint(pipe)  # calibrate computes it too: the loop alone is calibrate minus this
    batch_sizes = {}
    for batch_size in plan.batch_sizes:
        if run.section_over():
            batch_sizes[str(batch_size)] = {"skipped": "the section's budget is spent"}
            continue
        batch_sizes[str(batch_size)] = figures = time_batch_size(run, pipe, targets, references, batch_size, fingerprint[0])
        log.info("batch size %d: %s", batch_size, figures)
    return {
        "prompts": {"targets": len(targets), "references": len(references)},
        "steps": plan.steps,
        "tau": plan.tau,
        "fingerprint_s": fingerprint[0],
        "batch_sizes": batch_sizes,
    }


def time_batch_size(
    run: Run, pipe, targets: list[str], references: list[str], batch_size: int, fingerprint_s: float
) -> dict:
    """Interleaved bare / calibrate runs of one batch size (at least one pair, more while the budget lasts).

    ``unet_rows``: batch rows through the UNet, two per prompt (guidance) in each of tau calls;
    ``hook_overhead``: calibrate without its fingerprint over the bare loop, on the medians.
    """
    plan = run.plan
    items = targets + references
    config = plan.calibration(batch_size)
    warm = dataclasses.replace(config, num_inference_steps=2, tau=1)  # one UNet call per batch
    run_bare(pipe, items, warm)
    calibrate(pipe, targets, references, warm)
    calibrated, bare, calibrated_peak, bare_peak = [], [], [], []
    for _ in range(plan.speed_repeats):
        if calibrated and run.section_over():
            break
        with memory_peak(bare_peak, plan.device), timer(bare, plan.device):
            calls = run_bare(pipe, items, config)
        with memory_peak(calibrated_peak, plan.device), timer(calibrated, plan.device):
            calibrate(pipe, targets, references, config)
    rows = 2 * len(items) * plan.tau
    calibrate_s, bare_s = statistics.median(calibrated), statistics.median(bare)
    loop_s = calibrate_s - fingerprint_s
    return {
        "unet_calls": calls,
        "unet_rows": rows,
        "calibrate_s": summary(calibrated),
        "calibrate_loop_s": loop_s,
        "bare_s": summary(bare),
        "unet_rows_per_s": {"calibrate": rows / calibrate_s, "calibrate_loop": rows / loop_s, "bare": rows / bare_s},
        "hook_overhead": loop_s / bare_s - 1,
        "memory_peak_bytes": (
            {"calibrate": max(calibrated_peak), "bare": max(bare_peak)} if bare_peak else {"skipped": "no CUDA"}
        ),
    }


def time_edits(run: Run) -> dict:
    """derive_mask on the device for an SD 1.5-sized mask; apply/restore and switch between two releases."""
    plan = run.plan
    pipe = run.pipe()
    stats, weights = synthetic_inputs(pipe, run, seed=0)

    def derive() -> ConceptMask:
        return derive_mask(stats, weights, plan.skill_ratio, device=plan.device)

    first_derive: list[float] = []
    with timer(first_derive, plan.device):
        a = derive()
    derive_s = time_calls(derive, plan.edit_repeats, plan.device)
    b = synthetic_mask(pipe, run, seed=1)
    first_apply: list[float] = []
    apply_s: list[float] = []
    restore_s: list[float] = []
    switch_s: list[float] = []
    try:
        with timer(first_apply, plan.device):
            edit = apply_mask(pipe, a)  # copies the mask's indices to the device, once
        edit.restore()
        switch(pipe, b)  # the same for b
        restore_all(pipe)
        for _ in range(plan.edit_repeats):
            with timer(apply_s, plan.device):
                edit = apply_mask(pipe, a)
            with timer(restore_s, plan.device):
                edit.restore()
        for repeat in range(plan.edit_repeats):
            with timer(switch_s, plan.device):
                switch(pipe, (b, a)[repeat % 2])
    finally:
        restore_all(pipe)
    results = {
        "dtype": plan.dtype,
        "layers": len(weights),
        "masked": {"a": a.num_masked, "b": b.num_masked},
        "first_derive_s": first_derive[0],
        "derive_s": summary(derive_s),
        "first_apply_s": first_apply[0],
        "apply_s": summary(apply_s),
        "restore_s": summary(restore_s),
        "switch_s": summary(switch_s),
    }
    log.info("derive/apply/switch: %s", {key: value for key, value in results.items() if not isinstance(value, dict)})
    return results


def later_figures(run: Run) -> dict:
    """Placeholders: "not built yet" for each later GPU figure whose module does not exist."""
    figures = {}
    for name, module in LATER.items():
        try:
            exists = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            exists = False
        status = "module exists; no GPU check wired here yet" if exists else "not built yet"
        figures[name] = {"module": module, "status": status}
    return figures


def summarise(run: Run) -> dict:
    """The headline figures (medians) against TARGETS, and every correctness section's status."""
    sections = run.results["sections"]
    measured: dict[str, float] = {}
    speed = {size: row for size, row in sections["calibration_speed"].get("batch_sizes", {}).items() if "calibrate_s" in row}
    if speed:
        best = min(speed, key=lambda size: speed[size]["calibrate_s"]["median_s"])
        measured.update(calibrate_s=speed[best]["calibrate_s"]["median_s"], hook_overhead=speed[best]["hook_overhead"])
    edits = sections["derive_apply_switch"]
    if "switch_s" in edits:
        measured.update(derive_s=edits["derive_s"]["median_s"], switch_s=edits["switch_s"]["median_s"])
    headline = run.plan == FULL
    figures = {}
    for key, target in TARGETS.items():
        met = measured[key] <= target if headline and key in measured else None
        figures[key] = {"target": target, "measured": measured.get(key), "met": met}
    if speed:
        figures["calibrate_s"]["batch_size"] = int(best)
    correctness = {name: sections[name]["status"] for name in ("cuda_vs_cpu", "dtypes", "edit_exactness", "noise_reference")}
    note = "SD 1.5 architecture on CUDA" if headline else "dry run (tiny pipeline on the CPU): targets not evaluated"
    log.info("summary (%s): %s; correctness %s", note, figures, correctness)
    return {"note": note, "figures": figures, "correctness": correctness}


#: (name, function, budget in seconds): the sections in the order they run.
SECTIONS: list[tuple[str, Callable[[Run], dict], float]] = [
    ("environment", environment, 5),
    ("build", build_models, 120),
    ("cuda_vs_cpu", check_cuda_vs_cpu, 60),
    ("dtypes", check_dtypes, 90),
    ("edit_exactness", check_edit_exactness, 30),
    ("noise_reference", check_noise_reference, 30),
    ("calibration_speed", time_calibration, 150),
    ("derive_apply_switch", time_edits, 40),
    ("later", later_figures, 1),
    ("summary", summarise, 0),
]


def run_section(run: Run, name: str, function: Callable[[Run], dict], budget_s: float) -> dict:
    """Run one section within its budget; never raises: a failure is recorded in its result."""
    left = run.left_s()
    if left < budget_s:
        reason = f"{left:.0f} s left of the run's {run.plan.total_s:.0f} s, the section may take {budget_s:.0f} s"
        return {"status": "skipped", "reason": reason}
    log.info("section %s (budget %.0f s, %.0f s left)", name, budget_s, left)
    start = time.perf_counter()
    run.section_end = start + budget_s
    try:
        outcome = function(run)
        status = {True: "passed", False: "failed"}.get(outcome.get("passed"), "done")
        outcome = {"status": status, **outcome}
    except NotRun as reason:
        outcome = {"status": reason.status, "reason": str(reason)}
    except Exception as error:  # one failing section must not lose the others' results
        log.exception("section %s raised", name)
        outcome = {"status": "error", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    outcome.update(seconds=time.perf_counter() - start, budget_s=budget_s)
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--dry", action="store_true", help="the CPU, the tiny pipeline, small counts")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(args.out / "gpu_check.log", mode="w")],
    )
    run = Run(DRY if args.dry else FULL, args.out / "gpu_check.json")
    run.results.update(
        script="benchmarks/gpu_check.py", dry=args.dry, budget_s=run.plan.total_s, finished=False, sections={}
    )
    for name, function, budget_s in SECTIONS:
        run.results["sections"][name] = outcome = run_section(run, name, function, budget_s)
        log.info("section %s: %s in %.1f s", name, outcome["status"], outcome.get("seconds", 0.0))
        run.write()
    run.results["finished"] = True
    run.write()
    bad = [name for name, outcome in run.results["sections"].items() if outcome["status"] in ("failed", "error")]
    log.info("done in %.0f s; %s", run.results["elapsed_s"], f"failed or raised: {bad}" if bad else "no section failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
