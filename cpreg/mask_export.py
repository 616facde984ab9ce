"""Write a mask as plain arrays other tools can read: ``.npz``, ``.safetensors`` or ``.parquet``.

- ``.npz``: one dense boolean array per masked Linear, keyed by its full module path;
- ``.safetensors``: the same keys, uint8 (1 = pruned);
- ``.parquet``: long form, one row per pruned weight: ``layer``, ``row``, ``col``, ``steps``.

Example:
    >>> write_mask_file(mask, "nudity.npz")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from .artifacts.atomic import atomic_path
from .editors import ConceptMask
from .errors import InvalidArgumentError

FORMATS = (".npz", ".safetensors", ".parquet")


def _write(mask: ConceptMask, suffix: str, path: Path) -> None:
    if suffix == ".npz":
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **{name: layer.dense().numpy() for name, layer in mask.layers.items()})
    elif suffix == ".safetensors":
        save_file({name: layer.dense().to(torch.uint8) for name, layer in mask.layers.items()}, str(path))
    else:
        names, rows, cols, steps = [], [], [], []
        for name, layer in mask.layers.items():
            row, col = layer.rows_cols()
            names += [name] * layer.count
            rows.append(row.numpy().astype(np.int32))
            cols.append(col.numpy().astype(np.int32))
            steps.append(layer.skill_counts.numpy())
        table = pa.table({
            "layer": pa.array(names, pa.string()).dictionary_encode(),
            "row": pa.array(np.concatenate(rows) if rows else [], pa.int32()),
            "col": pa.array(np.concatenate(cols) if cols else [], pa.int32()),
            "steps": pa.array(np.concatenate(steps) if steps else [], pa.uint8()),
        })
        pq.write_table(table, path, compression="zstd")


def write_mask_file(mask: ConceptMask, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``mask`` to ``out`` in the format its suffix names; the file appears complete or not at all."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgumentError(f"unknown mask file type {out.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{str(out)!r} exists; pass --force to overwrite it")
    with atomic_path(out) as temporary:
        _write(mask, suffix, temporary)
    return out
