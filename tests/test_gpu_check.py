"""The prepared GPU run (benchmarks/gpu_check.py) in its dry mode: every section runs, or says why not.

The dry mode runs the GPU run's code paths on the CPU with the tiny pipeline, so a GPU session
can run the real thing once, unattended. Timings are recorded but never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: section -> keys its result must have, besides status, seconds and budget_s
SECTION_KEYS = {
    "environment": {"torch", "diffusers", "transformers", "cuda", "gpu", "plan", "calibration_config_fields"},
    "build": {"model", "device", "build_s", "unet_params", "ffn_layers", "ffn_weights", "cuda_memory_allocated_bytes"},
    "cuda_vs_cpu": {"reason"},
    "dtypes": {"config", "dtypes", "passed"},
    "edit_exactness": {"dtype", "masked", "checks", "passed"},
    "noise_reference": set(),
    "calibration_speed": {"prompts", "steps", "tau", "fingerprint_s", "batch_sizes"},
    "derive_apply_switch": {"masked", "first_derive_s", "derive_s", "first_apply_s", "apply_s", "restore_s", "switch_s"},
    "later": {"sign_recovery", "serve_throughput"},
    "summary": {"note", "figures", "correctness"},
}
SPEED_KEYS = {"unet_calls", "unet_rows", "calibrate_s", "calibrate_loop_s", "bare_s", "unet_rows_per_s", "hook_overhead", "memory_peak_bytes"}
TIMES = {"seconds", "min_s", "median_s"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(out), "--dry"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "section summary: done" in (out / "gpu_check.log").read_text()
    return json.loads((out / "gpu_check.json").read_text())


def test_every_section_reports_its_keys(dry_run):
    assert dry_run["dry"] is True and dry_run["finished"] is True
    sections = dry_run["sections"]
    assert list(sections) == list(SECTION_KEYS)
    for name, keys in SECTION_KEYS.items():
        assert keys | {"status", "seconds", "budget_s"} <= sections[name].keys(), name
        assert sections[name]["status"] not in ("error", "failed"), (name, sections[name])


def test_correctness_checks_pass_on_the_cpu(dry_run):
    sections = dry_run["sections"]
    assert (sections["cuda_vs_cpu"]["status"], sections["cuda_vs_cpu"]["reason"]) == ("skipped", "no CUDA")
    dtypes = sections["dtypes"]
    assert dtypes["status"] == "passed"
    assert set(dtypes["dtypes"]) == {"float32", "float16", "bfloat16"}
    for name, row in dtypes["dtypes"].items():
        assert row["stats_dtypes"] == ["float32"] and row["finite"] and row["masked"] > 0, name
        if name != "float32":
            assert 0.0 < row["jaccard_vs_float32"] <= 1.0 and row["difference_vs_float32"]["normwise"] < 0.1
    edits = sections["edit_exactness"]
    assert edits["status"] == "passed" and len(edits["checks"]) >= 10 and all(edits["checks"].values())
    assert sections["noise_reference"]["status"] in ("not built", "passed")


def test_speed_and_edit_figures_are_recorded(dry_run):
    sections = dry_run["sections"]
    speed = sections["calibration_speed"]
    plan = sections["environment"]["plan"]
    assert set(speed["batch_sizes"]) == {str(size) for size in plan["batch_sizes"]}
    prompts = speed["prompts"]["targets"] + speed["prompts"]["references"]
    for size, row in speed["batch_sizes"].items():
        assert SPEED_KEYS <= row.keys()
        assert row["unet_calls"] == -(-prompts // int(size)) * plan["tau"]
        assert row["unet_rows"] == 2 * prompts * plan["tau"]
        assert TIMES <= row["calibrate_s"].keys() and TIMES <= row["bare_s"].keys()
        assert row["memory_peak_bytes"] == {"skipped": "no CUDA"}
    edits = sections["derive_apply_switch"]
    assert edits["masked"]["a"] > 0 and edits["masked"]["b"] > 0
    for key in ("derive_s", "apply_s", "restore_s", "switch_s"):
        assert len(edits[key]["seconds"]) == plan["edit_repeats"]
    assert {row["status"] for row in sections["later"].values() if isinstance(row, dict)} == {"not built yet"}
    summary = sections["summary"]
    assert set(summary["figures"]) == {"calibrate_s", "hook_overhead", "derive_s", "switch_s"}
    assert all(figure["met"] is None and figure["measured"] is not None for figure in summary["figures"].values())
