"""The README's promises: its Python examples run as written, and CI runs its two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {})


def test_ci_runs_the_readme_commands():
    setup, tests = blocks("bash")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in (setup.strip(), tests.strip().removeprefix(". .venv/bin/activate && ")):
        assert command in ci, command
