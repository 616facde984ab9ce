"""Calibration: run the pipeline's own denoising loop and record layer-input statistics.

Hooks are forward *pre*-hooks on the hooked ``nn.Linear`` layers, so the recorded input is the
tensor the layer really sees (the GEGLU output for ``ff.net.2``), never recomputed. Sums are
accumulated on the model's device (fp32, or fp16 as the reference code) with no host transfer
per call; the loop is stopped right before denoiser call ``tau`` and latents are never decoded.

Example:
    >>> from diffusers import StableDiffusionPipeline
    >>> pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> stats = calibrate(pipe, ["a photo of a naked man"], ["a photo of a man"], CalibrationConfig())
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ..errors import CalibrationError, InvalidArgumentError
from .fingerprint import model_fingerprint
from .hooks import HookedLayers, component_module, denoiser_component, hooked_layers
from .options import NoiseMode, StatsDtype
from .stats import ActivationStats, CalibrationConfig

TARGET, REFERENCE = 0, 1
_EPS_SQ = 1e-24  # squared-norm floor: an all-zero row contributes nothing instead of NaN


class _StopDenoising(Exception):
    """Raised by the denoiser pre-hook once the recorded steps are done."""


class _Recorder:
    """Per-layer fp32 sums ``[steps, 2, in_features]`` of squared, row-normalised inputs."""

    dtype = torch.float32

    def __init__(self, layers: HookedLayers, recorded_steps: int, device: torch.device) -> None:
        self.recorded_steps = recorded_steps
        self.totals = {
            name: torch.zeros(recorded_steps, 2, module.in_features, dtype=self.dtype, device=device)
            for name, module in layers.modules.items()
        }
        self.device = device
        self.step = 0
        self.calls = 0
        self.sets: list[int] = []
        self.row_sets = torch.zeros(0, dtype=torch.long, device=device)

    def start_batch(self, sets: Sequence[int]) -> None:
        self.sets = list(sets)
        self.row_sets = torch.tensor(self.sets, dtype=torch.long, device=self.device)
        self.step = 0
        self.calls = 0

    def _prompts(self, name: str, x: torch.Tensor) -> int:
        rows, prompts = x.shape[0], len(self.sets)
        if rows % prompts:
            raise CalibrationError(f"`{name}` got {rows} batch rows for {prompts} prompts")
        return prompts

    def record(self, name: str, x: torch.Tensor) -> None:
        rows, prompts = x.shape[0], self._prompts(name, x)
        # Guidance batches stack [unconditional rows, conditional rows]; both belong to the prompt.
        sets = self.row_sets.repeat(rows // prompts)
        squares = x.reshape(rows, -1, x.shape[-1]).to(torch.float32).square()
        inverse_norms = squares.sum(-1, keepdim=True).clamp_min_(_EPS_SQ).reciprocal_()
        per_row = torch.bmm(inverse_norms.transpose(1, 2), squares).squeeze(1)
        self.totals[name][self.step].index_add_(0, sets, per_row)

    def sums_of_squares(self) -> dict[str, torch.Tensor]:
        """The statistics ``[steps, 2, in_features]`` of every layer, on the CPU."""
        return {name: value.cpu() for name, value in self.totals.items()}

    def layer_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.record(name, args[0])

        return hook

    def denoiser_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.calls == self.recorded_steps:
            raise _StopDenoising
        self.step = self.calls
        self.calls += 1


class _HalfRecorder(_Recorder):
    """The reference code's fp16 arithmetic: running column norms ``c = sqrt(c² + n²)`` in fp16.

    Per set, step and layer, ``n`` is the fp16 column norm of one prompt's rows in one call
    (guidance copies and tokens together), each row L2-normalised in fp16 first (squares of raw
    activations overflow fp16); prompts are added one after the other, as the reference does, with
    its roundings (``c²``, ``n²``, their sum and the square root, each rounded to fp16). The sums
    of squares are ``c²`` in fp16: for every normal fp16 ``c``, ``sqrt(c²)`` rounds back to ``c``,
    so the norms that are scored are the reference's.
    """

    dtype = torch.float16

    def record(self, name: str, x: torch.Tensor) -> None:
        prompts = self._prompts(name, x)
        rows = F.normalize(x.to(torch.float16).reshape(x.shape[0] // prompts, prompts, -1, x.shape[-1]), dim=-1)
        norms = torch.linalg.vector_norm(rows, dim=(0, 2))  # [prompts, in_features]
        running = self.totals[name][self.step]
        for prompt, kind in enumerate(self.sets):
            running[kind] = (running[kind].square() + norms[prompt].square()).sqrt()

    def sums_of_squares(self) -> dict[str, torch.Tensor]:
        return {name: value.square().cpu() for name, value in self.totals.items()}


def _check_prompts(kind: str, prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise InvalidArgumentError(f"no {kind} prompts")
    for prompt in prompts:
        if not isinstance(prompt, str):  # "" is allowed: the empty prompt is the memorisation reference
            raise InvalidArgumentError(f"{kind} prompts must be strings, got {prompt!r}")
    return prompts


def _pipeline_kwargs(pipe, config: CalibrationConfig) -> dict:
    wanted = {
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "output_type": "latent",  # no VAE decode, no safety checker
        "height": config.height,
        "width": config.width,
        "clean_caption": False,
    }
    accepted = inspect.signature(pipe.__call__).parameters
    return {key: value for key, value in wanted.items() if key in accepted and value is not None}


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    return Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps x batches"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays clean for --json
        transient=True,
    )


def calibrate(
    pipe,
    target_prompts: Sequence[str],
    reference_prompts: Sequence[str],
    config: CalibrationConfig = CalibrationConfig(),
    *,
    progress: bool = False,
) -> ActivationStats:
    """Record ConceptPrune statistics of ``pipe`` for target (concept) and reference prompts.

    Every prompt starts from the noise of ``config.seed`` (``config.noise``: one seeded CPU
    generator per batch row, or the draw the reference code makes from the model device's global
    RNG), so batching changes results only by float rounding. Sums are kept in
    ``config.stats_dtype``. For ``text_mlp`` the text encoder runs once per prompt and a single
    "step" is recorded.

    ``noise="reference"`` re-seeds the global RNG (``torch.manual_seed``) before every batch, as
    the reference code does before every prompt; with a stochastic scheduler (ancestral
    samplers) only ``batch_size=1`` then follows the reference's RNG stream past the first draw.

    Returns:
        ActivationStats with ``config.recorded_steps`` steps per layer.
    """
    targets = _check_prompts("target", target_prompts)
    references = _check_prompts("reference", reference_prompts)
    layers = hooked_layers(pipe, config.hook)
    root = component_module(pipe, layers.component)
    device = next(root.parameters()).device
    recorder_class = _HalfRecorder if config.stats_dtype is StatsDtype.FLOAT16 else _Recorder
    recorder = recorder_class(layers, config.recorded_steps, device)
    items = [(prompt, TARGET) for prompt in targets] + [(prompt, REFERENCE) for prompt in references]
    batches = [items[i : i + config.batch_size] for i in range(0, len(items), config.batch_size)]
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    with ExitStack() as stack:
        for name, module in layers.modules.items():
            stack.callback(module.register_forward_pre_hook(recorder.layer_hook(name)).remove)
        bar = stack.enter_context(_progress(progress))
        task = bar.add_task("calibrate", total=len(batches) * config.recorded_steps) if bar else None
        if config.hook.uses_denoiser:
            stack.callback(root.register_forward_pre_hook(recorder.denoiser_hook, with_kwargs=True).remove)
            if bar is not None:
                stack.callback(root.register_forward_hook(lambda *_: bar.advance(task)).remove)
        for batch in batches:
            prompts = [prompt for prompt, _ in batch]
            recorder.start_batch([kind for _, kind in batch])
            if config.hook.uses_denoiser:
                _denoise(pipe, prompts, config, recorder)
            else:
                _encode(pipe, prompts, device)
                if bar is not None:
                    bar.advance(task)

    sums = recorder.sums_of_squares()
    return ActivationStats(
        target={name: value[:, TARGET].contiguous() for name, value in sums.items()},
        reference={name: value[:, REFERENCE].contiguous() for name, value in sums.items()},
        config=config,
        component=layers.component,
        layer_shapes=layers.shapes(),
        num_target_prompts=len(targets),
        num_reference_prompts=len(references),
        fingerprint=model_fingerprint(pipe),
        component_params=sum(p.numel() for p in root.parameters()),
    )


def _denoise(pipe, prompts: list[str], config: CalibrationConfig, recorder: _Recorder) -> None:
    try:
        pipe(prompt=prompts, **_initial_noise(pipe, len(prompts), config), **_pipeline_kwargs(pipe, config))
    except _StopDenoising:
        return
    if recorder.calls < recorder.recorded_steps:
        raise CalibrationError(f"the pipeline made {recorder.calls} denoiser calls, fewer than tau={recorder.recorded_steps}")


def _initial_noise(pipe, prompts: int, config: CalibrationConfig) -> dict:
    """The pipeline-call argument that starts each of ``prompts`` rows from ``config.seed``'s noise."""
    if config.noise is NoiseMode.CPU:
        return {"generator": [torch.Generator("cpu").manual_seed(config.seed) for _ in range(prompts)]}
    return {"latents": _reference_latents(pipe, prompts, config)}


def _reference_latents(pipe, prompts: int, config: CalibrationConfig) -> torch.Tensor:
    """Initial latents of a batch of ``prompts`` rows, each the one the reference code gives a prompt.

    The reference calls ``torch.manual_seed(seed)`` before every prompt and passes no generator,
    so the pipeline draws ``randn_tensor(shape, generator=None, device, dtype)`` for one prompt
    from the global RNG of its execution device (the GPU's on a GPU). This makes that same draw
    after the same seeding and repeats it for every row; the global RNG is left as the reference's
    pipeline call leaves it after its draw. Latents have the layout of Stable Diffusion-style
    pipelines (SD 1.x/2.x, SDXL, SD3): ``[1, in_channels, height / f, width / f]``, ``f`` the VAE
    scale factor, drawn in the denoiser's dtype: ``[prompts, 4, 64, 64]`` for SD 1.5 at 512x512.
    """
    denoiser = component_module(pipe, denoiser_component(pipe))
    factor = pipe.vae_scale_factor
    sample_size = denoiser.config.sample_size
    default_height, default_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    height = config.height or default_height * factor
    width = config.width or default_width * factor
    shape = (1, denoiser.config.in_channels, height // factor, width // factor)
    torch.manual_seed(config.seed)
    latents = randn_tensor(shape, generator=None, device=pipe._execution_device, dtype=denoiser.dtype)
    return latents.repeat(prompts, 1, 1, 1)


@torch.inference_mode()
def _encode(pipe, prompts: list[str], device: torch.device) -> None:
    tokenizer = pipe.tokenizer
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    pipe.text_encoder(tokens.input_ids.to(device))
