"""Files of the reproducible pipeline (``dvc.yaml``): atomic outputs, release records, evaluation.

The pipeline's commands (``cpreg calibrate / mask / release / evaluate``) read and write plain
files; everything here is deterministic (same inputs, same bytes) so DVC sees unchanged outputs
when nothing changed. See ``docs/dvc.md``.

Example:
    >>> write_output("data/masks/nudity.parquet", data, suffixes=(".parquet",), force=True)
    >>> metrics, plots = evaluate_release(read_release_record("data/release/safe-v1.json"))
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .artifacts import mask_from_bytes, sha256_hex
from .artifacts.atomic import atomic_write
from .errors import InvalidArgumentError

#: Format tag of the release record written by ``cpreg release``.
RELEASE_RECORD_FORMAT = "cpreg.release-record/1"


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...], *, force: bool, what: str = "--out") -> Path:
    """Refuse a wrong suffix, a folder, or an existing file (unless ``force``) before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InvalidArgumentError(f"{what} must be a {' or '.join(suffixes)} file, got {str(path)!r}")
    if path.is_dir():
        raise InvalidArgumentError(f"{what} {str(path)!r} is a folder")
    if path.exists() and not force:
        raise InvalidArgumentError(f"{str(path)!r} exists; pass --force to overwrite it")
    return path


def write_output(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (the file appears complete or not at all)."""
    return atomic_write(path, data.encode("utf-8") if isinstance(data, str) else data)


def read_input(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of an input file, with a one-line error naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise InvalidArgumentError(f"{what} {str(path)!r} is a folder, not a file") from None
    except OSError as error:
        raise InvalidArgumentError(f"cannot read {what} {str(path)!r}: {error.strerror or error}") from None


def canonical_json(payload: dict) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def release_record(release, members, member_files: list[str], union_file: str, base_model) -> dict:
    """The JSON written next to a release's union: enough to evaluate or export it later."""
    return {
        "format": RELEASE_RECORD_FORMAT,
        "name": release.name,
        "ref": release.ref,
        "version": release.version,
        "union_oid": release.union_oid,
        "union_file": union_file,
        "masked_total": release.masked_total,
        "hook": release.hook,
        "base_model": {"name": base_model.name, "fingerprint": base_model.fingerprint},
        "members": [
            {"concept": mask.concept, "ref": mask.ref, "oid": mask.artifact_oid, "file": file,
             "skill_ratio": mask.skill_ratio, "tau": mask.tau, "select_ratio": mask.select_ratio}
            for mask, file in zip(members, member_files, strict=True)
        ],
    }


def read_release_record(path: str | os.PathLike) -> dict:
    """Parse and check a release record written by ``cpreg release``."""
    data = read_input(path, "release record")
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgumentError(f"release record {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(record, dict) or record.get("format") != RELEASE_RECORD_FORMAT:
        raise InvalidArgumentError(f"{str(path)!r} is not a release record written by `cpreg release`")
    members = record.get("members")
    if (
        not isinstance(record.get("ref"), str)
        or not isinstance(record.get("union_oid"), str)
        or not isinstance(record.get("union_file"), str)
        or not isinstance(members, list)
        or not members
        or not all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("concept", "oid", "file")) for m in members)
    ):
        raise InvalidArgumentError(f"release record {str(path)!r} lacks its ref, union or members")
    return record


def _load_checked(path: str, oid: str, what: str):
    data = read_input(path, what)
    if sha256_hex(data) != oid:
        raise InvalidArgumentError(f"{path} changed since the release was composed (rerun the release step)")
    try:
        return mask_from_bytes(data)
    except ValueError as error:
        raise InvalidArgumentError(f"{path}: {error}") from None


def evaluate_release(record: dict) -> tuple[dict, dict[str, str]]:
    """Metrics and per-layer density tables of a release and its members, from their files.

    Returns ``(metrics, plots)``: ``metrics`` holds the masked weights and fraction of the
    component for the release (``total``) and each member (``concepts``), and the per-layer
    density of the release (``density``); ``plots`` maps a file stem (each member concept and
    the release name) to CSV text with the columns ``layer,density,masked,weights,module``.
    Layers are named by :func:`short_layer_names` (``module`` is the full path).
    """
    union = _load_checked(record["union_file"], record["union_oid"], "release union")
    members = {m["concept"]: _load_checked(m["file"], m["oid"], "mask file") for m in record["members"]}

    def summary(mask) -> dict:
        return {"masked": mask.num_masked, "fraction": mask.fraction}

    short = short_layer_names(list(union.layers))
    metrics = {
        "total": summary(union),
        "concepts": {concept: summary(mask) for concept, mask in members.items()},
        "density": {short[name]: row["density"] for name, row in sorted(union.report()["layers"].items())},
    }
    plots = {concept: _density_csv(mask, short) for concept, mask in members.items()}
    plots[record.get("name") or "release"] = _density_csv(union, short)
    return metrics, plots


def short_layer_names(names: list[str]) -> dict[str, str]:
    """Layer paths without the trailing dotted parts they all share (``...transformer_blocks.0.ff.net.2``).

    ``down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2`` becomes ``down_blocks.0.attentions.0``
    when every hooked layer ends in ``transformer_blocks.0.ff.net.2``; names stay whole when
    shortening would make two of them equal or one empty.
    """
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({tuple(p[len(p) - common - 1:]) for p in parts}) == 1:
        common += 1
    short = {name: ".".join(p[: len(p) - common]) for name, p in zip(names, parts)}
    return short if len(set(short.values())) == len(short) else {name: name for name in names}


def _density_csv(mask, short: dict[str, str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "density", "masked", "weights", "module"])
    for name, row in sorted(mask.report()["layers"].items()):
        writer.writerow([short[name], repr(row["density"]), row["masked"], row["weights"], name])
    return out.getvalue()


#: The numbers of a ``cpreg eval`` report that the ``evaluate`` stage keeps as DVC metrics.
ERASURE_METRICS = (
    "erased_accuracy_before",
    "erased_accuracy_after",
    "retained_accuracy_before",
    "retained_accuracy_after",
    "retained_drop_worst",
    "masked_fraction",
)


def _interval_bounds(key: str, interval: list[float] | None) -> dict:
    low, high = interval or (None, None)
    return {f"{key}_ci95_low": low, f"{key}_ci95_high": high}


def erasure_metrics(report: dict) -> dict:
    """The DVC metrics of an erasure report (:func:`cpreg.evaluate.evaluate`): numbers only.

    Accuracies are ``None`` when no classifier measured them (``classifier_available`` is then
    0); ``proxy_*`` is the classifier-free change of the noise prediction, on any model. The headline
    pair comes with its bootstrap interval (``*_ci95_low`` / ``_high``; ``None`` with one seed), and
    ``retained_ssim`` / ``retained_psnr`` / ``retained_hue_shift_deg`` / ``retained_clip_score_after``
    are the classifier-free preservation of the retained prompts (``None`` where not measured).

    Example:
        >>> metrics = erasure_metrics(report)
        >>> metrics["retained_drop_worst"], metrics["retained_drop_worst_ci95_low"], metrics["retained_drop_worst_ci95_high"]
    """
    proxy = report["proxy"]
    available = proxy.get("available", True)
    return {
        **{key: report[key] for key in ERASURE_METRICS},
        **_interval_bounds("erased_accuracy_after", report["erased_accuracy_after_ci95"]),
        **_interval_bounds("retained_drop_worst", report["retained_drop_worst_ci95"]),
        "retained_ssim": report["fidelity"]["retained"]["ssim"],
        "retained_psnr": report["fidelity"]["retained"]["psnr"],
        "retained_hue_shift_deg": report["colour_fidelity"].get("retained", {}).get("hue_shift_deg"),
        "retained_clip_score_after": report["clip_score"].get("retained_after"),
        "classifier_available": int(bool((report["classifier"] or {}).get("available"))),
        "proxy_erased_change": proxy["erased_change"] if available else None,
        "proxy_retained_change": proxy["retained_change"] if available else None,
        "proxy_ratio": proxy["ratio"] if available else None,
        "samples": report["settings"]["samples"],
    }
