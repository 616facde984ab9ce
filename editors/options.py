"""The engine's named choices, importable without torch (the CLI builds its options from them).

Example:
    >>> from cpreg.editors.options import Fill, HookPoint
    >>> HookPoint("ffn_out").uses_denoiser, Fill("noise")
    (True, <Fill.NOISE: 'noise'>)
"""

from __future__ import annotations

from enum import Enum


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
