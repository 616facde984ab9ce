"""The project's DVC pipeline (dvc.yaml, params.yaml), run with the real ``dvc`` CLI.

A temporary git repository gets a copy of the pipeline files (the shipped demo model, as by
default) with tiny T/tau and a short erasure measurement;
``dvc repro`` must produce the artifacts and registry rows, a second ``dvc repro`` must change
nothing, and a skill_ratio change must rerun only mask, release and evaluate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpreg.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
CONCEPTS = ("zorblat", "circle")
STAGES = ["calibrate@zorblat", "calibrate@circle", "mask@zorblat", "mask@circle", "release", "evaluate"]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CPREG_", "DVC_", "GIT_")) and k not in ("HF_HUB_OFFLINE",)}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=str(tmp / "gitconfig"),
    )
    return env


class Repo:
    def __init__(self, path: Path, env: dict) -> None:
        self.path, self.env = path, env

    def sh(self, *args: str | Path) -> str:
        result = subprocess.run([str(a) for a in args], cwd=self.path, env=self.env, capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout + result.stderr

    def dvc(self, *args: str) -> str:
        return self.sh(DVC, *args)

    def commit(self, message: str) -> str:
        self.sh("git", "add", "-A")
        self.sh("git", "commit", "-q", "--allow-empty", "-m", message)
        return self.sh("git", "rev-parse", "HEAD").strip()

    def registry(self) -> Registry:
        home = self.path / ".cpreg"
        return Registry(f"sqlite:///{home / 'registry.db'}", str(home))

    def counts(self) -> dict:
        with self.registry() as reg:
            return reg.counts()

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, params: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """The pipeline after a first ``dvc repro``: ``repo.first`` is its output, ``repo.head`` the commit."""
    tmp = tmp_path_factory.mktemp("dvc")
    path = tmp / "project"
    path.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    shutil.copytree(ROOT / "concepts", path / "concepts")
    repo = Repo(path, _env(tmp))
    params = repo.params()
    assert params["model"] == "demo-planted" and params["export"] == []  # the defaults run offline
    assert list(params["concepts"]) == list(CONCEPTS)
    params["calibration"].update(steps=4, tau=2, device="cpu")
    params["evaluation"].update(samples=1, steps=2)
    repo.set_params(params)
    repo.sh("git", "init", "-q")
    repo.dvc("init", "-q")
    repo.dvc("config", "core.analytics", "false")
    if (ROOT / ".dvcignore").is_file():
        shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")
    repo.head = repo.commit("pipeline")
    repo.first = repo.dvc("repro")
    return repo


def test_repro_makes_the_artifacts_and_registry_rows(repo):
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repo.first
    data = repo.path / "data"
    for name in CONCEPTS:
        assert (data / "stats" / f"{name}.safetensors").is_file() and (data / "masks" / f"{name}.parquet").is_file()
    record = json.loads((data / "release" / "safe-v1.json").read_text())
    metrics = json.loads((data / "metrics.json").read_text())
    assert sorted(p.name for p in (data / "plots" / "density").iterdir()) == ["circle.csv", "safe-v1.csv", "zorblat.csv"]
    report = json.loads((data / "eval" / "report.json").read_text())
    assert (data / "eval" / "grid.png").is_file() and report["ref"] == "safe-v1@1" and report["model"] == "demo-planted"
    erasure = metrics["erasure"]
    assert erasure["classifier_available"] == 1 and erasure["samples"] == 1  # the demo classifier
    for key in ("erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before", "retained_accuracy_after",
                "masked_fraction"):
        assert erasure[key] == report[key] and 0 <= erasure[key] <= 1
    assert erasure["proxy_ratio"] == report["proxy"]["ratio"]
    assert erasure["retained_drop_worst"] == report["retained_drop_worst"] and erasure["retained_hue_shift_deg"] is not None
    # Defaults: every member's targets are erased; references that are another member's target are not "retained".
    erased, retained = report["settings"]["erased_prompts"], report["settings"]["retained_prompts"]
    assert "a red zorblat on white" in erased and "a red circle on white" in erased
    assert not set(erased) & set(retained) and "a red square on white" in retained
    assert (repo.path / "dvc.lock").is_file()
    assert repo.counts() | {"events": 0} == {
        "base_models": 1, "concepts": 2, "prompt_sets": 2, "calibrations": 2, "masks": 2, "aliases": 0,
        "releases": 1, "release_members": 2, "events": 0,
    }
    with repo.registry() as reg:
        calibrations = {c.dvc_stage: c for c in reg.list_calibrations()}
        masks = {m.concept: m for m in reg.list_masks()}
        release = reg.resolve_release("safe-v1")
    for name in CONCEPTS:
        assert calibrations[f"calibrate@{name}"].git_rev == repo.head
        assert calibrations[f"calibrate@{name}"].stats_oid == sha(data / "stats" / f"{name}.safetensors")
        assert masks[name].dvc_stage == f"mask@{name}" and masks[name].git_rev == repo.head
        assert masks[name].artifact_oid == sha(data / "masks" / f"{name}.parquet")
        assert metrics["concepts"][name]["masked"] == masks[name].masked_total
    assert release.ref == record["ref"] == "safe-v1@1" and (release.dvc_stage, release.git_rev) == ("release", repo.head)
    assert release.union_oid == record["union_oid"] == sha(data / "release" / "safe-v1.parquet")
    assert metrics["total"]["masked"] == release.masked_total


def test_second_repro_changes_nothing(repo):
    before = repo.counts()
    outputs = {p: p.stat().st_mtime_ns for p in (repo.path / "data").rglob("*") if p.is_file()}
    output = repo.dvc("repro")
    assert "Running stage" not in output
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output
    assert "Data and pipelines are up to date." in output
    assert repo.counts() == before
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs


def test_metrics_show_prints_the_metrics(repo):
    metrics = json.loads((repo.path / "data" / "metrics.json").read_text())
    output = repo.dvc("metrics", "show")
    for key in ("total.masked", "total.fraction", "concepts.zorblat.fraction", "concepts.circle.masked",
                "density.mid_block.attentions.0", "erasure.erased_accuracy_after", "erasure.proxy_ratio"):
        assert key in output
    assert str(metrics["total"]["masked"]) in output


def test_skill_ratio_change_reruns_only_mask_release_evaluate(repo):
    """Last: it changes the repository."""
    repo.commit("first run")
    stats = repo.path / "data" / "stats" / "zorblat.safetensors"
    stats_state = (stats.stat().st_mtime_ns, sha(stats))
    before = repo.counts()
    params = repo.params()
    params["concepts"]["zorblat"]["skill_ratio"] = 0.1
    repo.set_params(params)
    output = repo.dvc("repro")
    for stage in ("mask@zorblat", "release", "evaluate"):
        assert f"Running stage '{stage}'" in output
    for stage in ("calibrate@zorblat", "calibrate@circle", "mask@circle"):
        assert f"Stage '{stage}' didn't change, skipping" in output
    assert (stats.stat().st_mtime_ns, sha(stats)) == stats_state
    after = repo.counts()
    assert after["calibrations"] == before["calibrations"]
    assert after["masks"] == before["masks"] + 1 and after["releases"] == before["releases"] + 1
    record = json.loads((repo.path / "data" / "release" / "safe-v1.json").read_text())
    assert record["ref"] == "safe-v1@2" and [m["ref"] for m in record["members"]] == ["zorblat@2", "circle@1"]
    assert "concepts.zorblat.masked" in repo.dvc("metrics", "diff")
