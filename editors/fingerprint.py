"""Base-model fingerprint: which weights a mask was computed on.

The fingerprint is a sha256 over the names, shapes and weights of every layer that any hook
point can edit (denoiser FFN layers, cross-attention key/value, text-encoder MLP outputs).
Weights are hashed after rounding to float16, so fp32 and fp16 loads of one checkpoint agree;
a bf16 load rounds differently and gets its own fingerprint.

Example:
    >>> model_fingerprint(pipe)
    'sha256:3f1c...'
"""

from __future__ import annotations

import hashlib

import torch

from .hooks import HookPoint, hooked_layers


def model_fingerprint(pipe) -> str:
    """``sha256:<hex>`` over every hookable layer of ``pipe`` (see module docstring)."""
    digest = hashlib.sha256()
    for hook in HookPoint:
        try:
            layers = hooked_layers(pipe, hook)
        except ValueError:
            continue  # this architecture has no layers for that hook point
        for name in sorted(layers.modules):
            weight = layers.modules[name].weight.detach()
            digest.update(f"{layers.component}/{name}:{tuple(weight.shape)}\n".encode())
            digest.update(weight.to(torch.float16).cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"
