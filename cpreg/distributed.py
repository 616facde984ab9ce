"""Calibration over several processes / GPUs with ``torch.distributed``.

Launched by ``torchrun`` (or ``accelerate launch``), which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Each process loads the same base model,
calibrates its share of the prompt *pairs* (pair ``i`` goes to rank ``i % world_size``), and the
statistics are all-reduced: they are fp32 sums of squares (see :mod:`cpreg.editors.stats`), so
adding the shards gives the statistics of the whole prompt set, equal to a single-process run up
to float rounding. Every rank returns the full statistics; only rank 0 should write artifacts and
registry rows (:func:`is_main_process`, :func:`on_main_process`).

Backends: NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo on CPUs.

Example (one process per GPU)::

    torchrun --nproc-per-node 4 -m cpreg compute nudity --model stable-diffusion-v1-5/stable-diffusion-v1-5

Example (Python):
    >>> stats = distributed_calibrate(pipe, targets, references, CalibrationConfig(tau=10))
    >>> if is_main_process():
    ...     registry.add_calibration(stats, ...)
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from .editors import ActivationStats, CalibrationConfig, calibrate
from .errors import CalibrationError, InvalidArgumentError

T = TypeVar("T")

__all__ = [
    "distributed_calibrate",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "on_main_process",
    "rank",
    "shard_pairs",
    "world_size",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise InvalidArgumentError(f"${name} must be an integer, got {value!r}") from None


def world_size() -> int:
    """Number of processes: the process group's size, else ``$WORLD_SIZE``, else 1."""
    return dist.get_world_size() if is_distributed() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank: from the process group, else ``$RANK``, else 0."""
    return dist.get_rank() if is_distributed() else _env_int("RANK", 0)


def is_main_process() -> bool:
    """True on rank 0 (and in any single-process run): the one process that writes."""
    return rank() == 0


def init_distributed() -> bool:
    """Join the process group a launcher described in the environment; True when distributed.

    Does nothing when a group is already initialised (returns True) or when ``$WORLD_SIZE`` is
    unset or 1 (returns False). Otherwise initialises ``env://`` with NCCL when CUDA is
    available (after selecting ``cuda:$LOCAL_RANK``, so that ``"cuda"`` means this rank's GPU)
    or gloo on CPUs, and destroys the group at interpreter exit.
    """
    if is_distributed():
        return True
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    if not dist.is_available():  # pragma: no cover - builds without torch.distributed
        raise CalibrationError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def shard_pairs(
    targets: Sequence[str], references: Sequence[str], rank: int, world_size: int
) -> tuple[list[str], list[str]]:
    """The prompt pairs of ``rank``: pairs ``rank, rank + world_size, ...``.

    Raises:
        ValueError: the lists differ in length (they must pair up), or there are fewer pairs
            than processes (every rank needs at least one pair).
    """
    targets, references = list(targets), list(references)
    if len(targets) != len(references):
        raise InvalidArgumentError(
            f"distributed calibration shards prompt pairs: {len(targets)} target and "
            f"{len(references)} reference prompts do not pair up"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank {rank} is not in a world of {world_size} processes")
    if len(targets) < world_size:
        raise InvalidArgumentError(
            f"{len(targets)} prompt pair(s) cannot be shared by {world_size} processes: every rank "
            f"needs at least one pair; run with at most {len(targets)} processes"
        )
    return targets[rank::world_size], references[rank::world_size]


def _collective_device() -> torch.device:
    """Where tensors must be for the group's collectives: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_if_any_failed(error: BaseException | None) -> None:
    """Every rank learns whether any rank failed, so none is left waiting in a collective."""
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(index, report) for index, report in enumerate(reports) if report is not None]
    if error is not None:
        raise error
    if failed:
        index, report = failed[0]
        raise CalibrationError(f"distributed calibration failed on rank {index}: {report}")


def _check_same_everywhere(header: dict, advice: str) -> None:
    """Raise on every rank unless every rank passes an equal ``header``."""
    headers: list = [None] * dist.get_world_size()
    dist.all_gather_object(headers, header)
    for index, other in enumerate(headers):
        if other != headers[0]:
            differs = sorted(key for key in other if other[key] != headers[0].get(key))
            raise CalibrationError(
                f"rank {index} calibrated something else than rank 0 (different {', '.join(differs)}): {advice}"
            )


def _stats_header(stats: ActivationStats) -> dict:
    """What the models of all ranks must agree on for the sums to be addable."""
    return {
        "fingerprint": stats.fingerprint,
        "component": stats.component,
        "layers": {name: list(shape) for name, shape in stats.layer_shapes.items()},
        "steps": stats.recorded_steps,
    }


def distributed_calibrate(
    pipe,
    targets: Sequence[str],
    references: Sequence[str],
    config: CalibrationConfig = CalibrationConfig(),
    *,
    progress: bool = False,
) -> ActivationStats:
    """:func:`cpreg.editors.calibrate` over every process of the group; the full statistics on every rank.

    Without a process group (and ``$WORLD_SIZE`` unset or 1) this is plain ``calibrate``. With
    one (initialised here from the launcher's environment if needed, see
    :func:`init_distributed`), rank ``r`` calibrates pairs ``r, r + W, ...``, each layer's
    target and reference sums are all-reduced (SUM), and the prompt counts are those of the
    whole set. Every rank must pass the same prompts, configuration and base model (checked:
    a mismatch raises on every rank rather than producing wrong sums). A failure on one rank
    is raised on every rank. The progress bar, if asked for, shows on rank 0 only.

    Example:
        >>> stats = distributed_calibrate(pipe, ["a naked man", "a naked woman"], ["a man", "a woman"])
        >>> stats.num_target_prompts
        2
    """
    if not init_distributed():
        return calibrate(pipe, targets, references, config, progress=progress)
    size, me = dist.get_world_size(), dist.get_rank()
    targets, references = list(targets), list(references)
    my_targets, my_references = shard_pairs(targets, references, me, size)  # same outcome on every rank
    # Before hours of work: every rank must mean the same prompts and configuration.
    prompts = hashlib.sha256(json.dumps([targets, references], ensure_ascii=False).encode()).hexdigest()
    _check_same_everywhere(
        {"config": config.to_dict(), "prompts": prompts},
        "every rank must be given the same prompts and configuration",
    )

    error: BaseException | None = None
    stats = None
    try:
        stats = calibrate(pipe, my_targets, my_references, config, progress=progress and me == 0)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    _raise_if_any_failed(error)

    _check_same_everywhere(_stats_header(stats), "every rank must load the same base model")

    # One flat buffer per call: every layer's target then reference sums, in the (shared) layer order,
    # summed in fp32 and handed back in the statistics' own dtype (config.stats_dtype).
    names = list(stats.layer_shapes)
    parts = [stats.target[name] for name in names] + [stats.reference[name] for name in names]
    flat = torch.cat([part.reshape(-1) for part in parts]).to(torch.float32)
    device = _collective_device()
    buffer = flat.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    summed = buffer.cpu() if buffer.device != flat.device else buffer

    target, reference, offset = {}, {}, 0
    for index, part in enumerate(parts):
        value = summed[offset : offset + part.numel()].view(part.shape).to(part.dtype, copy=True)
        offset += part.numel()
        name = names[index % len(names)]
        (target if index < len(names) else reference)[name] = value
    return ActivationStats(
        target=target,
        reference=reference,
        config=stats.config,
        component=stats.component,
        layer_shapes=dict(stats.layer_shapes),
        num_target_prompts=len(targets),
        num_reference_prompts=len(references),
        fingerprint=stats.fingerprint,
        component_params=stats.component_params,
        extra=dict(stats.extra),
    )


def on_main_process(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its JSON-able result on every rank.

    The result travels as UTF-8 JSON in a uint8 tensor (nothing is pickled); if ``fn`` raises on
    rank 0, rank 0 re-raises it and the other ranks raise a RuntimeError with its message, so no
    rank waits forever. Without a process group ``fn()`` simply runs.

    Example:
        >>> version = on_main_process(lambda: registry.add_mask("nudity", concept_mask, model).version)
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return fn()
    message: dict = {}
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            message = {"ok": fn()}
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure, message = exc, {"error": f"{type(exc).__name__}: {exc}"}
    received = _broadcast_json(message)
    if failure is not None:
        raise failure
    if "error" in received:
        raise CalibrationError(f"rank 0 failed: {received['error']}")
    return received["ok"]


def _broadcast_json(value) -> dict:
    """Rank 0's JSON-able ``value`` on every rank, sent as bytes in tensors."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.cpu().tolist()).decode())
