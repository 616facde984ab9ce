"""The ``cpreg`` command line: every command, ``--json`` shapes, exit codes, and bad inputs.

A template workspace is computed once on the built-in tiny model; each test works on a copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cpreg.cli import app
from cpreg.registry import Registry

FAST = ["--model", "tiny", "--steps", "3", "--timesteps", "2", "--batch-size", "40"]


def run(home: Path, *args: str, expect: int = 0):
    result = CliRunner().invoke(app, ["--home", str(home), *args])
    assert result.exit_code == expect, (args, result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def run_json(home: Path, *args: str) -> dict:
    return json.loads(run(home, *args, "--json").stdout)


def _populate(home: Path) -> None:
    """The state every CLI test starts from, in an initialised workspace: two masks, an alias, a
    release, and a custom concept (prompts in ``home.parent / "prompts"``) computed on tiny SDXL."""
    run(home, "compute", "nudity", *FAST)
    run(home, "compute", "van-gogh", *FAST)
    run(home, "masks", "alias", "nudity@1", "prod")
    run(home, "compose", "nudity@1", "van-gogh@1", "--release", "safe-v1", "--note", "test")
    prompts = home.parent / "prompts"
    prompts.mkdir()
    (prompts / "targets.txt").write_text("a zorblat in a park\na zorblat on a street\n")
    (prompts / "references.txt").write_text("a park\na street\n")
    run(home, "concepts", "add", "zorb", "--target-prompts", str(prompts / "targets.txt"),
        "--reference-prompts", str(prompts / "references.txt"))
    run(home, "compute", "zorb", "--model", "tiny-sdxl", "--steps", "3", "--timesteps", "2")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("template") / ".cpreg"
    run(home, "init")
    _populate(home)
    return home


def state(home: Path) -> dict:
    """Everything a failed command must leave unchanged."""
    with Registry(f"sqlite:///{home / 'registry.db'}", str(home)) as registry:
        return {
            "rows": registry.counts(),
            "masks": [(m.ref, m.tags, m.aliases) for m in registry.list_masks()],
            "objects": sorted(registry.store.ids()),
            "files": sorted(str(p.relative_to(home.parent)) for p in home.parent.rglob("*") if ".cpreg" not in p.parts),
        }


# -- success paths and JSON shapes ------------------------------------------------------------


def test_compute_derive_compose_report_refs(home):
    computed = run_json(home, "compute", "monet", *FAST)
    assert computed["ref"] == "monet@1" and computed["mask"]["masked_total"] > 0
    derived = run_json(home, "derive", "monet", "--skill-ratio", "0.05", "--timesteps", "1")
    assert derived["ref"] == "monet@2"
    assert derived["mask"]["tau"] == 1 and derived["mask"]["skill_ratio"] == 0.05
    assert derived["mask"]["calibration_id"] == computed["mask"]["calibration_id"]
    composed = run_json(home, "compose", "monet@2", "nudity@prod", "--release", "safe-v1")
    assert composed["ref"] == "safe-v1@2"
    assert composed["release"]["members"] == ["monet@2", "nudity@1"]


def test_listing_and_showing(home):
    masks = run_json(home, "masks", "list")["masks"]
    assert [m["ref"] for m in masks] == ["nudity@1", "van-gogh@1", "zorb@1"]
    shown = run_json(home, "masks", "show", "nudity@prod")
    assert shown["ref"] == "nudity@1" and sum(shown["mask"]["masked_per_layer"].values()) == shown["mask"]["masked_total"]
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in shown["mask"]["masked_per_layer"]
    releases = run_json(home, "releases", "list")["releases"]
    assert [r["ref"] for r in releases] == ["safe-v1@1"]
    assert run_json(home, "releases", "show", "safe-v1")["release"]["members"] == ["nudity@1", "van-gogh@1"]
    concepts = {c["name"]: c for c in run_json(home, "concepts", "list")["concepts"]}
    assert {"nudity", "van-gogh", "tench", "male", "female", "zorb"} <= concepts.keys()
    assert concepts["zorb"]["builtin"] is False
    zorb = run_json(home, "concepts", "show", "zorb")
    assert zorb["pairs"] == [{"target": "a zorblat in a park", "reference": "a park"},
                             {"target": "a zorblat on a street", "reference": "a street"}]
    events = run_json(home, "log", "--limit", "3")["events"]
    assert len(events) == 3 and events[0]["action"] == "mask.add"
    assert "nudity" in run(home, "masks", "list").stdout  # the human table


def test_db_commands(home):
    current = run_json(home, "db", "current")
    assert current["revision"] == current["head"]
    assert run_json(home, "db", "upgrade")["revision"] == current["head"]


def _command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        paths += _command_paths(command, (*prefix, name)) if hasattr(command, "commands") else [(*prefix, name)]
    return paths


def test_every_help_exits_zero_with_usage_only(tmp_path):
    """``--help`` of the app, of every group and of every command: usage on stdout, nothing on stderr, exit 0."""
    import typer

    paths = _command_paths(typer.main.get_command(app))
    assert ("masks", "show") in paths and ("db",) in paths and ("eval",) in paths
    for path in paths:
        result = run(tmp_path / ".cpreg", *path, "--help")
        assert result.stdout.startswith("Usage: ") and result.stderr == "", (path, result.stderr)
    assert not (tmp_path / ".cpreg").exists()  # help touches no workspace


def test_db_downgrade_then_upgrade(tmp_path):
    home = tmp_path / ".cpreg"
    head = run_json(home, "db", "upgrade")["revision"]
    assert run_json(home, "db", "downgrade", "base")["revision"] is None
    assert run_json(home, "db", "upgrade")["revision"] == head


def test_tags_aliases_delete(home):
    assert run_json(home, "masks", "tag", "van-gogh@1", "reviewed", "v1")["tags"] == ["reviewed", "v1"]
    assert run_json(home, "masks", "tag", "van-gogh@1", "v1", "--remove")["tags"] == ["reviewed"]
    run(home, "derive", "nudity", "--skill-ratio", "0.05")
    assert run_json(home, "masks", "alias", "nudity@2", "prod")["alias"]["mask_version"] == 2  # aliases move
    assert run_json(home, "masks", "show", "nudity@prod")["ref"] == "nudity@2"
    run(home, "masks", "delete", "nudity@2", expect=1)  # an alias points at it
    run(home, "masks", "alias", "nudity@1", "prod")
    assert run_json(home, "masks", "delete", "nudity@2")["deleted"] is True
    dry = run_json(home, "gc")
    assert dry["deleted"] is False and len(dry["objects"]) == 1
    assert run_json(home, "gc", "--yes")["objects"] == dry["objects"]
    assert run_json(home, "gc")["objects"] == []
    assert run_json(home, "verify")["ok"] is True


def test_diff_matches_the_masks(home):
    result = run_json(home, "diff", "nudity@1", "van-gogh@1")
    assert result["a"] == run_json(home, "masks", "show", "nudity@1")["mask"]["masked_total"]
    assert 0.0 <= result["iou"] <= 1.0
    assert sum(layer["both"] for layer in result["layers"].values()) == result["both"]


def test_export_mask_formats_agree(home, tmp_path):
    from cpreg.workspace import Workspace

    with Workspace(home) as ws:
        mask = ws.load_mask("safe-v1")
    dense = {name: layer.dense().numpy() for name, layer in mask.layers.items()}
    run(home, "export-mask", "safe-v1", str(tmp_path / "m.npz"))
    run(home, "export-mask", "safe-v1", str(tmp_path / "m.safetensors"))
    run(home, "export-mask", "safe-v1", str(tmp_path / "m.parquet"))
    with np.load(tmp_path / "m.npz") as npz:
        assert set(npz.files) == set(dense)
        for name, array in dense.items():
            assert npz[name].dtype == np.bool_ and np.array_equal(npz[name], array)
    tensors = load_file(tmp_path / "m.safetensors")
    for name, array in dense.items():
        assert tensors[name].dtype == torch.uint8 and np.array_equal(tensors[name].numpy().astype(bool), array)
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.column_names == ["layer", "row", "col", "steps"]
    assert table.num_rows == mask.num_masked
    layers = np.array(table.column("layer").to_pylist())
    rows, cols = table.column("row").to_numpy(), table.column("col").to_numpy()
    for name, array in dense.items():
        rebuilt = np.zeros_like(array)
        rebuilt[rows[layers == name], cols[layers == name]] = True
        assert np.array_equal(rebuilt, array)


def test_export_loads_with_plain_diffusers_and_matches_load_pipeline(home, tmp_path):
    from diffusers import DiffusionPipeline

    from cpreg.workspace import Workspace

    out = tmp_path / "exported"
    result = run_json(home, "export", "safe-v1", str(out))
    assert result["ref"] == "safe-v1@1"
    card = (out / "README.md").read_text()
    assert "nudity@1" in card and "van-gogh@1" in card and "sha256:" in card
    exported = DiffusionPipeline.from_pretrained(out)
    with Workspace(home) as ws:
        loaded, edit = ws.load_pipeline("safe-v1", device="cpu")
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    images = [p("a photo of a naked man", generator=torch.Generator().manual_seed(0), **kwargs).images for p in (exported, loaded)]
    np.testing.assert_array_equal(images[0], images[1])
    edit.restore()
    unedited = loaded("a photo of a naked man", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not np.array_equal(unedited, images[0])


def test_export_noise_fill_hides_zeros(home, tmp_path):
    from diffusers import DiffusionPipeline

    from cpreg.workspace import Workspace

    run(home, "export", "nudity@1", str(tmp_path / "noise"), "--fill", "noise")
    exported = DiffusionPipeline.from_pretrained(tmp_path / "noise")
    with Workspace(home) as ws:
        mask = ws.load_mask("nudity@1")
    for name, layer in mask.layers.items():
        values = exported.unet.get_submodule(name).weight.detach().view(-1)[layer.indices]
        assert bool((values != 0).all())


def test_generate_writes_a_side_by_side_grid(home, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = run_json(home, "generate", "--release", "safe-v1", "--prompt", "a photo of a naked man",
                      "--prompt", "a cat", "--steps", "2", "--out", str(out))
    assert result["path"] == str(out)
    from cpreg.grid import LABEL_HEIGHT

    # two labelled columns (base, edited) of 32-pixel images, a row per prompt under its label
    assert Image.open(out).size == (2 * (32 + 4), LABEL_HEIGHT + 2 * (LABEL_HEIGHT + 32))


def test_eval_reports_the_documented_keys(home, tmp_path):
    retained = home.parent.parent / "prompts" / "references.txt"  # a short list: the default set has 200 prompts
    report = run_json(home, "eval", "safe-v1", "--samples", "1", "--steps", "2", "--control", "--out", str(tmp_path / "ev"),
                      "--retain-prompts", str(retained))
    assert report["ref"] == "safe-v1@1" and report["model"] == "tiny"
    assert report["settings"]["retained_prompts"] == ["a park", "a street"] and report["retained_drop_worst"] is None
    assert report["fidelity"]["retained"]["images"] == 2 and report["control"]["fidelity"]["erased"]["images"] == 40
    for key in ("erased_accuracy_before", "erased_accuracy_after", "retained_accuracy_before", "retained_accuracy_after"):
        assert report[key] is None  # no classifier for the random tiny model: never faked
    assert report["classifier"]["available"] is False
    released = run_json(home, "releases", "show", "safe-v1")["release"]
    assert report["masked"] == released["masked_total"]
    assert report["proxy"]["available"] is True and report["proxy"]["erased_change"] > 0
    assert report["control"]["masked"] == report["masked"]
    assert (tmp_path / "ev" / "grid.png").is_file()


def test_concepts_add_from_yaml(home, tmp_path):
    spec = tmp_path / "glim.yaml"
    spec.write_text("name: glim\nkind: object\ntargets: [a glimmer in a park]\nreferences: [a park]\n")
    assert run_json(home, "concepts", "add", "--file", str(spec))["concept"]["kind"] == "object"
    assert run_json(home, "compute", "glim", *FAST)["ref"] == "glim@1"


def test_memorization_concept_uses_the_empty_prompt(home, tmp_path):
    (tmp_path / "memorised.txt").write_text("a famous memorised photo\nanother memorised caption\n")
    run(home, "concepts", "add", "memo", "--kind", "memorization", "--target-prompts", str(tmp_path / "memorised.txt"))
    pairs = run_json(home, "concepts", "show", "memo")["pairs"]
    assert [pair["reference"] for pair in pairs] == ["", ""]
    assert run_json(home, "compute", "memo", *FAST)["ref"] == "memo@1"


def test_console_script_runs(home):
    script = Path(sys.executable).with_name("cpreg")
    ok = subprocess.run([str(script), "--home", str(home), "masks", "show", "nudity@prod", "--json"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ref"] == "nudity@1"
    bad = subprocess.run([str(script), "--home", str(home), "masks", "show", "nudity@nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
    usage = subprocess.run([str(script), "compute"], capture_output=True, text=True)
    assert usage.returncode == 2


# -- bad inputs: a clear one-line error, exit 1, nothing changed ------------------------------

BAD = [
    (("compute", "no-such-concept", *FAST), "unknown concept"),
    (("compute", "nudity", *FAST, "--skill-ratio", "0"), "skill_ratio"),
    (("compute", "nudity", *FAST, "--skill-ratio", "1.5"), "skill_ratio"),
    (("compute", "nudity", *FAST, "--skill-ratio", "-0.1"), "skill_ratio"),
    (("compute", "nudity", "--model", "tiny", "--steps", "5", "--timesteps", "6"), "tau"),
    (("compute", "nudity", "--model", "tiny", "--steps", "5", "--timesteps", "0"), "tau"),
    (("compute", "nudity", "--model", "tiny", "--steps", "0", "--timesteps", "1"), "num_inference_steps"),
    (("compute", "nudity", *FAST[:-2], "--batch-size", "0"), "batch_size"),
    (("compute", "nudity", *FAST, "--select-ratio", "1"), "select_ratio"),
    (("compute", "nudity", "--model", "/no/such/folder"), "does not exist"),
    (("compute", "nudity", "--model", "no-such-org/no-such-model"), "not available"),
    (("compute", "nudity", *FAST, "--dtype", "float8"), "unknown dtype"),
    (("compute", "nudity", *FAST, "--device", "tpu"), "unknown device"),
    (("compute", "nudity", *FAST, "--device", "cuda:7"), "device 'cuda:7' is not available on this machine; available: cpu"),
    (("derive", "nudity", "--skill-ratio", "0.1", "--device", "cuda:7"), "not available on this machine"),
    (("generate", "--release", "nudity@1", "--prompt", "p", "--out", "{p}/g.png", "--device", "cuda:7"), "available: cpu"),
    (("compute", "nudity", "--model", "tinyy"), "did you mean 'tiny'?"),
    (("compute", "new", *FAST, "--target-prompts", "{p}/empty.txt", "--reference-prompts", "{p}/references.txt"), "no prompts"),
    (("compute", "new", *FAST, "--target-prompts", "{p}/three.txt", "--reference-prompts", "{p}/references.txt"), "pair up"),
    (("compute", "new", *FAST, "--target-prompts", "{p}/missing.txt", "--reference-prompts", "{p}/references.txt"), "cannot read"),
    (("compute", "../evil", *FAST, "--target-prompts", "{p}/targets.txt", "--reference-prompts", "{p}/references.txt"), "invalid name"),
    (("derive", "unknown@1", "--skill-ratio", "0.1"), "unknown"),
    (("derive", "nudity@99", "--skill-ratio", "0.1"), "99"),
    (("derive", "nudity", "--skill-ratio", "2"), "skill_ratio"),
    (("derive", "nudity", "--skill-ratio", "0.1", "--timesteps", "9"), "tau"),
    (("derive", "nudity", "--skill-ratio", "0.1", "--select-ratio", "-1"), "select_ratio"),
    (("masks", "show", "nudity@nope"), "nope"),
    (("masks", "show", "nudity@"), "invalid"),
    (("masks", "alias", "nudity@1", "123"), "alias"),
    (("masks", "alias", "nudity@1", "bad/alias"), "invalid"),
    (("masks", "tag", "nudity@1", "Bad Tag"), "invalid"),
    (("masks", "delete", "nudity@1"), "safe-v1"),
    (("compose", "nudity@1", "--release", "nudity"), "concept"),
    (("compose", "nudity@1", "--release", "../x"), "invalid release name"),
    (("compose", "nudity@1", "--release", ""), "invalid release name"),
    (("compose", "missing@1", "--release", "r"), "unknown"),
    (("compose", "nudity@1", "zorb@1", "--release", "mixed"), "zorb@1"),
    (("releases", "show", "nope"), "nope"),
    (("diff", "nudity@1", "nope"), "nope"),
    (("diff", "nudity@1", "zorb@1"), "zorb"),
    (("export-mask", "nudity@1", "{p}/out.txt"), "unknown mask file type"),
    (("export-mask", "nudity@1", "{p}/targets.txt"), "unknown mask file type"),
    (("export-mask", "nudity@1", "{p}/existing.npz"), "exists"),
    (("export", "nudity@1", "{p}"), "exists"),
    (("export", "nudity@1", "{p}/out", "--base", "tiny-sdxl"), "fingerprint"),
    (("export", "nudity@1", "{p}/out", "--model", "tiny-sdxl"), "fingerprint"),
    (("generate", "--release", "nudity@1", "--prompt", "p", "--out", "{p}/grid.jpg"), ".png"),
    (("concepts", "add", "nudity", "--target-prompts", "{p}/targets.txt", "--reference-prompts", "{p}/references.txt"), "built-in"),
    (("concepts", "add", "zorb", "--target-prompts", "{p}/targets.txt", "--reference-prompts", "{p}/references.txt"), "zorb"),
    (("concepts", "add", "--file", "{p}/bad.yaml"), "concept file"),
    (("concepts", "add", "x", "--target-prompts", "{p}/targets.txt", "--kind", "weird", "--reference-prompts", "{p}/references.txt"), "kind"),
    (("concepts", "show", "nope"), "unknown concept"),
    (("eval", "nope@1"), "nope"),
    (("eval", "nudity@1", "--classifier", "bogus"), "unknown classifier"),
    (("eval", "nudity@1", "--samples", "0", "--steps", "2"), "samples"),
    (("eval", "nudity@1", "--erased-prompts", "{p}/empty.txt"), "no prompts"),
    (("eval", "nudity@1", "--retain-prompts", "{p}/empty.txt"), "no prompts"),
    (("eval", "nudity@1", "--erased-prompts", "{p}/three.txt", "--retained-prompts", "{p}/three.txt"), "no retained prompts"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_clear_line_and_changes_nothing(home, args, message, monkeypatch):
    check_bad_input(home, args, message, state, monkeypatch)


def check_bad_input(home: Path, args: tuple[str, ...], message: str, snapshot, monkeypatch) -> None:
    """``args`` fail with exit 1 and one ``error:`` line containing ``message``; ``snapshot(home)`` is unchanged."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = home.parent.parent / "prompts"
    (prompts / "empty.txt").write_text("# nothing\n\n")
    (prompts / "three.txt").write_text("a\nb\nc\n")
    (prompts / "bad.yaml").write_text("targets: [unclosed\n")
    (prompts / "existing.npz").write_bytes(b"keep me")
    before = snapshot(home)
    result = run(home, *[a.format(p=prompts) for a in args], expect=1)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message.lower() in result.stderr.lower(), result.stderr
    assert snapshot(home) == before
    assert (prompts / "existing.npz").read_bytes() == b"keep me"


def test_corrupt_artifact_is_refused_by_name(home, tmp_path):
    with Registry(f"sqlite:///{home / 'registry.db'}", str(home)) as registry:
        oid = registry.resolve_mask("nudity@1").artifact_oid
    path = home / "objects" / oid[:2] / oid[2:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    result = run(home, "export-mask", "nudity@1", str(tmp_path / "m.npz"), expect=1)
    assert oid in result.stderr and not (tmp_path / "m.npz").exists()
    assert run(home, "verify", "--json", expect=1).stdout.count(oid) >= 1


def test_debug_is_accepted_after_the_subcommand(home):
    after = run(home, "masks", "show", "nudity@9", "--debug", expect=1)
    assert isinstance(after.exception, Exception) and "no version 9" in str(after.exception)  # raised, not one line
    before = run(home, "--debug", "masks", "show", "nudity@9", expect=1)
    assert type(before.exception) is type(after.exception)
    assert run(home, "masks", "show", "nudity@9", expect=1).stderr == "error: no version 9 of concept 'nudity'\n"


def test_unwritable_home(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run(blocker / "home", "masks", "list", expect=1)
    assert "cannot create the cpreg home" in result.stderr


def test_usage_errors_exit_2(home):
    run(home, "compute", expect=2)
    run(home, "compute", "nudity", "--steps", "abc", expect=2)
    run(home, "compute", "nudity", "--hook", "bogus", expect=2)
    run(home, "export", "--fill", "paint", "nudity@1", "x", expect=2)


# -- the same commands with the registry on PostgreSQL ----------------------------------------
#
# With $CPREG_TEST_POSTGRES_URL set (scripts/ci_services.sh starts a throw-away server), a subset
# of the tests above runs again with the registry on PostgreSQL: a template workspace is built
# once in its own database, and each test gets a copy of it (CREATE DATABASE ... TEMPLATE) plus
# a copy of the object store, selected through $CPREG_DB_URL (or --db-url) as a user would.

import os as _os  # noqa: E402
import uuid as _uuid  # noqa: E402

from sqlalchemy import create_engine as _create_engine  # noqa: E402
from sqlalchemy import make_url as _make_url  # noqa: E402
from sqlalchemy import text as _sql  # noqa: E402

PG_SERVER = _os.environ.get("CPREG_TEST_POSTGRES_URL")
on_postgres = pytest.mark.skipif(not PG_SERVER, reason="set CPREG_TEST_POSTGRES_URL (source scripts/ci_services.sh)")


def _pg_admin(sql: str) -> None:
    engine = _create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(_sql(sql))
    finally:
        engine.dispose()


def _pg_database(template: str | None = None) -> tuple[str, str]:
    """A new database (a copy of ``template`` if given): ``(name, SQLAlchemy URL)``."""
    name = f"cpreg_cli_{_uuid.uuid4().hex[:16]}"  # hex only: safe to quote as an identifier
    _pg_admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return name, _make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False)


def _pg_drop(name: str) -> None:
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_template(tmp_path_factory):
    """The template workspace of ``template``, its registry in a PostgreSQL database."""
    if not PG_SERVER:
        pytest.skip("set CPREG_TEST_POSTGRES_URL (source scripts/ci_services.sh)")
    name, url = _pg_database()
    home = tmp_path_factory.mktemp("pg-template") / ".cpreg"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPREG_DB_URL", url)
        patch.delenv("CPREG_ARTIFACT_URI", raising=False)
        assert run_json(home, "init")["db_url"] == url
        _populate(home)
    assert not (home / "registry.db").exists()  # the rows are on the server, the objects in home
    yield home, name
    _pg_drop(name)


@pytest.fixture
def pg_home(pg_template, tmp_path, monkeypatch):
    """A private copy of the PostgreSQL template workspace; $CPREG_DB_URL points at its database."""
    template_home, template_db = pg_template
    name, url = _pg_database(template=template_db)
    copy = tmp_path / "ws" / ".cpreg"
    shutil.copytree(template_home, copy)
    shutil.copytree(template_home.parent / "prompts", tmp_path / "prompts")
    monkeypatch.setenv("CPREG_DB_URL", url)
    monkeypatch.delenv("CPREG_ARTIFACT_URI", raising=False)
    yield copy
    _pg_drop(name)


def pg_state(home: Path) -> dict:
    with Registry(_os.environ["CPREG_DB_URL"], str(home)) as registry:
        return {
            "rows": registry.counts(),
            "masks": [(m.ref, m.tags, m.aliases) for m in registry.list_masks()],
            "events": [(e.id, e.action) for e in registry.events()],
            "objects": sorted(registry.store.ids()),
            "files": sorted(str(p.relative_to(home.parent)) for p in home.parent.rglob("*") if ".cpreg" not in p.parts),
        }


@on_postgres
def test_postgres_compute_derive_compose_report_refs(pg_home):
    test_compute_derive_compose_report_refs(pg_home)
    assert not (pg_home / "registry.db").exists()


@on_postgres
def test_postgres_listing_and_showing(pg_home):
    test_listing_and_showing(pg_home)


@on_postgres
def test_postgres_db_commands(pg_home):
    test_db_commands(pg_home)


@on_postgres
def test_postgres_db_downgrade_then_upgrade_with_db_url_option(tmp_path, monkeypatch):
    monkeypatch.delenv("CPREG_DB_URL", raising=False)
    name, url = _pg_database()
    try:
        home = tmp_path / ".cpreg"
        assert run_json(home, "--db-url", url, "db", "current")["revision"] is None
        head = run_json(home, "--db-url", url, "db", "upgrade")["revision"]
        assert run_json(home, "--db-url", url, "db", "downgrade", "base")["revision"] is None
        assert run_json(home, "--db-url", url, "db", "upgrade")["revision"] == head
        assert run_json(home, "--db-url", url, "init")["db_url"] == url
        assert run_json(home, "--db-url", url, "masks", "list")["masks"] == []
        assert not (home / "registry.db").exists()
    finally:
        _pg_drop(name)


@on_postgres
def test_postgres_tags_aliases_delete_gc_verify(pg_home):
    test_tags_aliases_delete(pg_home)


@on_postgres
def test_postgres_diff_and_export_mask(pg_home, tmp_path):
    test_diff_matches_the_masks(pg_home)
    test_export_mask_formats_agree(pg_home, tmp_path)


@on_postgres
@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)])
def test_postgres_bad_input_is_one_clear_line_and_changes_nothing(pg_home, args, message, monkeypatch):
    check_bad_input(pg_home, args, message, pg_state, monkeypatch)


@on_postgres
def test_postgres_unstorable_text_is_one_clear_line_and_changes_nothing(pg_home):
    """Text SQLite would store but PostgreSQL cannot: refused up front, the same on both backends."""
    before = pg_state(pg_home)
    result = run(pg_home, "compose", "nudity@1", "--release", "r", "--note", "bad\x00note", expect=1)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "nul" in result.stderr.lower()
    assert pg_state(pg_home) == before


@on_postgres
def test_postgres_corrupt_artifact_is_refused_by_name(pg_home, tmp_path):
    with Registry(_os.environ["CPREG_DB_URL"], str(pg_home)) as registry:
        oid = registry.resolve_mask("nudity@1").artifact_oid
    path = pg_home / "objects" / oid[:2] / oid[2:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    result = run(pg_home, "export-mask", "nudity@1", str(tmp_path / "m.npz"), expect=1)
    assert oid in result.stderr and not (tmp_path / "m.npz").exists()
    assert run(pg_home, "verify", "--json", expect=1).stdout.count(oid) >= 1
