"""Activation statistics gathered by calibration: the input of the stored result of ConceptPrune.

For a prompt set, step ``t`` and layer ``l``, the statistic is ``N[t, l, j] = sqrt(sum of x_j**2)``
over every L2-normalised input row ``x`` of the layer (all tokens of all batch rows, the
unconditional half of the guidance batch included). We keep the *sums of squares* (fp32 by
default, fp16 to reproduce the reference code's masks): they add across prompt shards and
processes, and ``target_norms()`` / ``reference_norms()`` give ``N``.

Example:
    >>> stats = calibrate(pipe, ["a naked man"], ["a man"], CalibrationConfig(tau=10))
    >>> stats.target_norms()["mid_block.attentions.0.transformer_blocks.0.ff.net.2"].shape
    torch.Size([10, 5120])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

import torch

from ..errors import InvalidArgumentError
from .options import HookPoint, NoiseMode, StatsDtype


@dataclass(frozen=True)
class CalibrationConfig:
    """Parameters of one calibration run (the paper's defaults).

    Args:
        hook: hook point whose layer inputs are recorded.
        num_inference_steps: T, the denoising steps of the scheduler.
        tau: statistics are kept for steps ``t < tau``; the loop stops after step ``tau - 1``.
        guidance_scale: classifier-free guidance scale.
        seed: every prompt starts from this seed's noise.
        batch_size: prompts per denoising call.
        height / width: image size; ``None`` uses the pipeline default.
        noise: where the seed's noise is drawn, see :class:`NoiseMode`.
        stats_dtype: accumulation and scoring dtype, see :class:`StatsDtype`.

    Example (the settings of the authors' published masks, on a GPU with the model in fp16):
        >>> CalibrationConfig(tau=10, noise="reference", stats_dtype="float16")
    """

    hook: HookPoint = HookPoint.FFN_OUT
    num_inference_steps: int = 50
    tau: int = 10
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    noise: NoiseMode = NoiseMode.CPU
    stats_dtype: StatsDtype = StatsDtype.FLOAT32

    def __post_init__(self) -> None:
        object.__setattr__(self, "hook", _member(HookPoint, self.hook, "hook"))
        object.__setattr__(self, "noise", _member(NoiseMode, self.noise, "noise"))
        object.__setattr__(self, "stats_dtype", _member(StatsDtype, self.stats_dtype, "stats_dtype"))
        if self.num_inference_steps < 1:
            raise InvalidArgumentError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 1 <= self.tau <= self.num_inference_steps:
            raise InvalidArgumentError(f"tau must be in [1, {self.num_inference_steps}] (T), got {self.tau}")
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise InvalidArgumentError(f"seed must be >= 0, got {self.seed}")

    @property
    def recorded_steps(self) -> int:
        """Steps with statistics: ``tau`` for denoiser hooks, 1 for the text encoder."""
        return self.tau if self.hook.uses_denoiser else 1

    def to_dict(self) -> dict:
        return {**asdict(self), "hook": self.hook.value, "noise": self.noise.value, "stats_dtype": self.stats_dtype.value}

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationConfig:
        """The inverse of :meth:`to_dict`; fields missing from ``data`` (records written before the
        field existed) take their defaults, so an old record reads back as ``cpu`` noise and fp32."""
        return cls(**data)


def _member(enum: type[Enum], value, field_name: str):
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise InvalidArgumentError(f"{field_name} must be one of {choices}, got {value!r}") from None


@dataclass
class ActivationStats:
    """Per-layer sums of squares of normalised inputs, for the target and the reference prompts.

    ``target[name]`` and ``reference[name]`` are tensors ``[steps, in_features]`` of
    ``config.stats_dtype`` (fp32 by default).
    ``header`` carries JSON-able provenance (hook point, component, configuration, fingerprint).
    """

    target: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    config: CalibrationConfig
    component: str
    layer_shapes: dict[str, tuple[int, int]]
    num_target_prompts: int
    num_reference_prompts: int
    fingerprint: str | None = None
    component_params: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target.keys() != self.reference.keys() or self.target.keys() != self.layer_shapes.keys():
            raise InvalidArgumentError("target, reference and layer_shapes must name the same layers")

    @property
    def recorded_steps(self) -> int:
        """Number of recorded steps: the calibrated tau (1 for the text encoder)."""
        return next(iter(self.target.values())).shape[0]

    def target_norms(self) -> dict[str, torch.Tensor]:
        """``N*[t, j]``: square roots of the target sums of squares."""
        return {name: value.sqrt() for name, value in self.target.items()}

    def reference_norms(self) -> dict[str, torch.Tensor]:
        """``N[t, j]``: square roots of the reference sums of squares."""
        return {name: value.sqrt() for name, value in self.reference.items()}

    def header(self) -> dict:
        """JSON-able description of these statistics (everything but the tensors)."""
        return {
            "config": self.config.to_dict(),
            "component": self.component,
            "layer_shapes": {name: list(shape) for name, shape in self.layer_shapes.items()},
            "num_target_prompts": self.num_target_prompts,
            "num_reference_prompts": self.num_reference_prompts,
            "fingerprint": self.fingerprint,
            "component_params": self.component_params,
            "extra": self.extra,
        }

    @classmethod
    def from_header(cls, header: dict, target: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> ActivationStats:
        return cls(
            target=target,
            reference=reference,
            config=CalibrationConfig.from_dict(header["config"]),
            component=header["component"],
            layer_shapes={name: tuple(shape) for name, shape in header["layer_shapes"].items()},
            num_target_prompts=header["num_target_prompts"],
            num_reference_prompts=header["num_reference_prompts"],
            fingerprint=header.get("fingerprint"),
            component_params=header.get("component_params", 0),
            extra=header.get("extra", {}),
        )
