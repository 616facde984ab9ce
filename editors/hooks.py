"""Hook points: which ``nn.Linear`` layers of a pipeline ConceptPrune scores and prunes.

Layers are always named by their full module path inside their pipeline component
(``down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``), never by position:
diffusers registers ``mid_block`` after ``up_blocks``, so module order is not execution order.

Example:
    >>> layers = hooked_layers(pipe, HookPoint.FFN_OUT)
    >>> layers.component, len(layers.modules)
    ('unet', 16)
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import InvalidArgumentError
from .options import HookPoint


@dataclass(frozen=True)
class HookedLayers:
    """The layers of one hook point: the pipeline component holding them and the modules by path."""

    hook: HookPoint
    component: str
    modules: dict[str, nn.Linear]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{path: (out_features, in_features)}`` of every hooked layer."""
        return {name: tuple(module.weight.shape) for name, module in self.modules.items()}


def denoiser_component(pipe) -> str:
    """Name of the pipeline attribute holding the denoiser: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise InvalidArgumentError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser")


def component_module(pipe, component: str) -> nn.Module:
    """The ``nn.Module`` stored on ``pipe`` under ``component`` (``unet``, ``text_encoder``...)."""
    module = getattr(pipe, component, None)
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"{type(pipe).__name__} has no `{component}` component")
    return module


def _linear_paths(root: nn.Module, hook: HookPoint) -> list[str]:
    paths = []
    for name, module in root.named_modules():
        if hook is HookPoint.FFN_OUT and isinstance(module, FeedForward):
            paths.append(f"{name}.net.2")
        elif hook is HookPoint.FFN_IN and isinstance(module, FeedForward):
            paths.append(f"{name}.net.0.proj")
        elif hook in (HookPoint.ATTN2_K, HookPoint.ATTN2_V):
            if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2":
                paths.append(f"{name}.to_k" if hook is HookPoint.ATTN2_K else f"{name}.to_v")
        elif hook is HookPoint.TEXT_MLP and name.endswith("mlp") and isinstance(getattr(module, "fc2", None), nn.Linear):
            paths.append(f"{name}.fc2")
    return paths


def hooked_layers(pipe, hook: HookPoint | str) -> HookedLayers:
    """Find the layers of ``hook`` in ``pipe``, keyed by full module path inside their component.

    Raises:
        ValueError: the hook point is unknown, or the pipeline has no such layers.
    """
    hook = HookPoint(hook)
    component = denoiser_component(pipe) if hook.uses_denoiser else "text_encoder"
    root = component_module(pipe, component)
    modules: dict[str, nn.Linear] = {}
    for path in _linear_paths(root, hook):
        module = root.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise InvalidArgumentError(f"hook {hook.value}: `{path}` is a {type(module).__name__}, not nn.Linear")
        modules[path] = module
    if not modules:
        hint = ""
        if hook in (HookPoint.ATTN2_K, HookPoint.ATTN2_V):
            hint = (
                ": it has no cross-attention (`attn2`) modules; joint-attention transformers such as SD3"
                " mix text and image tokens in one attention, so use ffn_out or ffn_in"
            )
        raise InvalidArgumentError(f"hook {hook.value} finds no layers in {type(root).__name__} (`{component}`){hint}")
    return HookedLayers(hook=hook, component=component, modules=modules)
