"""The file-based pipeline commands: ``cpreg calibrate / mask / release / metrics`` and ``export`` of a
release record; idempotence, provenance (DVC stage, git revision), and bad inputs.

A template project (registry in ``.cpreg``, files in ``data/``) is made once on the built-in tiny
models; each test works in a copy, with the copy as the current directory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
import torch
from cpreg.artifacts import (
    mask_from_bytes,
    mask_to_bytes,
    stats_from_bytes,
    stats_to_bytes,
)
from cpreg.registry import Registry
from typer.testing import CliRunner

from cpreg.cli import app

FAST = ["--model", "tiny", "--steps", "2", "--timesteps", "1", "--batch-size", "40"]
ZORB = "name: zorb\nkind: custom\ntargets: [a zorblat in a park]\nreferences: [a park]\n"
GLIM = "name: glim\nkind: object\ntargets: [a glimmer in a park, a glimmer on a beach]\nreferences: [a park, a beach]\n"


def run(*args: str, expect: int = 0):
    result = CliRunner().invoke(app, ["--home", ".cpreg", *args])
    assert result.exit_code == expect, (args, result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def registry(root: Path = Path(".")) -> Registry:
    home = (root / ".cpreg").absolute()
    return Registry(f"sqlite:///{home / 'registry.db'}", str(home))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("DVC_STAGE", raising=False)
        Path("concepts").mkdir()
        Path("concepts/zorb.yaml").write_text(ZORB)
        Path("concepts/glim.yaml").write_text(GLIM)
        for concept, prompts in (("nudity", "catalog"), ("glim", "concepts/glim.yaml")):
            run("calibrate", concept, "--prompts", prompts, *FAST, "--out", f"data/stats/{concept}.safetensors")
            run("mask", concept, "--stats", f"data/stats/{concept}.safetensors", "--prompts", prompts,
                "--out", f"data/masks/{concept}.parquet")
        run("calibrate", "zorb", "--prompts", "concepts/zorb.yaml", "--model", "tiny-sdxl", "--steps", "2",
            "--timesteps", "1", "--out", "data/stats/zorb.safetensors")
        run("mask", "zorb", "--stats", "data/stats/zorb.safetensors", "--prompts", "concepts/zorb.yaml",
            "--out", "data/sdxl/zorb.parquet")
        run("release", "safe-v1", "nudity", "glim", "--out-dir", "data/release")
        # a valid mask file this registry does not hold
        from cpreg.editors import derive_mask, hooked_layers

        from cpreg.models import load_base_pipeline

        stats = stats_from_bytes(Path("data/stats/nudity.safetensors").read_bytes())
        layers = hooked_layers(load_base_pipeline("tiny"), "ffn_out")
        unregistered = derive_mask(stats, {n: m.weight for n, m in layers.modules.items()}, 0.3)
        Path("fixtures").mkdir()
        Path("fixtures/unregistered.parquet").write_bytes(mask_to_bytes(unregistered))
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return root


# -- calibrate ----------------------------------------------------------------------------------


def test_calibrate_writes_the_registered_statistics(project):
    with registry() as reg:
        calibrations = reg.list_calibrations()
        stats = reg.load_stats(calibrations[0])
    assert len(calibrations) == 3
    data = Path("data/stats/nudity.safetensors").read_bytes()
    assert sha("data/stats/nudity.safetensors") == calibrations[0].stats_oid
    assert stats_to_bytes(stats_from_bytes(data)) == data == stats_to_bytes(stats)
    assert calibrations[0].config["tau"] == 1 and calibrations[0].dvc_stage is None and calibrations[0].git_rev is None
    with registry() as reg:
        assert reg.list_masks("nudity")[0].calibration_id == calibrations[0].id


def test_calibrate_again_reuses_the_registry_without_running_the_model(project, monkeypatch):
    with registry() as reg:
        before = reg.counts()
    import cpreg.stages

    def no_model_run(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(cpreg.stages, "calibrate_statistics", no_model_run)
    again = run_json("calibrate", "nudity", "--prompts", "catalog", *FAST, "--out", "data/stats/nudity.safetensors", "--force")
    assert again["reused"] is True and again["calibration"]["id"] == 1
    assert sha("data/stats/nudity.safetensors") == again["stats_oid"]
    monkeypatch.undo()
    monkeypatch.chdir(project)
    recomputed = run_json("calibrate", "glim", "--prompts", "concepts/glim.yaml", *FAST, "--recompute",
                          "--out", "data/stats/again.safetensors")
    assert recomputed["reused"] is False and recomputed["calibration"]["id"] == 2  # same bytes: same row
    assert Path("data/stats/again.safetensors").read_bytes() == Path("data/stats/glim.safetensors").read_bytes()
    other = run_json("calibrate", "glim", "--prompts", "concepts/glim.yaml", *FAST[:-2], "--batch-size", "1")
    assert other["reused"] is False and other["path"] is None  # another setting is another calibration
    with registry() as reg:
        after = reg.counts()
    assert after["calibrations"] == before["calibrations"] + 1 and after["masks"] == before["masks"]


def test_calibrate_records_reference_noise_and_fp16_statistics(project):
    fp16 = run_json("calibrate", "glim", "--prompts", "concepts/glim.yaml", *FAST, "--noise", "reference",
                    "--stats-dtype", "float16", "--out", "data/stats/glim16.safetensors")
    assert fp16["reused"] is False
    assert (fp16["calibration"]["config"]["noise"], fp16["calibration"]["config"]["stats_dtype"]) == ("reference", "float16")
    stats = stats_from_bytes(Path("data/stats/glim16.safetensors").read_bytes())
    assert stats.config.noise.value == "reference" and {t.dtype for t in stats.target.values()} == {torch.float16}
    mask = run_json("mask", "glim", "--stats", "data/stats/glim16.safetensors", "--prompts", "concepts/glim.yaml")
    assert mask["mask"]["calibration_id"] == fp16["calibration"]["id"] and mask["mask"]["masked_total"] > 0
    with registry() as reg:
        assert reg.list_calibrations()[0].config["noise"] == "cpu"  # the default is recorded too


def test_a_calibration_recorded_without_the_noise_fields_is_reused_for_the_defaults(project, monkeypatch):
    with closing(sqlite3.connect(".cpreg/registry.db")) as db, db:  # as written before noise and stats_dtype existed
        (config,) = db.execute("SELECT config FROM calibrations WHERE id = 1").fetchone()
        old = {k: v for k, v in json.loads(config).items() if k not in ("noise", "stats_dtype")}
        db.execute("UPDATE calibrations SET config = ? WHERE id = 1", (json.dumps(old),))
    import cpreg.stages

    monkeypatch.setattr(cpreg.stages, "calibrate_statistics", lambda *a, **k: pytest.fail("the model ran"))
    again = run_json("calibrate", "nudity", "--prompts", "catalog", *FAST)
    assert again["reused"] is True and again["calibration"]["id"] == 1
    monkeypatch.undo()
    monkeypatch.chdir(project)
    other = run_json("calibrate", "nudity", "--prompts", "catalog", *FAST, "--noise", "reference")
    assert other["reused"] is False  # another noise mode is another calibration


def test_stage_and_git_revision_are_recorded(project, monkeypatch):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("DVC_STAGE", "calibrate@glim")  # what `dvc repro` sets
    calibration = run_json("calibrate", "glim", "--prompts", "concepts/glim.yaml", *FAST[:-2], "--batch-size", "1")["calibration"]
    assert calibration["dvc_stage"] == "calibrate@glim" and calibration["git_rev"] == head
    mask = run_json("mask", "nudity", "--stats", "data/stats/nudity.safetensors", "--skill-ratio", "0.05",
                    "--dvc-stage", "mask@nudity", "--out", "data/masks/nudity.parquet", "--force")["mask"]
    assert mask["dvc_stage"] == "mask@nudity" and mask["git_rev"] == head
    release = run_json("release", "safe-v1", "nudity", "glim", "--note", "weekly")["release"]
    assert release["ref"] == "safe-v1@2" and release["notes"] == "weekly"
    assert release["dvc_stage"] == "calibrate@glim" and release["git_rev"] == head
    monkeypatch.delenv("DVC_STAGE")
    release = run_json("release", "safe-v1", "nudity")["release"]
    assert release["ref"] == "safe-v1@3" and (release["dvc_stage"], release["git_rev"]) == (None, head)
    assert run_json("releases", "show", "safe-v1@2")["release"]["dvc_stage"] == "calibrate@glim"


# -- mask ---------------------------------------------------------------------------------------


def test_mask_from_the_statistics_file_is_registered_once(project, monkeypatch):
    import cpreg.stages

    monkeypatch.setattr(cpreg.stages, "calibrate_statistics", lambda *a, **k: pytest.fail("the model ran"))
    with registry() as reg:
        before = reg.counts()
        first = reg.resolve_mask("nudity@1")
    assert sha("data/masks/nudity.parquet") == first.artifact_oid
    again = run_json("mask", "nudity", "--stats", "data/stats/nudity.safetensors", "--out", "data/masks/nudity.parquet",
                     "--force")
    assert again["ref"] == "nudity@1" and again["reused"] is True
    stricter = run_json("mask", "nudity", "--stats", "data/stats/nudity.safetensors", "--skill-ratio", "0.05",
                        "--out", "data/masks/strict.parquet")
    assert stricter["ref"] == "nudity@2" and stricter["reused"] is False
    assert stricter["mask"]["skill_ratio"] == 0.05 and stricter["mask"]["calibration_id"] == first.calibration_id
    assert mask_from_bytes(Path("data/masks/strict.parquet").read_bytes()).num_masked == stricter["mask"]["masked_total"]
    assert run_json("mask", "nudity", "--stats", "data/stats/nudity.safetensors", "--skill-ratio", "0.05")["ref"] == "nudity@2"
    with registry() as reg:
        after = reg.counts()
    assert after["masks"] == before["masks"] + 1 and after["calibrations"] == before["calibrations"]


def test_mask_registers_the_calibration_of_a_file_the_registry_lacks(project):
    shutil.rmtree(".cpreg")
    result = run_json("mask", "nudity", "--stats", "data/stats/nudity.safetensors", "--model", "tiny",
                      "--out", "data/masks/nudity.parquet", "--force")
    assert result["ref"] == "nudity@1" and result["reused"] is False
    with registry() as reg:
        (calibration,) = reg.list_calibrations()
        assert calibration.stats_oid == sha("data/stats/nudity.safetensors")
        assert calibration.dtype == "unknown" and calibration.config["tau"] == 1
        assert reg.resolve_mask("nudity@1").calibration_id == calibration.id
    # the file is the same mask as the one made with the registry
    assert result["mask"]["artifact_oid"] == sha("data/masks/nudity.parquet")


# -- release, metrics, export --------------------------------------------------------------------


def test_release_reuses_the_latest_version_with_the_same_members(project):
    record = json.loads(Path("data/release/safe-v1.json").read_text())
    assert record["ref"] == "safe-v1@1" and [m["ref"] for m in record["members"]] == ["nudity@1", "glim@1"]
    assert sha("data/release/safe-v1.parquet") == record["union_oid"]
    assert [m["file"] for m in record["members"]] == ["data/masks/nudity.parquet", "data/masks/glim.parquet"]
    with registry() as reg:
        before = reg.counts()
    files = {p: Path(p).read_bytes() for p in ("data/release/safe-v1.json", "data/release/safe-v1.parquet")}
    again = run_json("release", "safe-v1", "glim", "nudity", "nudity", "--out-dir", "data/release", "--force")
    assert again["ref"] == "safe-v1@1" and again["reused"] is True
    assert {p: Path(p).read_bytes() for p in files} == files  # the same record, byte for byte
    with registry() as reg:
        assert reg.counts() == before
    run("mask", "nudity", "--stats", "data/stats/nudity.safetensors", "--skill-ratio", "0.05",
        "--out", "data/masks/nudity.parquet", "--force")
    changed = run_json("release", "safe-v1", "nudity", "glim", "--out-dir", "data/release", "--force")
    assert changed["ref"] == "safe-v1@2" and changed["reused"] is False
    assert changed["release"]["members"] == ["nudity@2", "glim@1"]
    assert run_json("release", "safe-v1", "nudity", "glim")["ref"] == "safe-v1@2"
    only = run_json("release", "safe-v1", "nudity")  # other members: a new version
    assert only["ref"] == "safe-v1@3"


def test_metrics_writes_masked_fractions_and_density_tables(project):
    result = run_json("metrics", "data/release/safe-v1.json", "--metrics", "data/metrics.json", "--plots-dir", "data/plots")
    metrics = json.loads(Path("data/metrics.json").read_text())
    assert metrics == result["metrics"]
    with registry() as reg:
        nudity, glim_mask = reg.resolve_mask("nudity@1"), reg.resolve_mask("glim@1")
        release = reg.resolve_release("safe-v1@1")
        union = reg.load_release_mask(release)
    assert metrics["concepts"]["nudity"] == {"masked": nudity.masked_total, "fraction": nudity.fraction}
    assert metrics["concepts"]["glim"]["masked"] == glim_mask.masked_total
    assert metrics["total"] == {"masked": release.masked_total, "fraction": union.fraction}
    layers = union.report()["layers"]
    assert sorted(metrics["density"].values()) == sorted(row["density"] for row in layers.values())
    assert "down_blocks.0.attentions.0" in metrics["density"]  # the suffix all layers share is dropped
    assert sorted(p.name for p in Path("data/plots").iterdir()) == ["glim.csv", "nudity.csv", "safe-v1.csv"]
    with Path("data/plots/nudity.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert {row["module"] for row in rows} == set(nudity.masked_per_layer)
    assert sum(int(row["masked"]) for row in rows) == nudity.masked_total
    assert all(float(row["density"]) == int(row["masked"]) / int(row["weights"]) for row in rows)
    first = {p: Path(p).read_bytes() for p in ["data/metrics.json", *map(str, Path("data/plots").iterdir())]}
    run("metrics", "data/release/safe-v1.json", "--metrics", "data/metrics.json", "--plots-dir", "data/plots", "--force")
    assert {p: Path(p).read_bytes() for p in first} == first  # deterministic
    assert "total" in run("metrics", "data/release/safe-v1.json").stdout  # the human table


def test_metrics_with_erasure_measurement(project):
    """``--eval-samples``: the numbers of ``cpreg eval`` join the metrics (no classifier for the tiny model)."""
    Path("retain.txt").write_text("a photo of a man\na park\n")  # the default set has 200 prompts
    retain = ("--eval-retain-prompts", "retain.txt")
    result = run_json("metrics", "data/release/safe-v1.json", "--metrics", "data/metrics.json",
                      "--eval-samples", "1", "--eval-steps", "2", "--eval-out", "data/eval", *retain)
    erasure = json.loads(Path("data/metrics.json").read_text())["erasure"]
    assert erasure == result["metrics"]["erasure"]
    report = json.loads(Path("data/eval/report.json").read_text())
    assert Path("data/eval/grid.png").is_file() and report["settings"]["samples"] == erasure["samples"] == 1
    assert (report["ref"], report["model"]) == ("safe-v1@1", "tiny")  # as `cpreg eval --json` prints it
    assert erasure["classifier_available"] == 0 and erasure["erased_accuracy_after"] is None
    assert erasure["masked_fraction"] == report["masked_fraction"] > 0
    assert (erasure["proxy_erased_change"], erasure["proxy_retained_change"], erasure["proxy_ratio"]) == (
        report["proxy"]["erased_change"], report["proxy"]["retained_change"], report["proxy"]["ratio"])
    assert report["settings"]["retained_prompts"] == ["a photo of a man", "a park"]
    assert (erasure["retained_drop_worst"], erasure["retained_drop_worst_ci95_low"]) == (None, None)  # no classifier
    assert erasure["retained_ssim"] == report["fidelity"]["retained"]["ssim"] > 0
    assert "erasure" in run("metrics", "data/release/safe-v1.json", "--eval-samples", "1", "--eval-steps", "2", *retain).stdout


def test_export_of_a_release_record(project, tmp_path):
    result = run_json("export", "data/release/safe-v1.json", str(tmp_path / "pipe"))
    assert result["ref"] == "safe-v1@1"
    assert "safe-v1@1" in (tmp_path / "pipe" / "README.md").read_text()


# -- bad inputs: one clear line, exit 1, nothing changed ----------------------------------------------

STATS = ["--stats", "data/stats/nudity.safetensors"]
BAD = [
    (("mask", "nudity", "--stats", "bad/missing.safetensors"), "cannot read statistics file"),
    (("mask", "nudity", "--stats", "data/stats"), "is a folder"),
    (("mask", "nudity", "--stats", "bad/garbage.safetensors"), "not a valid statistics file"),
    (("mask", "nudity", "--stats", "bad/truncated.safetensors"), "not a valid statistics file"),
    (("mask", "nudity", "--stats", "data/masks/nudity.parquet"), "not a valid statistics file"),
    (("mask", "zorb", "--stats", "data/stats/zorb.safetensors", "--prompts", "concepts/zorb.yaml", "--model", "tiny"),
     "calibrated on base model"),
    (("mask", "nudity", "--stats", "data/stats/glim.safetensors"), "other prompts"),
    (("mask", "nudity", "--stats", "data/stats/zorb.safetensors", "--model", "tiny-sdxl"), "other prompts"),
    (("mask", "nudity", *STATS, "--skill-ratio", "0"), "skill_ratio"),
    (("mask", "nudity", *STATS, "--select-ratio", "1"), "select_ratio"),
    (("mask", "nudity", *STATS, "--timesteps", "2"), "tau"),
    (("mask", "nudity", *STATS, "--out", "bad/mask.txt"), "must be a .parquet"),
    (("mask", "nudity", *STATS, "--out", "data/masks/glim.parquet"), "exists"),
    (("mask", "nudity", *STATS, "--model", "no-such-org/no-such-model"), "not available"),
    (("mask", "../evil", *STATS, "--prompts", "bad/evil.yaml"), "invalid name"),
    (("calibrate", "nudity", *FAST, "--out", "bad/stats.bin"), ".safetensors"),
    (("calibrate", "nudity", *FAST, "--out", "data/stats/glim.safetensors"), "exists"),
    (("calibrate", "zorb", "--prompts", "catalog", *FAST), "unknown concept"),
    (("calibrate", "zorb", "--prompts", "bad/missing.yaml", *FAST), "cannot read concept file"),
    (("calibrate", "other", "--prompts", "concepts/zorb.yaml", *FAST), "names the concept"),
    (("calibrate", "nudity", "--model", "tiny", "--steps", "2", "--timesteps", "3"), "tau"),
    (("calibrate", "nudity", *FAST, "--dvc-stage", "x" * 257), "--dvc-stage"),
    (("release", "safe-v1", "nudity", "monet"), "cannot read mask file"),
    (("release", "safe-v1", "nudity", "--masks-dir", "bad/unregistered"), "not a registered mask"),
    (("release", "safe-v1", "nudity", "--masks-dir", "bad/corrupt"), "nudity.parquet"),
    (("release", "safe-v1", "nudity", "zorb", "--masks-dir", "bad/mixed"), "cannot compose"),
    (("release", "nudity", "nudity"), "concept"),
    (("release", "../x", "nudity"), "invalid release name"),
    (("release", "safe-v1", "../data/masks/nudity"), "invalid concept name"),
    (("release", "safe-v1", "nudity", "--out-dir", "data/release"), "exists"),
    (("metrics", "bad/missing.json"), "cannot read release record"),
    (("metrics", "bad/other.json"), "not a release record"),
    (("metrics", "bad/garbage.json"), "not valid JSON"),
    (("metrics", "bad/changed.json"), "changed since the release"),
    (("metrics", "data/release/safe-v1.json", "--metrics", "bad/metrics.yaml"), ".json"),
    (("metrics", "data/release/safe-v1.json", "--plots-dir", "data/release"), "not empty"),
    (("metrics", "data/release/safe-v1.json", "--plots-dir", "data/release/safe-v1.json"), "not a folder"),
    (("metrics", "data/release/safe-v1.json", "--eval-samples", "-1"), "--eval-samples must be >= 0"),
    (("metrics", "data/release/safe-v1.json", "--eval-samples", "1", "--eval-steps", "0"), "--eval-steps must be >= 1"),
    (("metrics", "data/release/safe-v1.json", "--eval-samples", "1", "--eval-out", "data/release/safe-v1.json"),
     "not a folder"),
    (("metrics", "data/release/safe-v1.json", "--metrics", "bad/m.json", "--eval-samples", "1", "--classifier", "bogus"),
     "classifier"),
    (("export", "bad/changed-union.json", "bad/out"), "not the release recorded"),
]


def _bad_files() -> None:
    bad = Path("bad")
    bad.mkdir()
    (bad / "garbage.safetensors").write_bytes(b"\x00" * 7 + b"not a safetensors file at all")
    (bad / "truncated.safetensors").write_bytes(Path("data/stats/nudity.safetensors").read_bytes()[:200])
    (bad / "evil.yaml").write_text("name: ../evil\ntargets: [a]\nreferences: [b]\n")
    (bad / "unregistered").mkdir()
    shutil.copy("fixtures/unregistered.parquet", bad / "unregistered" / "nudity.parquet")
    (bad / "corrupt").mkdir()
    (bad / "corrupt" / "nudity.parquet").write_bytes(b"PAR1 broken")
    (bad / "mixed").mkdir()
    shutil.copy("data/masks/nudity.parquet", bad / "mixed" / "nudity.parquet")
    shutil.copy("data/sdxl/zorb.parquet", bad / "mixed" / "zorb.parquet")
    (bad / "other.json").write_text('{"format": "something else"}')
    (bad / "garbage.json").write_text("{not json")
    record = json.loads(Path("data/release/safe-v1.json").read_text())
    record["members"][0]["oid"] = "0" * 64
    (bad / "changed.json").write_text(json.dumps(record))
    record = json.loads(Path("data/release/safe-v1.json").read_text())
    record["union_oid"] = "0" * 64
    (bad / "changed-union.json").write_text(json.dumps(record))


def state() -> dict:
    with registry() as reg:
        rows = reg.counts()
        objects = sorted(reg.store.ids())
    files = {str(p): sha(p) for p in sorted(Path(".").rglob("*")) if p.is_file() and ".cpreg" not in p.parts}
    return {"rows": rows, "objects": objects, "files": files}


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_clear_line_and_changes_nothing(project, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _bad_files()
    before = state()
    result = run(*args, expect=1)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message.lower() in result.stderr.lower(), result.stderr
    assert state() == before


def test_usage_errors_exit_2(project):
    run("mask", "nudity", expect=2)  # --stats is required
    run("release", "safe-v1", expect=2)  # at least one member
    run("metrics", expect=2)
    run("calibrate", "nudity", "--hook", "bogus", expect=2)
