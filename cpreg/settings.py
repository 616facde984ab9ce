"""Where a workspace keeps its registry and artifacts, and the provenance recorded with its rows.

Example:
    >>> Settings.from_env(home="team/.cpreg").db_url
    'sqlite:////abs/path/team/.cpreg/registry.db'
    >>> git_revision()  # the commit a DVC stage ran at, or None outside a git checkout
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Where a workspace keeps its registry and artifacts."""

    home: Path
    db_url: str
    artifact_uri: str

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None, db_url: str | None = None) -> Settings:
        """``home`` / ``db_url`` override ``$CPREG_HOME`` / ``$CPREG_DB_URL``."""
        home_path = Path(home or os.environ.get("CPREG_HOME") or ".cpreg").expanduser().absolute()
        db = db_url or os.environ.get("CPREG_DB_URL") or f"sqlite:///{home_path / 'registry.db'}"
        artifacts = os.environ.get("CPREG_ARTIFACT_URI") or str(home_path)
        return cls(home_path, db, artifacts)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded with every calibration)."""
    versions = {}
    for package in ("cpreg", "torch", "diffusers", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``path`` (default: the current directory).

    None outside a git repository, in one without commits, or without a ``git`` executable.
    """
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD"],
            cwd=path, capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", revision) else None
