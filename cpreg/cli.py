"""The ``cpreg`` command line: thin typer commands over :class:`cpreg.workspace.Workspace`.

Every command that reports something takes ``--json`` (one JSON object on stdout). Exit codes:
0 success, 1 a user error (one line on stderr; ``--debug`` shows the traceback), 2 usage errors,
3 an internal error (a bug: ``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

# The CLI speaks for itself: library warnings (e.g. optional torchvision) only with --debug.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .artifacts.errors import ArtifactFormatError
from .catalog import (
    CATALOG,
    KINDS,
    ConceptSpec,
    builtin_concept,
    concept_from_files,
    load_concept_file,
)
from .editors.options import Fill, HookPoint, NoiseMode, StatsDtype
from .errors import CpregError, InvalidArgumentError
from .models import BUILTIN_MODELS, DEFAULT_MODEL, DEMO_MODELS
from .serialize import to_jsonable

_options: dict = {"home": None, "db_url": None, "debug": False}
out = Console()
err = Console(stderr=True, soft_wrap=True)


#: Failures caused by the input or the environment: one line on stderr, exit code 1. Anything else
#: is a bug in cpreg: exit code 3, the traceback with --debug.
USER_ERRORS = (CpregError, OSError)
INTERNAL_ERROR_EXIT = 3


class _Group(TyperGroup):
    """Reports a command's failure: user errors in one line (exit 1), bugs as internal errors (exit 3).

    ``--debug`` is accepted anywhere before a ``--`` (``cpreg masks list --debug`` as well).
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug", *(arg for arg in args[:end] if arg != "--debug"), *args[end:]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise  # control flow (--help, usage errors), not failures
        except USER_ERRORS as error:
            if _options["debug"]:
                raise
            text = str(error).strip()
            err.print(f"error: {text.splitlines()[0] if text else type(error).__name__}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except Exception as error:
            if _options["debug"]:
                traceback.print_exc()
            else:
                text = str(error).strip().splitlines()
                err.print(f"internal error: {type(error).__name__}: {text[0] if text else ''} "
                          "(a bug in cpreg; run with --debug for the traceback)", markup=False, highlight=False)
            raise typer.Exit(INTERNAL_ERROR_EXIT) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False, help="ConceptPrune concept erasure with a versioned mask registry.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
concepts_app = typer.Typer(no_args_is_help=True, help="The concept catalog and custom concepts.")
masks_app = typer.Typer(no_args_is_help=True, help="Mask versions, tags and aliases.")
releases_app = typer.Typer(no_args_is_help=True, help="Releases: unions of masks.")
app.add_typer(db_app, name="db")
app.add_typer(concepts_app, name="concepts")
app.add_typer(masks_app, name="masks")
app.add_typer(releases_app, name="releases")


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
DvcStageOption = Annotated[Optional[str], typer.Option(
    "--dvc-stage", envvar="DVC_STAGE", show_envvar=False,
    help="DVC stage recorded with the registry rows (default: $DVC_STAGE, which `dvc repro` sets).")]
HookOption = Annotated[HookPoint, typer.Option(help="Layers to score and prune.")]
def _check_device(device: str | None) -> str | None:
    """Refuse a device this machine lacks before anything runs (imports torch: model commands only)."""
    if device is not None:
        from .models import resolve_device

        resolve_device(device)
    return device


DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", callback=_check_device)]
ScoringDeviceOption = Annotated[Optional[str], typer.Option(
    help="Where to score: cpu, cuda, cuda:N or mps (default: the CPU).", callback=_check_device)]
DtypeOption = Annotated[str, typer.Option(help="float32, float16 or bfloat16 (statistics: see --stats-dtype).")]
BaseModelOption = Annotated[Optional[str], typer.Option(
    "--model", "--base", help="Base model folder or hub id (default: the one REF was calibrated on).")]
PromptsOption = Annotated[Optional[str], typer.Option(
    help="`catalog` (CONCEPT's built-in prompt pairs) or a concept YAML file (name, kind, targets, references); "
         "default: CONCEPT's registered prompts, else the catalog.")]


@app.callback()
def _main(
    home: Annotated[Optional[Path], typer.Option(help="Workspace folder (default $CPREG_HOME or ./.cpreg).")] = None,
    db_url: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL of the registry (default $CPREG_DB_URL).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    _options.update(home=home, db_url=db_url, debug=debug)


def _workspace(*, runs_models: bool = False):
    """The workspace of ``--home`` / ``--db-url``; ``runs_models`` quiets the model libraries' progress bars."""
    from .workspace import Workspace

    if runs_models:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    return Workspace(_options["home"], _options["db_url"])


def _emit(as_json: bool, payload: dict, human) -> None:
    if "torch.distributed" in sys.modules:  # a model command may run under torchrun: rank 0 reports for all
        from .distributed import is_main_process

        if not is_main_process():
            return
    if as_json:
        sys.stdout.write(json.dumps(to_jsonable(payload), sort_keys=True) + "\n")
    else:
        human()


def _table(title: str, columns: list[str], rows: list[list]) -> Table:
    table = Table(title=title)
    cells = [[escape(str(cell)) for cell in row] for row in rows]  # text, never rich markup
    for index, column in enumerate(columns):
        widest = max([len(column)] + [len(row[index]) for row in cells])
        table.add_column(column, no_wrap=widest <= 24, overflow="fold")  # long text folds, short never does
    for row in cells:
        table.add_row(*row)
    return table


def _mask_rows(masks) -> list[list]:
    return [
        [m.ref, m.hook, m.skill_ratio, m.tau, m.select_ratio, f"{m.masked_total:,}", f"{m.fraction:.4%}",
         ",".join(m.aliases), ",".join(m.tags), f"{m.created_at:%Y-%m-%d %H:%M}"]
        for m in masks
    ]


MASK_COLUMNS = ["ref", "hook", "skill_ratio", "tau", "select", "masked", "of weights", "aliases", "tags", "created"]


# -- workspace and database -----------------------------------------------------------------


@app.command()
def init(as_json: JsonOption = False) -> None:
    """Create the workspace (registry database at the current schema, artifact store)."""
    with _workspace() as ws:
        payload = {"home": ws.settings.home, "db_url": ws.settings.db_url, "artifact_uri": ws.settings.artifact_uri}
    _emit(as_json, payload, lambda: out.print(f"cpreg workspace ready in {payload['home']}"))


def _db_url() -> str:
    from .settings import Settings

    settings = Settings.from_env(_options["home"], _options["db_url"])
    if settings.db_url.startswith("sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    return settings.db_url


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", as_json: JsonOption = False) -> None:
    """Migrate the registry database to REVISION (default: head)."""
    from .registry import current, upgrade

    url = _db_url()
    upgrade(url, revision)
    _emit(as_json, {"revision": current(url)}, lambda: out.print(f"database at revision {current(url)}"))


@db_app.command("downgrade")
def db_downgrade(revision: str, as_json: JsonOption = False) -> None:
    """Migrate the registry database down to REVISION (``base`` empties it)."""
    from .registry import current, downgrade

    url = _db_url()
    downgrade(url, revision)
    _emit(as_json, {"revision": current(url)}, lambda: out.print(f"database at revision {current(url)}"))


@db_app.command("current")
def db_current(as_json: JsonOption = False) -> None:
    """Print the database's schema revision and the newest one this cpreg knows."""
    from .registry import current, head

    url = _db_url()
    payload = {"revision": current(url), "head": head()}
    _emit(as_json, payload, lambda: out.print(f"database at {payload['revision']} (head: {payload['head']})"))


# -- concepts -------------------------------------------------------------------------------


@concepts_app.command("list")
def concepts_list(as_json: JsonOption = False) -> None:
    """The built-in catalog and the registered custom concepts."""
    with _workspace() as ws:
        registered = {c.name: c for c in ws.concepts()}
    rows = [{"name": s.name, "kind": s.kind, "pairs": len(s.pairs), "skill_ratio": s.skill_ratio,
             "builtin": True, "description": s.description} for s in CATALOG.values()]
    rows += [{"name": c.name, "kind": c.kind, "pairs": None, "skill_ratio": None, "builtin": False,
              "description": c.description} for c in registered.values() if c.name not in CATALOG]
    _emit(as_json, {"concepts": rows}, lambda: out.print(_table(
        "concepts", ["name", "kind", "pairs", "skill_ratio", "built-in", "description"],
        [[r["name"], r["kind"], r["pairs"] or "", r["skill_ratio"] or "", "yes" if r["builtin"] else "", r["description"]] for r in rows])))


@concepts_app.command("show")
def concepts_show(name: str, as_json: JsonOption = False) -> None:
    """A concept's kind, default skill_ratio and prompt pairs."""
    with _workspace() as ws:
        spec = ws.concept_spec(name)
    payload = {"name": spec.name, "kind": spec.kind, "description": spec.description, "skill_ratio": spec.skill_ratio,
               "pairs": [{"target": t, "reference": r} for t, r in spec.pairs]}
    _emit(as_json, payload, lambda: out.print(_table(
        f"{spec.name} ({spec.kind}, skill_ratio {spec.skill_ratio})", ["target", "reference"], [list(p) for p in spec.pairs])))


@concepts_app.command("add")
def concepts_add(
    name: Annotated[Optional[str], typer.Argument(help="Concept name (taken from the YAML file when omitted).")] = None,
    target_prompts: Annotated[Optional[Path], typer.Option(help="File with one target prompt per line.")] = None,
    reference_prompts: Annotated[Optional[Path], typer.Option(help="File with the matching reference prompts.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="One YAML file: name, kind, description, targets, references.")] = None,
    kind: Annotated[str, typer.Option(help=f"One of {', '.join(KINDS)}.")] = "custom",
    description: str = "",
    as_json: JsonOption = False,
) -> None:
    """Register a custom concept from prompt files or one YAML file."""
    if file is not None:
        if target_prompts or reference_prompts:
            raise InvalidArgumentError("give either --file or --target-prompts/--reference-prompts, not both")
        spec = load_concept_file(file)
        if name and name != spec.name:
            raise InvalidArgumentError(f"the YAML file names the concept {spec.name!r}, not {name!r}")
    else:
        if not name or target_prompts is None:
            raise InvalidArgumentError("give NAME with --target-prompts (and --reference-prompts), or --file")
        spec = concept_from_files(name, kind, target_prompts, reference_prompts, description)
    with _workspace() as ws:
        concept = ws.add_concept(spec)
    _emit(as_json, {"concept": concept, "pairs": len(spec.pairs)},
          lambda: out.print(f"added concept {concept.name} ({concept.kind}, {len(spec.pairs)} prompt pairs)"))


# -- computing ------------------------------------------------------------------------------

NoiseOption = Annotated[NoiseMode, typer.Option(
    help="Initial noise of every prompt: cpu (a seeded CPU generator per prompt) or reference (the model device's "
         "global RNG seeded before each prompt, as the authors' code: their published masks; docs/method.md).")]
StatsDtypeOption = Annotated[StatsDtype, typer.Option(
    help="Accumulate and score the statistics in float32, or in float16 as the authors' code (docs/method.md).")]


@app.command()
def compute(
    concept: str,
    model: Annotated[Optional[str], typer.Option(help=f"Hub id, local folder or built-in ({', '.join([*BUILTIN_MODELS, *DEMO_MODELS])}); default $CPREG_MODEL or {DEFAULT_MODEL}.")] = None,
    target_prompts: Annotated[Optional[Path], typer.Option(help="Override the concept's target prompts (file).")] = None,
    reference_prompts: Annotated[Optional[Path], typer.Option(help="Override the reference prompts (file).")] = None,
    skill_ratio: Annotated[Optional[float], typer.Option(help="Default: by the concept's kind (0.01 styles, 0.02 objects).")] = None,
    timesteps: Annotated[int, typer.Option("--timesteps", help="tau: first denoising steps used.")] = 10,
    steps: Annotated[int, typer.Option(help="T: denoising steps of the scheduler.")] = 50,
    select_ratio: float = 0.0,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    hook: HookOption = HookPoint.FFN_OUT,
    noise: NoiseOption = NoiseMode.CPU,
    stats_dtype: StatsDtypeOption = StatsDtype.FLOAT32,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    description: str = "",
    as_json: JsonOption = False,
) -> None:
    """Calibrate CONCEPT on a base model, store the statistics and register a mask version."""
    from .editors import CalibrationConfig

    config = CalibrationConfig(hook=hook, num_inference_steps=steps, tau=timesteps, guidance_scale=guidance_scale,
                               seed=seed, batch_size=batch_size, noise=noise, stats_dtype=stats_dtype)
    with _workspace(runs_models=True) as ws:
        spec = ws.concept_spec(concept) if target_prompts is None else concept_from_files(
            concept, ws.concept_spec(concept).kind if concept in CATALOG else "custom", target_prompts, reference_prompts)
        if target_prompts is None and reference_prompts is not None:
            raise InvalidArgumentError("--reference-prompts needs --target-prompts")
        mask = ws.compute(spec, model=model, config=config, skill_ratio=skill_ratio, select_ratio=select_ratio,
                          dtype=dtype, device=device, progress=not as_json and err.is_terminal, description=description)
    _emit(as_json, {"ref": mask.ref, "mask": mask}, lambda: out.print(
        f"{mask.ref}: {mask.masked_total:,} weights ({mask.fraction:.4%} of the {mask.component})"))


@app.command()
def derive(
    ref: str,
    skill_ratio: Annotated[float, typer.Option(help="Fraction of each row's inputs in the top-k.")],
    timesteps: Annotated[Optional[int], typer.Option("--timesteps", help="tau (default: the calibrated one).")] = None,
    select_ratio: float = 0.0,
    device: ScoringDeviceOption = None,
    description: str = "",
    as_json: JsonOption = False,
) -> None:
    """A new mask version from the statistics stored for REF: no model run."""
    with _workspace() as ws:
        mask = ws.derive(ref, skill_ratio=skill_ratio, tau=timesteps, select_ratio=select_ratio, device=device,
                         description=description)
    _emit(as_json, {"ref": mask.ref, "mask": mask}, lambda: out.print(
        f"{mask.ref}: {mask.masked_total:,} weights ({mask.fraction:.4%} of the {mask.component})"))


# -- the file-based steps of the DVC pipeline (dvc.yaml) -------------------------------------


def _concept_source(ws, concept: str, prompts: Optional[str]) -> ConceptSpec:
    """CONCEPT's prompts: registered or built-in (default), the catalog only, or a concept YAML file."""
    if prompts is None:
        return ws.concept_spec(concept)
    if prompts == "catalog":
        return builtin_concept(concept)
    spec = load_concept_file(prompts)
    if spec.name != concept:
        raise InvalidArgumentError(f"the concept file {prompts!r} names the concept {spec.name!r}, not {concept!r}")
    return spec


def _provenance(dvc_stage: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The DVC stage (checked) and the git revision of the current directory."""
    from .settings import git_revision

    if dvc_stage is not None and len(dvc_stage) > 256:
        raise InvalidArgumentError("--dvc-stage must have at most 256 characters")
    return dvc_stage or None, git_revision()


@app.command("calibrate")
def calibrate_command(
    concept: str,
    prompts: PromptsOption = None,
    model: Annotated[Optional[str], typer.Option(help=f"Hub id, local folder or built-in ({', '.join([*BUILTIN_MODELS, *DEMO_MODELS])}); default $CPREG_MODEL or {DEFAULT_MODEL}.")] = None,
    timesteps: Annotated[int, typer.Option("--timesteps", help="tau: first denoising steps recorded.")] = 10,
    steps: Annotated[int, typer.Option(help="T: denoising steps of the scheduler.")] = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    hook: HookOption = HookPoint.FFN_OUT,
    noise: NoiseOption = NoiseMode.CPU,
    stats_dtype: StatsDtypeOption = StatsDtype.FLOAT32,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Also write the statistics to this .safetensors file.")] = None,
    force: ForceOption = False,
    recompute: Annotated[bool, typer.Option(help="Run the model even if the registry holds a calibration of the same inputs.")] = False,
    dvc_stage: DvcStageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Calibrate CONCEPT and register the calibration (no mask); --out writes the statistics file.

    Idempotent: a calibration of the same model, prompts and settings already in the registry is
    reused (no model run, unless --recompute), and identical statistics are one registry row.
    """
    from .dvc_files import check_output, write_output

    from .editors import CalibrationConfig

    config = CalibrationConfig(hook=hook, num_inference_steps=steps, tau=timesteps, guidance_scale=guidance_scale,
                               seed=seed, batch_size=batch_size, noise=noise, stats_dtype=stats_dtype)
    if out_path is not None:
        check_output(out_path, (".safetensors",), force=force)
    dvc_stage, git_rev = _provenance(dvc_stage)
    with _workspace(runs_models=True) as ws:
        spec = _concept_source(ws, concept, prompts)
        result = ws.calibrate(spec, model=model, config=config, dtype=dtype, device=device, reuse=not recompute,
                              progress=not as_json and err.is_terminal, dvc_stage=dvc_stage, git_rev=git_rev)
    if out_path is not None:
        write_output(out_path, result.data)
    cal = result.calibration
    payload = {"concept": spec.name, "calibration": cal, "stats_oid": cal.stats_oid, "reused": result.reused,
               "path": out_path}
    how = "reused from the registry" if result.reused else f"computed in {cal.duration_s:.1f} s"
    _emit(as_json, payload, lambda: out.print(
        f"{spec.name}: calibration #{cal.id} ({how}), statistics {cal.stats_oid[:12]}"
        + (f" written to {out_path}" if out_path is not None else ""), soft_wrap=True, markup=False))


@app.command("mask")
def mask_command(
    concept: str,
    stats: Annotated[Path, typer.Option(help="Statistics file written by `cpreg calibrate --out`.")],
    prompts: PromptsOption = None,
    model: Annotated[Optional[str], typer.Option(help="Base model the statistics were calibrated on (default: the registered one, else $CPREG_MODEL).")] = None,
    skill_ratio: Annotated[Optional[float], typer.Option(help="Default: by the concept's kind (0.01 styles, 0.02 objects).")] = None,
    timesteps: Annotated[Optional[int], typer.Option("--timesteps", help="tau (default: the calibrated one).")] = None,
    select_ratio: float = 0.0,
    device: ScoringDeviceOption = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Also write the mask to this .parquet file (the registry's format).")] = None,
    force: ForceOption = False,
    description: str = "",
    dvc_stage: DvcStageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Derive CONCEPT's mask from a statistics file (no model run) and register it.

    Idempotent: a mask version with the same content is reused, not duplicated. The base model's
    weights are loaded (CPU) to score, and its fingerprint must be the statistics'.
    """
    from .dvc_files import check_output, read_input, write_output

    if out_path is not None:
        check_output(out_path, (".parquet",), force=force)
    data = read_input(stats, "statistics file")
    dvc_stage, git_rev = _provenance(dvc_stage)
    with _workspace() as ws:
        spec = _concept_source(ws, concept, prompts)
        try:
            result = ws.mask_from_stats(spec, data, model=model, skill_ratio=skill_ratio, tau=timesteps,
                                        select_ratio=select_ratio, device=device, description=description,
                                        dvc_stage=dvc_stage, git_rev=git_rev, source=f"the statistics in {str(stats)!r}")
        except ArtifactFormatError as error:
            raise InvalidArgumentError(f"{str(stats)!r} is not a valid statistics file: {error}") from None
    if out_path is not None:
        write_output(out_path, result.data)
    mask = result.mask
    payload = {"ref": mask.ref, "mask": mask, "reused": result.reused, "path": out_path}
    _emit(as_json, payload, lambda: out.print(
        f"{mask.ref}{' (existing version)' if result.reused else ''}: {mask.masked_total:,} weights "
        f"({mask.fraction:.4%} of the {mask.component})" + (f", written to {out_path}" if out_path is not None else ""), soft_wrap=True, markup=False))


# -- masks ----------------------------------------------------------------------------------


@masks_app.command("list")
def masks_list(concept: Optional[str] = None, tag: Optional[str] = None, as_json: JsonOption = False) -> None:
    """Mask versions, newest last."""
    with _workspace() as ws:
        masks = ws.masks(concept, tag=tag)
    _emit(as_json, {"masks": masks}, lambda: out.print(_table("masks", MASK_COLUMNS, _mask_rows(masks))))


@masks_app.command("show")
def masks_show(ref: str, as_json: JsonOption = False) -> None:
    """One mask version with its per-layer counts."""
    with _workspace() as ws:
        mask = ws.resolve_mask(ref)

    def human() -> None:
        out.print(_table(mask.ref, MASK_COLUMNS, _mask_rows([mask])))
        out.print(_table("masked weights per layer", ["layer", "masked"], [[k, f"{v:,}"] for k, v in mask.masked_per_layer.items()]))

    _emit(as_json, {"ref": mask.ref, "mask": mask}, human)


@masks_app.command("tag")
def masks_tag(ref: str, tags: list[str], remove: Annotated[bool, typer.Option(help="Remove these tags instead.")] = False,
              as_json: JsonOption = False) -> None:
    """Add (or --remove) tags of a mask version."""
    with _workspace() as ws:
        mask = ws.tag(ref, [] if remove else tags, tags if remove else [])
    _emit(as_json, {"ref": mask.ref, "tags": mask.tags}, lambda: out.print(f"{mask.ref} tags: {', '.join(mask.tags) or '-'}"))


@masks_app.command("alias")
def masks_alias(ref: str, alias: str, as_json: JsonOption = False) -> None:
    """Point ALIAS (e.g. ``prod``) at the mask version REF, moving it if it exists."""
    with _workspace() as ws:
        entry = ws.set_alias(ref, alias)
    _emit(as_json, {"ref": entry.ref, "alias": entry}, lambda: out.print(f"{entry.ref} -> {entry.concept}@{entry.mask_version}"))


@masks_app.command("delete")
def masks_delete(ref: str, as_json: JsonOption = False) -> None:
    """Delete a mask version that no release uses (its artifact goes at the next ``gc``)."""
    with _workspace() as ws:
        mask = ws.delete_mask(ref)
    _emit(as_json, {"ref": mask.ref, "deleted": True}, lambda: out.print(f"deleted {mask.ref}"))


# -- releases -------------------------------------------------------------------------------


@app.command()
def compose(
    refs: Annotated[list[str], typer.Argument(help="Member masks, e.g. nudity@3 van-gogh@prod.")],
    release: Annotated[str, typer.Option(help="Release name; a new version is created.")],
    note: str = "",
    as_json: JsonOption = False,
) -> None:
    """Compose masks into a release (their union)."""
    with _workspace() as ws:
        entry = ws.compose(release, refs, note)
    _emit(as_json, {"ref": entry.ref, "release": entry}, lambda: out.print(
        f"{entry.ref}: {', '.join(entry.members)} -> {entry.masked_total:,} weights"))


@app.command("release")
def release_command(
    name: str,
    members: Annotated[list[str], typer.Argument(help="Member concepts; each mask is read from MASKS_DIR/<concept>.parquet.")],
    masks_dir: Annotated[Path, typer.Option(help="Folder of the mask files written by `cpreg mask --out`.")] = Path("data/masks"),
    out_dir: Annotated[Optional[Path], typer.Option(help="Write NAME.json (the release record) and NAME.parquet (the union) here.")] = None,
    note: str = "",
    force: ForceOption = False,
    dvc_stage: DvcStageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compose the masks in mask files into release NAME; reuses the latest version if it has the same members."""
    from .dvc_files import (
        canonical_json,
        check_output,
        read_input,
        release_record,
        write_output,
    )
    from .registry import validate_name

    validate_name(name, "release name")
    members = [validate_name(member, "concept name") for member in dict.fromkeys(members)]  # twice counts once
    record_path = union_path = None
    if out_dir is not None:
        record_path = check_output(out_dir / f"{name}.json", (".json",), force=force, what="the release record")
        union_path = check_output(out_dir / f"{name}.parquet", (".parquet",), force=force, what="the union file")
    files = [masks_dir / f"{member}.parquet" for member in members]
    data = [read_input(path, "mask file") for path in files]
    dvc_stage, git_rev = _provenance(dvc_stage)
    with _workspace() as ws:
        result = ws.release_from_masks(name, list(zip(members, data)), note, sources=[str(path) for path in files],
                                       dvc_stage=dvc_stage, git_rev=git_rev)
        base = ws.base_model(result.release.base_model_fingerprint)
    entry = result.release
    member_files = [str(files[members.index(mask.concept)]) for mask in result.members]
    record = release_record(entry, result.members, member_files, str(union_path) if union_path else "", base)
    if out_dir is not None:
        write_output(union_path, result.data)
        write_output(record_path, canonical_json(record))
    payload = {"ref": entry.ref, "release": entry, "reused": result.reused, "record": record_path, "union": union_path}
    _emit(as_json, payload, lambda: out.print(
        f"{entry.ref}{' (existing version)' if result.reused else ''}: {', '.join(entry.members)} -> "
        f"{entry.masked_total:,} weights" + (f", written to {record_path}" if record_path else ""), soft_wrap=True, markup=False))


@app.command("metrics")
def metrics_command(
    record: Annotated[Path, typer.Argument(help="Release record (NAME.json) written by `cpreg release --out-dir`.")],
    metrics: Annotated[Optional[Path], typer.Option(help="Write the metrics to this JSON file.")] = None,
    plots_dir: Annotated[Optional[Path], typer.Option(help="Write one per-layer density CSV per member and for the release here.")] = None,
    eval_samples: Annotated[int, typer.Option(help="Also measure erasure as `cpreg eval` does, with N images per prompt (0: skip).")] = 0,
    eval_seed: Annotated[int, typer.Option(help="Seed of the erasure measurement.")] = 0,
    eval_steps: Annotated[int, typer.Option(help="Denoising steps of the erasure measurement.")] = 25,
    eval_out: Annotated[Optional[Path], typer.Option(help="Folder for the erasure grid.png and report.json.")] = None,
    eval_retain_prompts: Annotated[Optional[Path], typer.Option(
        help="Retained prompts of the erasure measurement, one per line (default: as `cpreg eval`).")] = None,
    classifier: Annotated[str, typer.Option(help="Classifier of the erasure measurement (see `cpreg eval`).")] = "auto",
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Masked fraction per member and in total, per-layer density and (optionally) erasure of a release record.

    With ``--eval-samples N`` the metrics also hold ``erasure``: the accuracies before / after, the
    headline pair with its intervals, the retained prompts' fidelity and the classifier-free proxy of
    ``cpreg eval`` (base vs. edited, same seeds).
    """
    from .catalog import read_prompt_file
    from .dvc_files import (
        canonical_json,
        check_output,
        erasure_metrics,
        evaluate_release,
        read_release_record,
        write_output,
    )

    if eval_samples < 0:
        raise InvalidArgumentError(f"--eval-samples must be >= 0, got {eval_samples}")
    if eval_steps < 1:
        raise InvalidArgumentError(f"--eval-steps must be >= 1, got {eval_steps}")
    if eval_out is not None and eval_out.exists() and not eval_out.is_dir():
        raise InvalidArgumentError(f"--eval-out {str(eval_out)!r} is not a folder")
    if metrics is not None:
        check_output(metrics, (".json",), force=force, what="--metrics")
    if plots_dir is not None:
        if plots_dir.exists() and not plots_dir.is_dir():
            raise InvalidArgumentError(f"--plots-dir {str(plots_dir)!r} is not a folder")
        if plots_dir.is_dir() and any(plots_dir.iterdir()) and not force:
            raise InvalidArgumentError(f"{str(plots_dir)!r} is not empty; pass --force to replace its CSV files")
    retained = read_prompt_file(eval_retain_prompts) if eval_retain_prompts else None
    release = read_release_record(record)
    values, plots = evaluate_release(release)
    if eval_samples:
        with _workspace(runs_models=True) as ws:
            if ws.resolve_release(release["ref"]).union_oid != release["union_oid"]:
                raise InvalidArgumentError(f"{release['ref']} in the registry is not the release of {str(record)!r}")
            report = ws.evaluate(release["ref"], classifier=classifier, retained_prompts=retained, samples=eval_samples,
                                 seed=eval_seed, steps=eval_steps, out_dir=eval_out)
        values["erasure"] = erasure_metrics(report)
    if metrics is not None:
        write_output(metrics, canonical_json(values))
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for stale in plots_dir.glob("*.csv"):
            stale.unlink()
        for stem, text in plots.items():
            write_output(plots_dir / f"{stem}.csv", text)

    def human() -> None:
        rows = [[concept, f"{row['masked']:,}", f"{row['fraction']:.4%}"] for concept, row in values["concepts"].items()]
        rows.append(["total", f"{values['total']['masked']:,}", f"{values['total']['fraction']:.4%}"])
        out.print(_table(escape(str(record)), ["member", "masked", "of weights"], rows))
        if "erasure" in values:
            out.print(_table("erasure", ["metric", "value"], [[k, "n/a" if v is None else f"{v:.4g}"] for k, v in values["erasure"].items()]))

    _emit(as_json, {"metrics": values, "path": metrics, "plots": plots_dir}, human)


def _made_by(entry) -> str:
    """``stage@rev`` of the DVC stage and git revision that made a row ('' when neither is known)."""
    return "@".join(part for part in (entry.dvc_stage, (entry.git_rev or "")[:12]) if part)


def _release_rows(releases) -> list[list]:
    return [[r.ref, ", ".join(r.members), f"{r.masked_total:,}", r.hook, r.notes, _made_by(r), f"{r.created_at:%Y-%m-%d %H:%M}"]
            for r in releases]


RELEASE_COLUMNS = ["ref", "members", "masked", "hook", "notes", "made by", "created"]


@releases_app.command("list")
def releases_list(as_json: JsonOption = False) -> None:
    """Every release version."""
    with _workspace() as ws:
        releases = ws.releases()
    _emit(as_json, {"releases": releases}, lambda: out.print(_table("releases", RELEASE_COLUMNS, _release_rows(releases))))


@releases_app.command("show")
def releases_show(ref: str, as_json: JsonOption = False) -> None:
    """One release version and its members."""
    with _workspace() as ws:
        entry = ws.resolve_release(ref)
    _emit(as_json, {"ref": entry.ref, "release": entry}, lambda: out.print(_table(entry.ref, RELEASE_COLUMNS, _release_rows([entry]))))


@app.command()
def diff(a: str, b: str, as_json: JsonOption = False) -> None:
    """Per-layer counts and IoU of two masks or releases."""
    with _workspace() as ws:
        result = ws.diff(a, b)
    rows = [[name, row["a"], row["b"], row["both"], f"{row['iou']:.3f}"] for name, row in result["layers"].items()]
    rows.append(["total", result["a"], result["b"], result["both"], f"{result['iou']:.3f}"])
    _emit(as_json, {"a": a, "b": b, **result}, lambda: out.print(_table(f"{a} vs {b}", ["layer", "A", "B", "both", "IoU"], rows)))


# -- using masks ----------------------------------------------------------------------------


@app.command("export-mask")
def export_mask(ref: str, path: Path, force: Annotated[bool, typer.Option(help="Overwrite PATH.")] = False,
                as_json: JsonOption = False) -> None:
    """Write a mask or a release's union as .npz, .safetensors (uint8) or .parquet (layer, row, col)."""
    from .mask_export import write_mask_file

    with _workspace() as ws:
        entity = ws.resolve(ref)
        written = write_mask_file(ws.load_mask(entity), path, overwrite=force)
    _emit(as_json, {"ref": entity.ref, "path": written}, lambda: out.print(f"wrote {entity.ref} to {written}"))


@app.command()
def export(
    ref: str,
    out_dir: Path,
    fill: Annotated[Fill, typer.Option(help="zero (the paper) or noise (hides pruned positions).")] = Fill.ZERO,
    base: BaseModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a complete diffusers pipeline folder with REF applied, and a model card.

    REF may also be a release record (NAME.json) written by `cpreg release --out-dir`.
    """
    record = None
    if ref.endswith(".json") and Path(ref).is_file():
        from .dvc_files import read_release_record

        record = read_release_record(ref)
    with _workspace(runs_models=True) as ws:
        entity = ws.resolve(record["ref"] if record else ref)
        if record and getattr(entity, "union_oid", None) != record["union_oid"]:
            raise InvalidArgumentError(f"the registry's {entity.ref} is not the release recorded in {ref!r} (its union differs)")
        folder = ws.export(entity.ref if hasattr(entity, "members") else ref, out_dir, base=base, fill=fill)
    _emit(as_json, {"ref": entity.ref, "path": folder}, lambda: out.print(f"exported {entity.ref} to {folder}"))


@app.command()
def generate(
    release: Annotated[str, typer.Option(help="Mask or release to compare with the base model.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt (repeat for several rows).")],
    out_path: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    base: BaseModelOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Base and edited images side by side, same seed, as one PNG grid."""
    from .grid import before_after_grid

    if out_path.suffix.lower() != ".png":
        raise InvalidArgumentError(f"--out must be a .png file, got {str(out_path)!r}")
    with _workspace(runs_models=True) as ws:
        entity = ws.resolve(release)
        pipe = ws.base_pipeline(entity, base, device=device)
        image = before_after_grid(pipe, ws.load_mask(entity), prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                  labels=("base", entity.ref))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    _emit(as_json, {"ref": entity.ref, "path": out_path, "prompts": prompt}, lambda: out.print(f"wrote {out_path}"))


@app.command("eval")
def eval_command(
    ref: str,
    model: BaseModelOption = None,
    erased_prompts: Annotated[Optional[Path], typer.Option(help="Prompts of the erased concept(s), one per line (default: the concepts' targets).")] = None,
    retained_prompts: Annotated[Optional[Path], typer.Option(
        "--retain-prompts", "--retained-prompts",
        help="Prompts that must keep working, one per line (default, by model: demo: every shape x colour x background; "
             "others: the references, the catalog's other concepts and cpreg's generic captions).")] = None,
    samples: Annotated[int, typer.Option(help="Images per prompt, before and after.")] = 8,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    control: Annotated[bool, typer.Option(help="Also measure a random mask of the same size per layer.")] = False,
    classifier: Annotated[str, typer.Option(
        help="auto, demo, nudenet (nudity), clip (the catalog's artists, Imagenette objects, genders) or none; "
             "auto: demo on demo models, else nudenet or clip when available (docs/evaluation.md).")] = "auto",
    clip_model: Annotated[Optional[str], typer.Option(
        help="CLIP model folder or cached hub id for clip (default: $CPREG_CLIP_MODEL, else "
             "openai/clip-vit-large-patch14 if in the Hugging Face cache; never downloaded).")] = None,
    fill: Fill = Fill.ZERO,
    device: DeviceOption = "auto",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the before/after grid PNG.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure erasure: base vs edited images (same seeds) on erased and retained prompts."""
    from .catalog import read_prompt_file

    with _workspace(runs_models=True) as ws:
        report = ws.evaluate(
            ref, base=model, classifier=classifier, clip_model=clip_model, device=device,
            erased_prompts=read_prompt_file(erased_prompts) if erased_prompts else None,
            retained_prompts=read_prompt_file(retained_prompts) if retained_prompts else None,
            samples=samples, seed=seed, steps=steps, guidance_scale=guidance_scale, control=control, fill=fill.value,
            out_dir=out_dir,
        )

    def human() -> None:
        rows = [["erased concept(s)", _pct(report["erased_accuracy_before"]), _pct(report["erased_accuracy_after"])],
                ["retained concepts", _pct(report["retained_accuracy_before"]), _pct(report["retained_accuracy_after"])]]
        if report["control"]:
            control = report["control"]
            rows += [["erased, random mask (control)", _pct(report["erased_accuracy_before"]), _pct(control.get("erased_accuracy_after"))],
                     ["retained, random mask (control)", _pct(report["retained_accuracy_before"]), _pct(control.get("retained_accuracy_after"))]]
        out.print(_table(f"{report['ref']} on {report['model']} ({report['masked_fraction']:.4%} of the denoiser pruned)",
                         ["prompts", "accuracy before", "accuracy after"], rows))
        if not (report["classifier"] or {}).get("available", True):
            out.print(f"accuracies not measured: {report['classifier']['reason']}")
        variants = {"mask": report, **({"control": report["control"]} if report["control"] else {})}
        for name, variant in variants.items():
            out.print(_headline(name, variant), soft_wrap=True, markup=False, highlight=False)
        if "reason" in report["bootstrap"]:
            out.print(f"no intervals: {report['bootstrap']['reason']}", markup=False)
        out.print(_fidelity_table(variants))
        for key in ("colour_fidelity", "clip_score"):
            if not report[key]["available"]:
                out.print(f"{key.replace('_', ' ')} not measured: {report[key]['reason']}", soft_wrap=True, markup=False)
        worst = sorted(report["breakdown"].items(), key=lambda item: -(item[1]["drop"] or 0.0))[:BREAKDOWN_ROWS]
        if worst and worst[0][1]["drop"] is not None:
            out.print(_table(f"retained groups with the largest accuracy drop (of {len(report['breakdown'])})",
                             ["group", "prompts", "accuracy before", "accuracy after", "drop (points)"],
                             [[group, row["prompts"], _pct(row["accuracy_before"]), _pct(row["accuracy_after"]),
                               _points(row["drop"])] for group, row in worst]))
        if report["grid"]:
            out.print(f"grid: {report['grid']}")

    _emit(as_json, report, human)


#: Groups shown by `cpreg eval`'s human output (the report has all of them).
BREAKDOWN_ROWS = 5


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _number(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def _points(value: float | None) -> str:
    return _number(value, ".1f")


def _interval(ci: list[float] | None, render) -> str:
    return "" if ci is None else f" (95% CI {render(ci[0])} to {render(ci[1])})"


def _headline(name: str, variant: dict) -> str:
    """One line: the erased accuracy after and the worst retained drop, with their intervals."""
    worst = variant["retained_drop_worst"]
    group = f" in {variant['retained_drop_worst_group']}" if worst is not None else ""
    return (f"{name}: erased accuracy after {_pct(variant['erased_accuracy_after'])}"
            f"{_interval(variant['erased_accuracy_after_ci95'], _pct)}; worst retained drop {_points(worst)} points{group}"
            f"{_interval(variant['retained_drop_worst_ci95'], _points)}")


def _fidelity_table(variants: dict[str, dict]) -> Table:
    """SSIM, PSNR and, where measured, the colour shift and CLIP scores of each edit, on erased and retained prompts."""
    first = next(iter(variants.values()))
    colour, clip = first["colour_fidelity"]["available"], first["clip_score"]["available"]
    columns = ["edit", "prompts", "SSIM", "PSNR dB"] + (["hue (deg)", "chroma"] if colour else []) + (["CLIP score"] if clip else [])
    rows = []
    for name, variant in variants.items():
        for prompts in ("erased", "retained"):
            fidelity = variant["fidelity"][prompts]
            row = [name, prompts, _number(fidelity["ssim"]), _number(fidelity["psnr"])]
            if colour:
                shift = variant["colour_fidelity"][prompts]
                row += [_points(shift["hue_shift_deg"]), _number(shift["chroma_shift"])]
            if clip:
                scores = variant["clip_score"]
                row.append(f"{_points(scores[f'{prompts}_before'])} -> {_points(scores[f'{prompts}_after'])}")
            rows.append(row)
    return _table("fidelity to the base image of the same seed", columns, rows)


# -- integrity ------------------------------------------------------------------------------


@app.command()
def verify(as_json: JsonOption = False) -> None:
    """Check every stored object's hash and every row's object; exit 1 on any problem."""
    with _workspace() as ws:
        problems = ws.verify()
    _emit(as_json, {"ok": not problems, "problems": [{"object": o, "problem": p} for o, p in problems]},
          lambda: out.print("store verified: no problems") if not problems else out.print(
              _table("problems", ["object", "problem"], [list(p) for p in problems])))
    if problems:
        raise typer.Exit(1)


@app.command()
def gc(yes: Annotated[bool, typer.Option("--yes", help="Delete (default: only list).")] = False, as_json: JsonOption = False) -> None:
    """List (or with --yes delete) stored objects that no registry row references."""
    with _workspace() as ws:
        objects = ws.gc(dry_run=not yes)
    verb = "deleted" if yes else "would delete"
    _emit(as_json, {"deleted": yes, "objects": objects}, lambda: out.print(f"{verb} {len(objects)} unreferenced objects"))


@app.command()
def log(limit: int = 20, as_json: JsonOption = False) -> None:
    """The registry's event log, newest first."""
    with _workspace() as ws:
        events = ws.events(limit)
    _emit(as_json, {"events": events}, lambda: out.print(_table(
        "events", ["at", "actor", "action", "subject"], [[f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.subject] for e in events])))


def main() -> None:
    """Console-script entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not ours
    app()
