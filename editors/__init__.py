"""ConceptPrune engine: calibrate, score, select and apply skilled-neuron masks.

Model in, tensors out; nothing here touches files or the registry.
"""

from .calibrate import calibrate
from .edit import (
    ActiveEdit,
    EditStackError,
    Fill,
    MaskEdit,
    MaskMismatchError,
    active_edits,
    apply_mask,
    check_mask_matches,
    restore_all,
    switch,
)
from .fingerprint import model_fingerprint
from .hooks import HookedLayers, HookPoint, component_module, denoiser_component, hooked_layers
from .mask import ConceptMask, LayerMask, check_compatible, overlap, union
from .select import derive_mask, skill_counts
from .stats import ActivationStats, CalibrationConfig

__all__ = [
    "ActivationStats",
    "ActiveEdit",
    "CalibrationConfig",
    "ConceptMask",
    "EditStackError",
    "Fill",
    "HookPoint",
    "HookedLayers",
    "LayerMask",
    "MaskEdit",
    "MaskMismatchError",
    "active_edits",
    "apply_mask",
    "calibrate",
    "check_compatible",
    "check_mask_matches",
    "component_module",
    "denoiser_component",
    "derive_mask",
    "hooked_layers",
    "model_fingerprint",
    "overlap",
    "restore_all",
    "skill_counts",
    "switch",
    "union",
]
