"""Shared pieces of the benchmarks: models, prompts, timers, the bare loop and synthetic statistics.

Models are built from configs with random weights, so nothing is downloaded: ``tiny`` (the tiny
random SD pipeline of :mod:`cpreg.tiny`) or ``sd15`` (the Stable Diffusion 1.5 architecture:
UNet, CLIP ViT-L/14 text encoder, VAE; the tokenizer is the tiny offline one). Scheduler: DDIM,
so T steps are exactly T denoiser calls.

The scripts of this folder run as ``python benchmarks/NAME.py``, which puts this folder on
``sys.path``, so they import this module by name.

Example:
    >>> from benchmarking_utils import build, prompts, run_bare, timer
    >>> pipe = build("sd15", "cuda", torch.float16)
    >>> targets, references = prompts(20, 20)
    >>> seconds = []
    >>> with timer(seconds, "cuda"):
    ...     calls = run_bare(pipe, targets + references, CalibrationConfig(batch_size=8))
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch

from cpreg.editors import CalibrationConfig
from cpreg.editors.calibration import _pipeline_kwargs
from cpreg.editors.stats import ActivationStats

THINGS = ["dog", "cat", "house", "tree", "car", "church", "city street", "landscape", "man", "woman", "red circle", "blue square"]
STYLES = ["van gogh", "monet", "picasso"]

# SD 1.5 ff.net.2 layers: (path prefix, model width); in_features = 4 * width
SD15_FFN = (
    [(f"down_blocks.{b}.attentions.{a}", w) for b, w in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}", w) for b, w in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
)
#: ``{path: (out_features, in_features)}`` of the 16 SD 1.5 ``ff.net.2`` layers (49,561,600 weights).
SD15_FFN_SHAPES = {f"{prefix}.transformer_blocks.0.ff.net.2": (width, 4 * width) for prefix, width in SD15_FFN}
SD15_UNET_PARAMS = 859_520_964


def prompts(n_targets: int, n_references: int) -> tuple[list[str], list[str]]:
    """Style prompts (``a dog in the style of van gogh``...) and their reference photos."""
    targets = [f"a {THINGS[i % len(THINGS)]} in the style of {STYLES[i // len(THINGS) % len(STYLES)]}" for i in range(n_targets)]
    references = [f"a photo of a {THINGS[i % len(THINGS)]}" for i in range(n_references)]
    return targets, references


def build_sd15_unet():
    """SD 1.5's UNet (859.5M parameters) with random weights from the global RNG, from its config."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def build_sd15(device: str, dtype: torch.dtype, seed: int = 0):
    """SD 1.5's architecture with random weights, from configs only (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from cpreg.tiny import write_tiny_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tiny_tokenizer(folder)
    unet = build_sd15_unet()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=0,  # the tiny tokenizer's special tokens
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def build(model: str, device: str, dtype: torch.dtype):
    """``tiny`` or ``sd15`` on ``device`` in ``dtype``, in eval mode, progress bar off."""
    if model == "tiny":
        from cpreg.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline("sd").to(device=device, dtype=dtype)
    else:
        pipe = build_sd15(device, dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def machine(device: str) -> dict:
    """Where a benchmark runs: platform, CPUs, torch threads and version, the GPU if used."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
    }


def report(result: dict, path: str | None) -> None:
    """Print ``result`` as JSON on stdout and, given a ``path``, write it there too."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA only; a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def timer(result: list, device: str, cpu: list | None = None):
    """Append the wall time to ``result`` and, if given, this process's CPU time (all threads) to ``cpu``.

    The device is synchronised on entry and exit only, so nothing inside the block waits for it.
    """
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    yield
    sync(device)
    result.append(time.perf_counter() - start)
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)


def time_calls(function: Callable[[], object], repeats: int, device: str) -> list[float]:
    """Wall times of ``repeats`` calls of ``function``, each timed alone (warm up before)."""
    times: list[float] = []
    for _ in range(repeats):
        with timer(times, device):
            function()
    return times


def summary(times: Sequence[float]) -> dict:
    """``{"seconds": [...], "min_s": ..., "median_s": ...}`` of repeated timings."""
    return {"seconds": list(times), "min_s": min(times), "median_s": statistics.median(times)}


class _Stop(Exception):
    pass


def run_bare(pipe, items: Sequence[str], config: CalibrationConfig) -> int:
    """The engine's batches of ``items`` through the pipeline, stopped after tau denoiser calls, no layer hooks.

    The pipeline gets the arguments ``calibrate`` gives it, so this is the floor for ``calibrate``.
    Returns the number of denoiser calls made.
    """
    calls = [0]

    def stop(module, args, kwargs):
        if calls[0] == config.tau:
            raise _Stop
        calls[0] += 1

    handle = pipe.unet.register_forward_pre_hook(stop, with_kwargs=True)
    total = 0
    try:
        for start in range(0, len(items), config.batch_size):
            batch = list(items[start : start + config.batch_size])
            calls[0] = 0
            generators = [torch.Generator("cpu").manual_seed(config.seed) for _ in batch]
            try:
                pipe(prompt=batch, generator=generators, **_pipeline_kwargs(pipe, config))
            except _Stop:
                pass
            total += calls[0]
    finally:
        handle.remove()
    return total


def synthetic_layers(
    layer_shapes: Mapping[str, tuple[int, int]],
    tau: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    component_params: int = SD15_UNET_PARAMS,
) -> tuple[ActivationStats, dict[str, torch.Tensor]]:
    """Random weights ``[out, in]`` on ``device`` and random UNet statistics for ``layer_shapes``.

    With :data:`SD15_FFN_SHAPES`, tau 10 and skill_ratio 0.01, ``derive_mask`` masks 1,559,935 weights.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {name: (torch.randn(shape, generator=generator) / math.sqrt(shape[1])).to(device) for name, shape in layer_shapes.items()}
    stats = ActivationStats(
        target={name: torch.rand(tau, shape[1], generator=generator) * 100 for name, shape in layer_shapes.items()},
        reference={name: torch.rand(tau, shape[1], generator=generator) * 100 for name, shape in layer_shapes.items()},
        config=CalibrationConfig(num_inference_steps=50, tau=tau),
        component="unet",
        layer_shapes=dict(layer_shapes),
        num_target_prompts=1,
        num_reference_prompts=1,
        component_params=component_params,
    )
    return stats, weights


def sums(stats: ActivationStats) -> dict[str, dict[str, torch.Tensor]]:
    """``{"target": ..., "reference": ...}``: the sums of squares of ``stats``, as :func:`relative_difference` takes them."""
    return {"target": stats.target, "reference": stats.reference}


def relative_difference(ours: ActivationStats, theirs: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """How far the statistics ``ours`` are from ``theirs``, the exact ones (see :func:`sums`).

    ``elementwise``: the largest |ours - theirs| / |theirs| of any (set, layer, step, column);
    ``normwise``: the largest ||ours - theirs|| / ||theirs|| of any (set, layer, step) vector.
    Only the layers in ``theirs`` are compared.
    """
    elementwise = normwise = 0.0
    for kind, layers in theirs.items():
        for name, value in layers.items():
            exact = value.cpu().double()
            difference = getattr(ours, kind)[name].cpu().double() - exact
            elementwise = max(elementwise, float((difference.abs() / exact.abs().clamp_min(1e-30)).max()))
            normwise = max(normwise, float((difference.norm(dim=1) / exact.norm(dim=1).clamp_min(1e-30)).max()))
    return {"elementwise": elementwise, "normwise": normwise}
