"""Artifact persistence: deterministic, validated file formats and a verified content-addressed store.

Tensors in, verified bytes out; nothing here knows about the registry. See ``docs/artifacts.md``.
"""

from ..lazy import lazy_exports
from .errors import ArtifactError, ArtifactFormatError, CorruptObjectError, MissingObjectError
from .store import ObjectStore, check_oid, sha256_hex

#: The file formats import torch: loaded on first use.
_FORMATS = {name: ".formats" for name in (
    "MASK_FORMAT", "STATS_FORMAT", "mask_from_bytes", "mask_to_bytes", "stats_from_bytes", "stats_to_bytes"
)}

__all__ = [
    "MASK_FORMAT",
    "STATS_FORMAT",
    "ArtifactError",
    "ArtifactFormatError",
    "CorruptObjectError",
    "MissingObjectError",
    "ObjectStore",
    "check_oid",
    "mask_from_bytes",
    "mask_to_bytes",
    "sha256_hex",
    "stats_from_bytes",
    "stats_to_bytes",
]
__getattr__ = lazy_exports(__name__, _FORMATS)
