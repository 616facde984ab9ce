"""The model card (``README.md``) of an exported pipeline: what was erased, by which versions, how.

Example:
    >>> print(model_card(ws, ws.resolve("safe-v1")))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .editors.options import Fill
from .registry import Mask, Release

if TYPE_CHECKING:
    from .workspace import Workspace


def model_card(ws: Workspace, entity: Mask | Release, *, fill: Fill = Fill.ZERO) -> str:
    """README.md of an exported pipeline: erased concepts, versions, parameters, lineage."""
    members = ws.registry.release_members(entity) if isinstance(entity, Release) else [entity]
    base = ws.registry.get_base_model(entity.base_model_fingerprint)
    lines = [
        f"# {base.name} with {entity.ref} erased",
        "",
        "Edited with cpreg (ConceptPrune, [arXiv 2405.19237](https://arxiv.org/abs/2405.19237)): skilled neurons of the",
        f"`{entity.hook}` layers were {'zeroed' if fill is Fill.ZERO else 'overwritten with small Gaussian noise'}.",
        "",
        f"- base model: `{base.name}` (fingerprint `{base.fingerprint}`, architecture {base.architecture})",
        f"- {'release' if isinstance(entity, Release) else 'mask'}: `{entity.ref}`, {entity.masked_total:,} weights pruned",
        "",
        "| concept | mask | skill_ratio | tau | select_ratio | weights | calibration | created |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mask in members:
        lines.append(
            f"| {mask.concept} | {mask.ref} | {mask.skill_ratio} | {mask.tau} | {mask.select_ratio} | "
            f"{mask.masked_total:,} | #{mask.calibration_id} | {mask.created_at:%Y-%m-%d} by {mask.created_by} |"
        )
    if isinstance(entity, Release) and entity.notes:
        lines += ["", f"Notes: {entity.notes}"]
    return "\n".join(lines) + "\n"
