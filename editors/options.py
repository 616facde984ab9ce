"""The engine's named choices, importable without torch (the CLI builds its options from them).

Example:
    >>> from cpreg.editors.options import Fill, HookPoint
    >>> HookPoint("ffn_out").uses_denoiser, Fill("noise")
    (True, <Fill.NOISE: 'noise'>)
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class HookPoint(str, Enum):
    """Where statistics are gathered and weights pruned.

    - ``ffn_out``: the second FFN layer ``ff.net.2`` of every denoiser FeedForward (the default);
    - ``ffn_in``: the first FFN layer ``ff.net.0.proj``;
    - ``attn2_k`` / ``attn2_v``: the key / value projections of cross-attention;
    - ``text_mlp``: the MLP output layer ``mlp.fc2`` of the (first) CLIP text encoder.
    """

    FFN_OUT = "ffn_out"
    FFN_IN = "ffn_in"
    ATTN2_K = "attn2_k"
    ATTN2_V = "attn2_v"
    TEXT_MLP = "text_mlp"

    @property
    def uses_denoiser(self) -> bool:
        """True when the hooked layers live in the denoiser (statistics per denoising step)."""
        return self is not HookPoint.TEXT_MLP


class Fill(str, Enum):
    """What pruned weights become: ``zero`` (the paper) or small Gaussian ``noise``.

    Zeroed positions are visible in the weights, and their positions and signs let an attacker
    recover the erased concept (Roots Beneath the Cut, CVPR 2026); ``noise`` writes
    ``N(0, (noise_scale * std(W))**2)`` values instead, ``std(W)`` being the layer's weight std.
    """

    ZERO = "zero"
    NOISE = "noise"


class NoiseMode(str, Enum):
    """Where every prompt's initial noise comes from (both start every prompt from ``seed``'s noise).

    - ``cpu``: one CPU generator seeded with ``seed`` per batch row: the same noise on every
      device (the default);
    - ``reference``: the model device's global RNG, re-seeded with ``torch.manual_seed(seed)``
      before every batch, each row getting the draw the authors' reference code makes for one
      prompt: on a GPU the published masks' noise (``docs/method.md``, "Reproducing the published
      masks"). On the CPU both modes give the same noise.
    """

    CPU = "cpu"
    REFERENCE = "reference"


class StatsDtype(str, Enum):
    """Dtype in which statistics are accumulated, stored and scored.

    - ``float32``: the default;
    - ``float16``: as the reference code (rows normalised in fp16, running fp16 column norms
      ``c = sqrt(c² + n²)`` stored as ``c²``; Wanda scores, top-k and comparison in fp16), to
      reproduce the published masks.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.value)
