"""Base models: resolve a model name to a loaded diffusers pipeline, offline-first.

A model is one of:
- a built-in tiny pipeline with random weights, built deterministically: ``tiny`` (SD
  architecture), ``tiny-sdxl``, ``tiny-sd3``; nothing is downloaded;
- the shipped demo model (``demo``: a small trained Stable Diffusion pipeline inside the package,
  see :mod:`cpreg.demo`) and ``demo-planted`` (the demo model with the planted concept
  ``zorblat``, see :mod:`cpreg.demo.plant`);
- a local folder written by ``save_pretrained``;
- a Hugging Face hub id, taken from the local cache first, downloaded only when allowed.

Weights are loaded with safetensors only (``use_safetensors=True``); pickled weights are refused.

Example:
    >>> pipe = load_base_pipeline("tiny")
    >>> pipe = load_base_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype="float16", device="cuda")
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CpregError, InvalidArgumentError

if TYPE_CHECKING:  # torch is imported by the functions that need it: listing models needs none
    import torch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3"}
#: Trained models shipped inside the package (``cpreg/demo``).
DEMO_MODELS = ("demo", "demo-planted")
#: Accepted dtype names and the ``torch`` dtype each means.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ModelUnavailableError(CpregError, ValueError):
    """The model cannot be loaded here (not built in, not a folder, not in the cache, offline)."""


def default_model() -> str:
    """``$CPREG_MODEL`` or Stable Diffusion 1.5."""
    return os.environ.get("CPREG_MODEL") or DEFAULT_MODEL


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The ``torch`` dtype named ``dtype`` (a key of :data:`DTYPES`), or ``dtype`` itself."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPES[dtype])
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16") from None


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, then ``cuda:N`` for each GPU, then ``mps``."""
    import torch

    devices = ["cpu", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def resolve_device(device: str | None) -> torch.device:
    """``auto`` / ``None`` picks CUDA, then MPS, then the CPU; a named device must exist here.

    Raises:
        InvalidArgumentError: an unknown device name, or one this machine does not have (naming those it has).
    """
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = available_devices()
    name = f"cuda:{resolved.index or 0}" if resolved.type == "cuda" else resolved.type
    if name not in available:
        raise InvalidArgumentError(f"device {device!r} is not available on this machine; available: {', '.join(available)}")
    return resolved


def architecture_of(pipe) -> str:
    """The pipeline class name, e.g. ``StableDiffusionPipeline``."""
    return type(pipe).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def load_base_pipeline(
    model: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = "cpu",
    revision: str | None = None,
    **from_pretrained_kwargs,
):
    """Load ``model`` (see the module docstring) in ``dtype`` on ``device``.

    Raises:
        ModelUnavailableError: with one message naming the choices (folder, cache, built-in).
    """
    import torch

    from .tiny import build_tiny_pipeline

    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if model in BUILTIN_MODELS:
        pipe = build_tiny_pipeline(BUILTIN_MODELS[model])
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    elif model in DEMO_MODELS:
        pipe = _load_demo(model, torch_dtype, from_pretrained_kwargs)
    else:
        pipe = _from_pretrained(model, revision, torch_dtype, from_pretrained_kwargs)
    return pipe.to(torch_device)


def _load_demo(model: str, torch_dtype: torch.dtype, kwargs: dict):
    from .demo import MODEL_DIR

    if not (MODEL_DIR / "model_index.json").is_file():
        raise ModelUnavailableError(
            f"the demo model is missing from this installation ({MODEL_DIR}); rebuild it with python -m cpreg.demo.train")
    pipe = _from_pretrained(str(MODEL_DIR), None, torch_dtype, kwargs)
    if model == "demo-planted":
        from .demo.plant import apply_planted

        apply_planted(pipe)
    return pipe


def _from_pretrained(model: str, revision: str | None, torch_dtype: torch.dtype, kwargs: dict):
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": torch_dtype, "use_safetensors": True, **kwargs}
    if Path(model).is_dir():
        return DiffusionPipeline.from_pretrained(model, **kwargs)
    if Path(model).exists() or model.startswith((".", "/")):
        raise ModelUnavailableError(f"model folder {model!r} does not exist or is not a folder")
    try:
        return DiffusionPipeline.from_pretrained(model, revision=revision, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        if _offline():
            raise _unavailable(model, cached_error) from None
    try:
        return DiffusionPipeline.from_pretrained(model, revision=revision, **kwargs)
    except (OSError, ValueError) as error:
        raise _unavailable(model, error) from None


def _unavailable(model: str, error: Exception) -> ModelUnavailableError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    known = [*BUILTIN_MODELS, *DEMO_MODELS]
    close = difflib.get_close_matches(model, known, n=1)
    if close:
        return ModelUnavailableError(f"model {model!r} is not available here; did you mean {close[0]!r}? "
                                     f"(built-in models: {', '.join(known)})")
    return ModelUnavailableError(
        f"model {model!r} is not available here ({reason}); pass --model with a local diffusers folder, "
        f"put the weights in the Hugging Face cache (hf download {model}), "
        f"or use a built-in model: {', '.join(known)}"
    )
