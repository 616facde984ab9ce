"""The demo model's training entry point: deterministic bytes, a loadable pipeline, a DVC stage.

Few steps only (the real run takes about 30 minutes): what is checked is that the recipe is
reproducible, not the quality of the result (tests/test_demo.py checks the shipped model).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = {"vae-steps": 3, "classifier-steps": 3, "unet-steps": 3, "unet-batch": 8, "pool": 64}


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [f"--{key}={value}" for key, value in FEW_STEPS.items()]
    return subprocess.run(
        [sys.executable, "-m", "cpreg.demo.train", "--out", str(out / "model"),
         "--classifier-out", str(out / "classifier.safetensors"), *args, *extra],
        capture_output=True, text=True, timeout=600, check=False,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    result = _train(out)  # --stage all without --work: a temporary checkpoint folder
    assert result.returncode == 0, result.stderr
    return out


def test_training_is_deterministic_whatever_the_work_folder(trained, tmp_path):
    again = tmp_path / "again"
    result = _train(again, "--work", str(tmp_path / "somewhere" / "else"))
    assert result.returncode == 0, result.stderr
    assert _files(again) == _files(trained)
    assert "cpreg-demo/unet" in (trained / "model" / "unet" / "config.json").read_text()  # no local path leaks


def test_trained_folder_is_a_plain_diffusers_pipeline(trained):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(trained / "model", use_safetensors=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    shipped = DiffusionPipeline.from_pretrained(ROOT / "cpreg" / "demo" / "model", use_safetensors=True)
    assert {n: p.shape for n, p in pipe.unet.named_parameters()} == {n: p.shape for n, p in shipped.unet.named_parameters()}
    learned = {"_name_or_path", "scaling_factor"}  # the load path, and the VAE's measured latent scale
    for component in ("unet", "vae"):  # the architecture of the shipped model
        ours, theirs = dict(getattr(pipe, component).config), dict(getattr(shipped, component).config)
        assert {k: v for k, v in ours.items() if k not in learned} == {k: v for k, v in theirs.items() if k not in learned}
    image = pipe("a red circle on white", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)


def test_a_single_stage_needs_its_work_folder(tmp_path):
    result = _train(tmp_path, "--stage", "unet")
    assert result.returncode == 2 and "--stage unet needs --work" in result.stderr


def test_training_is_a_dvc_stage(tmp_path):
    """benchmarks/demo/dvc.yaml with few steps, in a temporary git + DVC repository."""
    from test_dvc_pipeline import Repo, _env

    project = tmp_path / "project"
    for relative in ("benchmarks/demo/dvc.yaml", "benchmarks/demo/params.yaml", "cpreg/demo/train.py",
                     "cpreg/demo/build.py", "cpreg/demo/data.py", "cpreg/demo/vocabulary.py", "cpreg/tiny.py"):
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, project / relative)
    params_file = project / "benchmarks" / "demo" / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["vae"]["steps"] = params["classifier"]["steps"] = params["unet"]["steps"] = 3
    params["unet"].update(batch=8, pool=64)
    params_file.write_text(yaml.safe_dump(params))
    repo = Repo(project, _env(tmp_path))
    repo.sh("git", "init", "-q")
    repo.dvc("init", "-q")
    repo.commit("demo training")
    output = repo.dvc("repro", "benchmarks/demo/dvc.yaml")
    assert "Running stage 'benchmarks/demo/dvc.yaml:train'" in output
    data = project / "benchmarks" / "demo" / "data"
    assert (data / "model" / "model_index.json").is_file() and (data / "classifier.safetensors").is_file()
    assert "didn't change, skipping" in repo.dvc("repro", "benchmarks/demo/dvc.yaml")
