"""ConceptPrune engine: calibrate, score, select and apply skilled-neuron masks.

Model in, tensors out; nothing here touches files or the registry.
"""

from ..lazy import lazy_exports

#: Every public name and the submodule it lives in; importing the package imports none of them.
_EXPORTS = {
    "calibrate": ".calibration",
    "Fill": ".options",
    "ActiveEdit": ".edit",
    "EditStackError": ".edit",
    "MaskEdit": ".edit",
    "MaskMismatchError": ".edit",
    "active_edits": ".edit",
    "apply_mask": ".edit",
    "check_mask_matches": ".edit",
    "restore_all": ".edit",
    "switch": ".edit",
    "model_fingerprint": ".fingerprint",
    "HookPoint": ".options",
    "NoiseMode": ".options",
    "StatsDtype": ".options",
    "HookedLayers": ".hooks",
    "component_module": ".hooks",
    "denoiser_component": ".hooks",
    "hooked_layers": ".hooks",
    "ConceptMask": ".mask",
    "LayerMask": ".mask",
    "check_compatible": ".mask",
    "overlap": ".mask",
    "union": ".mask",
    "check_selection": ".select",
    "derive_mask": ".select",
    "skill_counts": ".select",
    "ActivationStats": ".stats",
    "CalibrationConfig": ".stats",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
