"""What callers of the registry see: plain, frozen dataclasses (never ORM rows).

Entities are snapshots: they stay valid after the registry is closed and never load anything
lazily. Times are timezone-aware UTC datetimes.

Example:
    >>> mask = reg.resolve_mask("nudity@prod")
    >>> mask.ref, mask.version, mask.masked_total, mask.aliases
    ('nudity@3', 3, 1003520, ('prod',))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class BaseModel:
    """A base model, identified by its weight fingerprint (``sha256:...``)."""

    id: int
    name: str
    fingerprint: str
    revision: str | None
    architecture: str | None
    created_at: datetime


@dataclass(frozen=True)
class Concept:
    """A concept to erase; ``kind`` is one of style, nudity, object, gender, memorization, custom.

    ``prompt_set_id``: its default prompts (custom concepts), else None.
    """

    id: int
    name: str
    kind: str
    description: str
    prompt_set_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class PromptSet:
    """Target and reference prompts of a calibration, identified by ``content_hash`` (sha256 hex)."""

    id: int
    content_hash: str
    targets: tuple[str, ...]
    references: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True)
class Calibration:
    """One calibration run: its settings, provenance, and the stored statistics (``stats_oid``)."""

    id: int
    base_model_id: int
    base_model_fingerprint: str
    prompt_set_id: int
    prompt_set_hash: str
    seed: int
    num_inference_steps: int
    guidance: float
    tau: int
    hook: str
    component: str
    config: dict[str, Any]
    dtype: str
    device: str
    library_versions: dict[str, Any]
    duration_s: float
    stats_oid: str
    dvc_stage: str | None
    git_rev: str | None
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class Mask:
    """One immutable version of a concept's mask on one base model (content in ``artifact_oid``).

    ``tags`` and ``aliases`` are the metadata current when the entity was read.
    """

    id: int
    concept: str
    version: int
    base_model_id: int
    base_model_fingerprint: str
    calibration_id: int | None
    hook: str
    component: str
    skill_ratio: float | None
    tau: int | None
    select_ratio: float | None
    artifact_oid: str
    masked_total: int
    masked_per_layer: dict[str, int]
    component_params: int
    params: dict[str, Any]
    description: str
    tags: tuple[str, ...]
    aliases: tuple[str, ...]
    dvc_stage: str | None
    git_rev: str | None
    created_at: datetime
    created_by: str

    @property
    def ref(self) -> str:
        """``concept@version``: the reference naming exactly this mask (given its base model)."""
        return f"{self.concept}@{self.version}"

    @property
    def fraction(self) -> float:
        """Masked weights over all weights of the component."""
        return self.masked_total / self.component_params if self.component_params else 0.0


@dataclass(frozen=True)
class Alias:
    """A movable name ``concept@name`` pointing at one mask version (per base model)."""

    id: int
    concept: str
    name: str
    base_model_fingerprint: str
    mask_id: int
    mask_version: int
    updated_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.concept}@{self.name}"


@dataclass(frozen=True)
class Release:
    """An immutable version of a named union of masks (content in ``union_oid``).

    ``members`` are the members' refs (``concept@version``), in the order given to compose.
    """

    id: int
    name: str
    version: int
    base_model_id: int
    base_model_fingerprint: str
    hook: str
    union_oid: str
    masked_total: int
    notes: str
    members: tuple[str, ...]
    member_ids: tuple[int, ...]
    created_at: datetime
    created_by: str
    dvc_stage: str | None = None
    git_rev: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Event:
    """One line of the audit log: who did what to which subject, with JSON details."""

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any] = field(default_factory=dict)
