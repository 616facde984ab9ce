"""On-disk formats of masks and activation statistics: tensors in, deterministic bytes out.

* Masks (:class:`~cpreg.editors.ConceptMask`) are Parquet files in long form, one row per
  masked weight: ``layer`` (dictionary-encoded string), ``index`` (int64 flat index into
  ``weight.view(-1)``, DELTA_BINARY_PACKED) and ``steps`` (uint8), zstd-compressed, rows sorted
  by ``(layer, index)``; the header is JSON under the file key-value metadata key ``cpreg``.
* Activation statistics (:class:`~cpreg.editors.ActivationStats`) are safetensors files with
  tensors ``target/<layer>`` and ``reference/<layer>`` of the header's ``config.stats_dtype``
  (fp32; fp16 when so calibrated; files without the field are fp32) and the header as JSON
  under the safetensors metadata key ``cpreg``.

Both writers are deterministic (same object -> same bytes, for a given pyarrow / safetensors
version): no timestamps, layers in sorted order, canonical JSON. Both readers validate everything
and raise :class:`~cpreg.artifacts.errors.ArtifactFormatError` (a ``ValueError``) on bad input.
Nothing is ever pickled. See ``docs/artifacts.md``.

Example:
    >>> data = mask_to_bytes(mask)
    >>> mask_from_bytes(data).equals(mask)
    True
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from ..editors import ActivationStats, CalibrationConfig, ConceptMask, LayerMask
from .errors import ArtifactFormatError

MASK_FORMAT = "cpreg.mask/1"
STATS_FORMAT = "cpreg.stats/1"
METADATA_KEY = "cpreg"

# Rows per Parquet row group; pinned so a change of pyarrow's default cannot change the bytes.
_ROW_GROUP_SIZE = 1 << 20

MASK_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("steps", pa.uint8(), nullable=False),
    ]
)

BytesLike = bytes | bytearray | memoryview


def _canonical_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactFormatError(f"{what} is not JSON-serialisable: {exc}") from exc


def _parse_header(raw: bytes | str | None, expected_format: str, what: str) -> dict:
    if raw is None:
        raise ArtifactFormatError(f"not a cpreg {what} file: no {METADATA_KEY!r} metadata")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactFormatError(f"the {METADATA_KEY!r} metadata of this {what} file is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtifactFormatError(f"the {METADATA_KEY!r} metadata of this {what} file is not a JSON object")
    version = header.get("format")
    if version != expected_format:
        raise ArtifactFormatError(
            f"unsupported {what} format version {version!r}: this cpreg reads {expected_format!r}"
        )
    return header


def _require(header: dict, key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in header:
        raise ArtifactFormatError(f"{what} metadata lacks the key {key!r}")
    value = header[key]
    # JSON true/false load as bool, an int subclass: never accept one where a number is meant.
    if not isinstance(value, types) or isinstance(value, bool):
        raise ArtifactFormatError(f"{what} metadata key {key!r} has the wrong type: {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def mask_to_bytes(mask: ConceptMask) -> bytes:
    """Serialise a mask to Parquet bytes (format ``cpreg.mask/1``); deterministic.

    Layers are written in sorted name order, so masks that are ``equals`` and have the same
    ``component_params`` and ``params`` give identical bytes whatever their dict order.
    """
    if not isinstance(mask, ConceptMask):
        raise TypeError(f"mask_to_bytes needs a ConceptMask, got {type(mask).__name__}")
    names = sorted(mask.layers)
    indices, steps, layers_meta = [], [], []
    for name in names:
        layer = mask.layers[name]
        if not isinstance(name, str) or not name:
            raise ArtifactFormatError(f"mask layer names must be non-empty strings, got {name!r}")
        shape = tuple(int(d) for d in layer.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ArtifactFormatError(f"layer {name!r} has an invalid shape {layer.shape!r}")
        idx = layer.indices.detach().cpu().numpy()
        stp = layer.skill_counts.detach().cpu().numpy()
        if idx.dtype != np.int64 or stp.dtype != np.uint8 or idx.shape != stp.shape or idx.ndim != 1:
            raise ArtifactFormatError(f"layer {name!r}: need 1-D int64 indices and uint8 steps of equal length")
        indices.append(idx)
        steps.append(stp)
        layers_meta.append({"name": name, "shape": list(shape), "count": int(idx.size)})
    header = {
        "format": MASK_FORMAT,
        "hook": mask.hook,
        "component": mask.component,
        "fingerprint": mask.fingerprint,
        "component_params": int(mask.component_params),
        "params": mask.params,
        "layers": layers_meta,
    }
    counts = np.array([m["count"] for m in layers_meta], dtype=np.int64)
    codes = np.repeat(np.arange(len(names), dtype=np.int32), counts)
    table = pa.Table.from_arrays(
        [
            pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(names, pa.string())),
            pa.array(np.concatenate(indices) if indices else np.zeros(0, np.int64), pa.int64()),
            pa.array(np.concatenate(steps) if steps else np.zeros(0, np.uint8), pa.uint8()),
        ],
        schema=MASK_SCHEMA.with_metadata({METADATA_KEY: _canonical_json(header, "mask header")}),
    )
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=_ROW_GROUP_SIZE,
        compression="zstd",
        use_dictionary=["layer", "steps"],
        column_encoding={"index": "DELTA_BINARY_PACKED"},
        data_page_version="1.0",
        write_statistics=True,
        sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1)],
    )
    return sink.getvalue().to_pybytes()


def _layer_ranks(column: pa.ChunkedArray, rank_of: dict[str, int]) -> np.ndarray:
    """Position (in the metadata's sorted layer list) of every row's layer; unknown layers raise."""
    if not pa.types.is_dictionary(column.type):
        column = column.cast(pa.string()).dictionary_encode()
    ranks = []
    for chunk in column.chunks:
        dictionary = chunk.dictionary.to_pylist()
        lookup = np.array([rank_of.get(name, -1) for name in dictionary] or [-1], dtype=np.int64)
        codes = chunk.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        chunk_ranks = lookup[codes]
        if (chunk_ranks < 0).any():
            code = int(codes[np.argmax(chunk_ranks < 0)])
            unknown = dictionary[code] if 0 <= code < len(dictionary) else f"<dictionary code {code}>"
            raise ArtifactFormatError(f"mask rows name an unknown layer {unknown!r} (not in the file's layer list)")
        ranks.append(chunk_ranks)
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def mask_from_bytes(data: BytesLike) -> ConceptMask:
    """Parse and validate Parquet bytes written by :func:`mask_to_bytes`."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(bytes(data)))
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactFormatError(f"not a Parquet mask file: {exc}") from exc
    kv = parquet.metadata.metadata or {}
    header = _parse_header(kv.get(METADATA_KEY.encode()), MASK_FORMAT, "mask")

    hook = _require(header, "hook", str, "mask")
    component = _require(header, "component", str, "mask")
    fingerprint = _require(header, "fingerprint", (str, type(None)), "mask")
    component_params = _require(header, "component_params", int, "mask")
    params = _require(header, "params", dict, "mask")
    layers_meta = _require(header, "layers", list, "mask")
    if component_params < 0:
        raise ArtifactFormatError(f"mask metadata: component_params must be >= 0, got {component_params}")

    names: list[str] = []
    shapes: list[tuple[int, int]] = []
    counts: list[int] = []
    for entry in layers_meta:
        if not isinstance(entry, dict):
            raise ArtifactFormatError(f"mask metadata: layer entry {entry!r} is not an object")
        name = _require(entry, "name", str, "mask layer")
        shape = _require(entry, "shape", list, f"mask layer {name!r}")
        count = _require(entry, "count", int, f"mask layer {name!r}")
        if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ArtifactFormatError(f"mask layer {name!r} has an invalid shape {shape!r}")
        if count < 0:
            raise ArtifactFormatError(f"mask layer {name!r} has a negative count {count}")
        names.append(name)
        shapes.append((shape[0], shape[1]))
        counts.append(count)
    if len(set(names)) != len(names):
        raise ArtifactFormatError("mask metadata lists a layer twice")
    if names != sorted(names):
        raise ArtifactFormatError("mask metadata layers are not in sorted order")

    schema = parquet.schema_arrow
    if sorted(schema.names) != ["index", "layer", "steps"]:
        raise ArtifactFormatError(f"mask columns must be layer, index, steps; got {schema.names}")
    layer_type = schema.field("layer").type
    if not (
        pa.types.is_string(layer_type)
        or pa.types.is_large_string(layer_type)
        or (pa.types.is_dictionary(layer_type) and pa.types.is_string(layer_type.value_type))
    ):
        raise ArtifactFormatError(f"mask column 'layer' must be strings, got {layer_type}")
    if schema.field("index").type != pa.int64():
        raise ArtifactFormatError(f"mask column 'index' must be int64, got {schema.field('index').type}")
    if schema.field("steps").type != pa.uint8():
        raise ArtifactFormatError(f"mask column 'steps' must be uint8, got {schema.field('steps').type}")

    try:
        table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactFormatError(f"cannot read the mask rows: {exc}") from exc
    for column in ("layer", "index", "steps"):
        if table.column(column).null_count:
            raise ArtifactFormatError(f"mask column {column!r} has null values")
    total = sum(counts)
    if table.num_rows != total:
        raise ArtifactFormatError(f"mask file has {table.num_rows} rows, its metadata counts {total}")

    ranks = _layer_ranks(table.column("layer"), {name: i for i, name in enumerate(names)})
    if ranks.size and (np.diff(ranks) < 0).any():
        raise ArtifactFormatError("mask rows are not sorted by layer")
    found = np.bincount(ranks, minlength=len(names)) if ranks.size else np.zeros(len(names), np.int64)
    for name, count, n in zip(names, counts, found):
        if int(n) != count:
            raise ArtifactFormatError(f"mask layer {name!r} has {int(n)} rows, its metadata counts {count}")

    all_indices = torch.from_numpy(table.column("index").to_numpy().copy())
    all_steps = torch.from_numpy(table.column("steps").to_numpy().copy())
    layers: dict[str, LayerMask] = {}
    start = 0
    for name, shape, count in zip(names, shapes, counts):
        indices, steps = all_indices[start : start + count].clone(), all_steps[start : start + count].clone()
        start += count
        size = shape[0] * shape[1]
        if count:
            if bool((indices[1:] <= indices[:-1]).any()):
                raise ArtifactFormatError(f"indices of mask layer {name!r} are not strictly increasing (unsorted or repeated)")
            if int(indices[0]) < 0 or int(indices[-1]) >= size:
                raise ArtifactFormatError(f"an index of mask layer {name!r} is outside [0, {size}) for shape {list(shape)}")
        layers[name] = LayerMask(shape, indices, steps)
    return ConceptMask(
        layers=layers,
        hook=hook,
        component=component,
        fingerprint=fingerprint,
        component_params=component_params,
        params=params,
    )


# --------------------------------------------------------------------------------------------
# Activation statistics
# --------------------------------------------------------------------------------------------


def _stats_tensor(tensor: Any, key: str, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ArtifactFormatError(f"statistics {key!r} is not a tensor")
    if tensor.dtype != dtype:
        name = str(dtype).removeprefix("torch.")
        raise ArtifactFormatError(f"statistics {key!r} must be {name} (the config's stats_dtype), got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[1] != in_features:
        raise ArtifactFormatError(f"statistics {key!r} must be [steps, {in_features}], got {list(tensor.shape)}")
    return tensor


def stats_to_bytes(stats: ActivationStats) -> bytes:
    """Serialise statistics to safetensors bytes (format ``cpreg.stats/1``); deterministic."""
    if not isinstance(stats, ActivationStats):
        raise TypeError(f"stats_to_bytes needs ActivationStats, got {type(stats).__name__}")
    header = stats.header()
    if "format" in header:
        raise ArtifactFormatError("the statistics header may not have a 'format' key")
    tensors: dict[str, torch.Tensor] = {}
    steps = None
    dtype = stats.config.stats_dtype.torch_dtype
    for name in sorted(stats.layer_shapes):
        in_features = int(stats.layer_shapes[name][1])
        for kind, values in (("target", stats.target), ("reference", stats.reference)):
            key = f"{kind}/{name}"
            tensor = _stats_tensor(values[name], key, in_features, dtype)
            if steps is None:
                steps = tensor.shape[0]
            elif tensor.shape[0] != steps:
                raise ArtifactFormatError(f"statistics {key!r} has {tensor.shape[0]} steps, others have {steps}")
            # A private, contiguous CPU copy: safetensors refuses views and shared storage.
            tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
    metadata = {METADATA_KEY: _canonical_json({"format": STATS_FORMAT, **header}, "statistics header")}
    return _st_save(tensors, metadata=metadata)


def _safetensors_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise ArtifactFormatError("not a safetensors statistics file: shorter than its 8-byte header length")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ArtifactFormatError("not a safetensors statistics file: header length exceeds the file")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactFormatError(f"not a safetensors statistics file: bad header JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ArtifactFormatError("not a safetensors statistics file: header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ArtifactFormatError("safetensors __metadata__ is not an object")
    return metadata


def _header_config(header: dict) -> CalibrationConfig:
    """The calibration configuration of a statistics header (missing fields take their defaults)."""
    config = _require(header, "config", dict, "statistics")
    try:
        return CalibrationConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise ArtifactFormatError(f"invalid statistics header: {exc}") from exc


def stats_from_bytes(data: BytesLike) -> ActivationStats:
    """Parse and validate safetensors bytes written by :func:`stats_to_bytes`."""
    data = bytes(data)
    header = _parse_header(_safetensors_metadata(data).get(METADATA_KEY), STATS_FORMAT, "statistics")
    layer_shapes = _require(header, "layer_shapes", dict, "statistics")
    dtype = _header_config(header).stats_dtype.torch_dtype
    try:
        tensors = _st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (not a ValueError)
        raise ArtifactFormatError(f"cannot read the statistics tensors: {exc}") from exc

    expected = {f"{kind}/{name}" for name in layer_shapes for kind in ("target", "reference")}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        details = [f"unexpected {extra}"] * bool(extra) + [f"missing {missing}"] * bool(missing)
        raise ArtifactFormatError(f"statistics tensors do not match the header layers: {', '.join(details)}")
    target, reference = {}, {}
    steps = None
    for name in sorted(layer_shapes):
        shape = layer_shapes[name]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ArtifactFormatError(f"statistics layer {name!r} has an invalid shape {shape!r}")
        for kind, out in (("target", target), ("reference", reference)):
            key = f"{kind}/{name}"
            tensor = _stats_tensor(tensors[key], key, shape[1], dtype)
            if steps is None:
                steps = tensor.shape[0]
            elif tensor.shape[0] != steps:
                raise ArtifactFormatError(f"statistics {key!r} has {tensor.shape[0]} steps, others have {steps}")
            out[name] = tensor
    header = {key: value for key, value in header.items() if key != "format"}
    try:
        return ActivationStats.from_header(header, target, reference)
    except KeyError as exc:
        raise ArtifactFormatError(f"statistics metadata lacks the key {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ArtifactFormatError(f"invalid statistics header: {exc}") from exc
