"""The command line answers at once: registry commands never import torch, diffusers or transformers,
and a bug is reported as an internal error (exit 3), never dressed up as a user error.

Start-up times are measured by ``benchmarks/bench_cli.py`` (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpreg.cli import app

HEAVY = ("torch", "diffusers", "transformers")

#: Runs the CLI in a fresh interpreter, then reports which heavy modules it imported (stderr, last line).
PROBE = """
import json, sys
from cpreg.cli import app
try:
    app(sys.argv[1:], prog_name="cpreg")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"exit": code, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)

LIGHT_COMMANDS = [
    ("--help",),
    ("masks", "list"),
    ("masks", "show", "nudity@1"),
    ("releases", "list"),
    ("releases", "show", "safe-v1"),
    ("log",),
    ("concepts", "list"),
    ("concepts", "show", "zorblat"),
    ("db", "current"),
    ("verify",),
]


def _probe(home: Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, "--home", str(home), *args],
                            capture_output=True, text=True, timeout=120)
    return json.loads(result.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace with one mask and one release (tiny model)."""
    home = tmp_path_factory.mktemp("startup") / ".cpreg"
    for args in (("init",), ("compute", "nudity", "--model", "tiny", "--steps", "2", "--timesteps", "1"),
                 ("compose", "nudity@1", "--release", "safe-v1")):
        result = CliRunner().invoke(app, ["--home", str(home), *args])
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return home


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=" ".join)
def test_registry_commands_import_no_model_library(workspace, args):
    assert _probe(workspace, *args) == {"exit": 0, "heavy": []}


def test_a_model_command_does_import_them(workspace):
    """The probe can see torch: a command that runs a model imports it (so the test above can fail)."""
    report = _probe(workspace, "compute", "nudity", "--model", "tiny", "--steps", "2", "--timesteps", "1")
    assert report == {"exit": 0, "heavy": sorted(HEAVY)}


def test_a_bug_is_an_internal_error_with_exit_3(workspace, monkeypatch):
    import cpreg.workspace

    def broken(self, *args, **kwargs):
        return {}["missing"]  # a KeyError: a bug, not a user error

    monkeypatch.setattr(cpreg.workspace.Workspace, "resolve_mask", broken)
    result = CliRunner().invoke(app, ["--home", str(workspace), "masks", "show", "nudity@1"])
    assert result.exit_code == 3
    assert result.stderr == ("internal error: KeyError: 'missing' (a bug in cpreg; run with --debug for the traceback)\n")

    debug = CliRunner().invoke(app, ["--home", str(workspace), "--debug", "masks", "show", "nudity@1"])
    assert debug.exit_code == 3
    assert "Traceback (most recent call last)" in debug.stderr and "KeyError: 'missing'" in debug.stderr


def test_a_user_error_stays_one_line_with_exit_1(workspace):
    result = CliRunner().invoke(app, ["--home", str(workspace), "masks", "show", "nudity@7"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
