"""ConceptPrune engine: calibrate, score, select and apply skilled-neuron masks.

Model in, tensors out; nothing here touches files or the registry.
"""

from .calibrate import calibrate
from .edit import Fill, MaskEdit, MaskMismatchError, apply_mask, check_mask_matches
from .fingerprint import model_fingerprint
from .hooks import HookedLayers, HookPoint, component_module, denoiser_component, hooked_layers
from .mask import ConceptMask, LayerMask, check_compatible, overlap, union
from .select import derive_mask, skill_counts
from .stats import ActivationStats, CalibrationConfig, NoiseMode, StatsDtype

__all__ = [
    "ActivationStats",
    "CalibrationConfig",
    "ConceptMask",
    "Fill",
    "HookPoint",
    "HookedLayers",
    "LayerMask",
    "MaskEdit",
    "MaskMismatchError",
    "NoiseMode",
    "StatsDtype",
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
    "skill_counts",
    "union",
]
