"""Mask (Parquet) and statistics (safetensors) formats: exact, deterministic, compact, strict."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cpreg.artifacts import (
    MASK_FORMAT,
    STATS_FORMAT,
    ArtifactError,
    ArtifactFormatError,
    mask_from_bytes,
    mask_to_bytes,
    sha256_hex,
    stats_from_bytes,
    stats_to_bytes,
)
from cpreg.editors import ActivationStats, CalibrationConfig, ConceptMask, LayerMask, union

# ---------------------------------------------------------------------------------- helpers


def random_layer(shape, density, generator, max_steps=10) -> LayerMask:
    size = shape[0] * shape[1]
    indices = torch.nonzero(torch.rand(size, generator=generator) < density).squeeze(1)
    steps = torch.randint(1, max_steps + 1, (len(indices),), generator=generator, dtype=torch.uint8)
    return LayerMask(tuple(shape), indices, steps)


def empty_layer(shape) -> LayerMask:
    return LayerMask(tuple(shape), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.uint8))


def random_mask(seed=0, density=0.05, empty=("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",)) -> ConceptMask:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (32, 128),
        "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2": (64, 256),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (128, 512),
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": (64, 256),
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": (7, 3),
    }
    layers = {name: empty_layer(shape) if name in empty else random_layer(shape, density, g) for name, shape in shapes.items()}
    return ConceptMask(
        layers=layers,
        hook="ffn_out",
        component="unet",
        fingerprint="sha256:" + "ab" * 32,
        component_params=859_520_964,
        params={"skill_ratio": 0.01, "tau": 10, "select_ratio": 0.0, "note": "é ✓"},
    )


def sd15_mask(seed=0) -> ConceptMask:
    """16 FFN-out layers of SD1.5's UNet, ~2% of each masked at random positions (~1M weights)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6
    layers = {f"layer.{i:02d}.ff.net.2": random_layer(shape, 0.02, g) for i, shape in enumerate(shapes)}
    return ConceptMask(layers, "ffn_out", "unet", "fp", 859_520_964, {"skill_ratio": 0.01, "tau": 10})


def write_parquet(table: pa.Table, header: dict | None, **kwargs) -> bytes:
    if header is not None:
        table = table.replace_schema_metadata({"cpreg": json.dumps(header)})
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def tiny_header(**overrides) -> dict:
    header = {
        "format": MASK_FORMAT,
        "hook": "ffn_out",
        "component": "unet",
        "fingerprint": None,
        "component_params": 100,
        "params": {},
        "layers": [{"name": "a", "shape": [2, 3], "count": 2}, {"name": "b", "shape": [4, 4], "count": 1}],
    }
    header.update(overrides)
    return header


def tiny_table(layer=("a", "a", "b"), index=(0, 5, 15), steps=(1, 2, 3)) -> pa.Table:
    return pa.table(
        {
            "layer": pa.array(list(layer), pa.string()).dictionary_encode(),
            "index": pa.array(list(index), pa.int64()),
            "steps": pa.array(list(steps), pa.uint8()),
        }
    )


def random_stats(seed=0, steps=4) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    shapes = {"mid.ff": (16, 64), "down.ff": (8, 32), "up.ff": (8, 32)}
    return ActivationStats(
        target={n: torch.rand(steps, s[1], generator=g) * 100 for n, s in shapes.items()},
        reference={n: torch.rand(steps, s[1], generator=g) for n, s in shapes.items()},
        config=CalibrationConfig(tau=steps, num_inference_steps=20, seed=3, height=64, width=64),
        component="unet",
        layer_shapes=shapes,
        num_target_prompts=5,
        num_reference_prompts=7,
        fingerprint="fp-1",
        component_params=12345,
        extra={"prompts": ["a naked man", "ünïcode"], "ratio": 0.1},
    )


def assert_stats_equal(a: ActivationStats, b: ActivationStats) -> None:
    assert a.header() == b.header()
    assert a.target.keys() == b.target.keys() == a.reference.keys() == b.reference.keys()
    for name in a.target:
        assert torch.equal(a.target[name], b.target[name]) and b.target[name].dtype == torch.float32
        assert torch.equal(a.reference[name], b.reference[name])


# ---------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("seed", range(4))
def test_mask_round_trip_is_exact(seed):
    mask = random_mask(seed, density=[0.0, 0.01, 0.3, 1.0][seed])
    back = mask_from_bytes(mask_to_bytes(mask))
    assert back.equals(mask)
    assert back.num_masked == mask.num_masked
    assert back.component_params == mask.component_params
    assert back.params == mask.params
    assert back.layer_shapes() == mask.layer_shapes()
    for name, layer in mask.layers.items():
        assert back.layers[name].equals(layer)
        assert back.layers[name].indices.dtype == torch.int64 and back.layers[name].skill_counts.dtype == torch.uint8


def test_mask_round_trip_keeps_empty_layers_and_empty_masks():
    mask = random_mask(1)
    empty = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    back = mask_from_bytes(mask_to_bytes(mask))
    assert back.layers[empty].count == 0 and back.layers[empty].shape == (64, 256)

    nothing = ConceptMask({"x": empty_layer((3, 4)), "y": empty_layer((1, 1))}, "attn_out", "text_encoder", None, 0)
    back = mask_from_bytes(mask_to_bytes(nothing))
    assert back.equals(nothing) and back.fingerprint is None and back.num_masked == 0

    no_layers = ConceptMask({}, "ffn_out", "unet", None, 0)
    assert mask_from_bytes(mask_to_bytes(no_layers)).equals(no_layers)


def test_mask_bytes_are_deterministic():
    mask = random_mask(2)
    first = mask_to_bytes(mask)
    assert mask_to_bytes(mask) == first
    assert mask_to_bytes(mask_from_bytes(first)) == first
    # Same content, other dict orders (layers and params): same bytes, same content id.
    shuffled = list(mask.layers.items())
    random.Random(0).shuffle(shuffled)
    reordered = ConceptMask(
        dict(shuffled), mask.hook, mask.component, mask.fingerprint, mask.component_params, dict(reversed(mask.params.items()))
    )
    assert sha256_hex(mask_to_bytes(reordered)) == sha256_hex(first)


def test_union_in_any_order_gives_the_same_bytes():
    masks = [random_mask(seed, density=0.05) for seed in range(3)]
    orders = [[0, 1, 2], [2, 0, 1], [1, 2, 0]]
    blobs = {mask_to_bytes(union([masks[i] for i in order])) for order in orders}
    assert len(blobs) == 1
    assert mask_from_bytes(blobs.pop()).equals(union(masks))


def test_mask_parquet_is_plain_and_documented():
    mask = random_mask(3)
    data = mask_to_bytes(mask)
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names == ["layer", "index", "steps"]
    assert pa.types.is_dictionary(table.schema.field("layer").type)
    assert table.schema.field("index").type == pa.int64()
    assert table.schema.field("steps").type == pa.uint8()
    assert table.num_rows == mask.num_masked

    rows = list(zip(table.column("layer").to_pylist(), table.column("index").to_pylist()))
    assert rows == sorted(rows)  # sorted by (layer, index)
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    layer = table.filter(pa.compute.equal(table.column("layer").cast(pa.string()), name))
    assert layer.column("index").to_pylist() == mask.layers[name].indices.tolist()
    assert layer.column("steps").to_pylist() == mask.layers[name].skill_counts.tolist()

    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    header = json.loads(meta.metadata[b"cpreg"])
    assert header["format"] == "cpreg.mask/1"
    assert {"hook", "component", "fingerprint", "component_params", "params", "layers"} <= header.keys()
    assert {entry["name"]: tuple(entry["shape"]) for entry in header["layers"]} == mask.layer_shapes()
    column = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(3)}
    assert "DELTA_BINARY_PACKED" in column["index"].encodings
    assert "RLE_DICTIONARY" in column["layer"].encodings
    assert all(c.compression == "ZSTD" for c in column.values())


def test_sd15_sized_mask_takes_at_most_two_bytes_per_masked_weight(capsys):
    mask = sd15_mask()
    assert 900_000 < mask.num_masked < 1_100_000
    data = mask_to_bytes(mask)
    per_weight = len(data) / mask.num_masked
    with capsys.disabled():
        print(f"\nSD1.5-sized mask: {mask.num_masked} masked weights, {len(data)} bytes, {per_weight:.3f} B/weight")
    assert per_weight <= 2.0
    assert mask_from_bytes(data).equals(mask)


# Bad mask files: each must raise ArtifactFormatError (a ValueError) with a telling message.
BAD_MASKS = {
    "not parquet": (lambda: b"PAR1 this is not parquet", "not a Parquet"),
    "empty bytes": (lambda: b"", "not a Parquet"),
    "no metadata": (lambda: write_parquet(tiny_table(), None), "no 'cpreg' metadata"),
    "metadata not json": (
        lambda: pq_bytes_with_raw_metadata(b"{not json"),
        "not valid JSON",
    ),
    "unknown version": (lambda: write_parquet(tiny_table(), tiny_header(format="cpreg.mask/2")), "cpreg.mask/2"),
    "stats version": (lambda: write_parquet(tiny_table(), tiny_header(format=STATS_FORMAT)), "unsupported mask format"),
    "no version": (lambda: write_parquet(tiny_table(), {k: v for k, v in tiny_header().items() if k != "format"}), "None"),
    "missing hook": (lambda: write_parquet(tiny_table(), {k: v for k, v in tiny_header().items() if k != "hook"}), "'hook'"),
    "missing layers": (lambda: write_parquet(tiny_table(), {k: v for k, v in tiny_header().items() if k != "layers"}), "'layers'"),
    "bad params type": (lambda: write_parquet(tiny_table(), tiny_header(params=[1])), "'params'"),
    "bool component_params": (lambda: write_parquet(tiny_table(), tiny_header(component_params=True)), "component_params"),
    "bad shape": (
        lambda: write_parquet(tiny_table(), tiny_header(layers=[{"name": "a", "shape": [2], "count": 2}, {"name": "b", "shape": [4, 4], "count": 1}])),
        "invalid shape",
    ),
    "duplicate layer": (
        lambda: write_parquet(
            tiny_table(layer=("a", "a", "a")),
            tiny_header(layers=[{"name": "a", "shape": [2, 3], "count": 2}, {"name": "a", "shape": [2, 3], "count": 1}]),
        ),
        "twice",
    ),
    "unknown layer": (lambda: write_parquet(tiny_table(layer=("a", "a", "zz")), tiny_header()), "unknown layer 'zz'"),
    "index out of range": (lambda: write_parquet(tiny_table(index=(0, 6, 15)), tiny_header()), "outside [0, 6)"),
    "negative index": (lambda: write_parquet(tiny_table(index=(-1, 5, 15)), tiny_header()), "outside"),
    "unsorted indices": (lambda: write_parquet(tiny_table(index=(5, 0, 15)), tiny_header()), "not strictly increasing"),
    "repeated index": (lambda: write_parquet(tiny_table(index=(5, 5, 15)), tiny_header()), "not strictly increasing"),
    "rows not grouped by layer": (
        lambda: write_parquet(tiny_table(layer=("a", "b", "a"), index=(0, 15, 5)), tiny_header()),
        "not sorted by layer",
    ),
    "count mismatch": (lambda: write_parquet(tiny_table(layer=("a", "b", "b"), index=(0, 5, 15)), tiny_header()), "has 1 rows"),
    "row total mismatch": (lambda: write_parquet(tiny_table(layer=("a", "a"), index=(0, 1), steps=(1, 1)), tiny_header()), "rows"),
    "index not int64": (
        lambda: write_parquet(tiny_table().set_column(1, "index", pa.array([0, 5, 15], pa.int32())), tiny_header()),
        "'index' must be int64",
    ),
    "steps not uint8": (
        lambda: write_parquet(tiny_table().set_column(2, "steps", pa.array([1, 2, 3], pa.int16())), tiny_header()),
        "'steps' must be uint8",
    ),
    "missing column": (lambda: write_parquet(tiny_table().drop_columns(["steps"]), tiny_header()), "columns"),
    "null steps": (
        lambda: write_parquet(tiny_table().set_column(2, "steps", pa.array([1, None, 3], pa.uint8())), tiny_header()),
        "null",
    ),
}


def pq_bytes_with_raw_metadata(raw: bytes) -> bytes:
    sink = io.BytesIO()
    pq.write_table(tiny_table().replace_schema_metadata({b"cpreg": raw}), sink)
    return sink.getvalue()


def test_tiny_valid_file_from_plain_pyarrow_is_accepted():
    # A file written by plain pyarrow (no special encodings, plain string layer) is fine too.
    plain = tiny_table().set_column(0, "layer", pa.array(["a", "a", "b"], pa.string()))
    mask = mask_from_bytes(write_parquet(plain, tiny_header()))
    assert mask.layers["a"].indices.tolist() == [0, 5] and mask.layers["b"].skill_counts.tolist() == [3]
    assert mask.layers["a"].shape == (2, 3)


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_bad_mask_files_are_rejected(case):
    make, message = BAD_MASKS[case]
    data = make()
    with pytest.raises(ArtifactFormatError) as info:
        mask_from_bytes(data)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ArtifactError)
    assert message in str(info.value), str(info.value)


def test_truncated_mask_is_rejected():
    data = mask_to_bytes(random_mask(0))
    for cut in (len(data) // 2, len(data) - 1, 10):
        with pytest.raises(ArtifactFormatError):
            mask_from_bytes(data[:cut])


def test_mask_writer_rejects_what_it_cannot_store():
    mask = random_mask(0)
    with pytest.raises(TypeError):
        mask_to_bytes("not a mask")
    bad = ConceptMask(mask.layers, mask.hook, mask.component, mask.fingerprint, 1, {"x": object()})
    with pytest.raises(ArtifactFormatError, match="JSON"):
        mask_to_bytes(bad)
    nan = ConceptMask(mask.layers, mask.hook, mask.component, mask.fingerprint, 1, {"x": float("nan")})
    with pytest.raises(ArtifactFormatError, match="JSON"):
        mask_to_bytes(nan)


# ---------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("seed", range(3))
def test_stats_round_trip_is_exact(seed):
    stats = random_stats(seed, steps=[1, 4, 10][seed])
    back = stats_from_bytes(stats_to_bytes(stats))
    assert_stats_equal(stats, back)
    assert back.config == stats.config and back.recorded_steps == stats.recorded_steps
    assert back.layer_shapes == stats.layer_shapes


def test_float16_stats_round_trip_and_old_files_read_as_float32():
    fp32 = random_stats(0)
    config = CalibrationConfig(**{**fp32.config.to_dict(), "noise": "reference", "stats_dtype": "float16"})
    fp16 = ActivationStats(**{**vars(fp32), "config": config,
                              "target": {n: v.half() for n, v in fp32.target.items()},
                              "reference": {n: v.half() for n, v in fp32.reference.items()}})
    back = stats_from_bytes(stats_to_bytes(fp16))
    assert back.config == config and back.header() == fp16.header()
    for name in fp16.target:
        assert back.target[name].dtype == torch.float16 and torch.equal(back.target[name], fp16.target[name])
        assert torch.equal(back.reference[name], fp16.reference[name])
    with pytest.raises(ArtifactFormatError, match="float16"):  # tensors must be of the header's stats_dtype
        stats_to_bytes(ActivationStats(**{**vars(fp32), "config": config}))

    # A file written before the fields existed: no noise / stats_dtype in its config, fp32 tensors.
    tensors, header = _good_parts()
    header["config"] = {k: v for k, v in header["config"].items() if k not in ("noise", "stats_dtype")}
    old = stats_from_bytes(_stats_file(tensors, header))
    assert old.config == fp32.config and old.config.noise.value == "cpu" and old.config.stats_dtype.value == "float32"


def test_stats_special_values_survive():
    stats = random_stats(0)
    name = "mid.ff"
    stats.target[name][0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-45])
    back = stats_from_bytes(stats_to_bytes(stats))
    assert torch.equal(back.target[name].view(torch.int32), stats.target[name].view(torch.int32))


def test_stats_bytes_are_deterministic_and_plain_safetensors():
    stats = random_stats(1)
    data = stats_to_bytes(stats)
    assert stats_to_bytes(stats) == data
    assert stats_to_bytes(stats_from_bytes(data)) == data
    # Another dict order of the same layers: same bytes.
    reordered = ActivationStats(
        target=dict(reversed(stats.target.items())),
        reference=dict(reversed(stats.reference.items())),
        config=stats.config,
        component=stats.component,
        layer_shapes=dict(reversed(stats.layer_shapes.items())),
        num_target_prompts=stats.num_target_prompts,
        num_reference_prompts=stats.num_reference_prompts,
        fingerprint=stats.fingerprint,
        component_params=stats.component_params,
        extra=stats.extra,
    )
    assert stats_to_bytes(reordered) == data
    tensors = st_load(data)  # plain safetensors can read it
    assert set(tensors) == {f"{kind}/{name}" for kind in ("target", "reference") for name in stats.layer_shapes}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["cpreg"])
    assert header["format"] == "cpreg.stats/1" and header["layer_shapes"]["mid.ff"] == [16, 64]


def test_stats_writer_handles_views_and_shared_tensors():
    stats = random_stats(2)
    big = torch.rand(4, 2, 64)
    stats.target["mid.ff"], stats.reference["mid.ff"] = big[:, 0], big[:, 1]  # non-contiguous views
    shared = torch.rand(4, 32)
    stats.target["down.ff"] = stats.reference["down.ff"] = shared
    back = stats_from_bytes(stats_to_bytes(stats))
    assert_stats_equal(stats, back)


def _stats_file(tensors: dict, header: dict | None) -> bytes:
    metadata = None if header is None else {"cpreg": json.dumps(header)}
    return st_save(tensors, metadata=metadata)


def _good_parts():
    stats = random_stats(0)
    tensors = {f"{k}/{n}": getattr(stats, k)[n] for n in stats.layer_shapes for k in ("target", "reference")}
    return tensors, {"format": STATS_FORMAT, **stats.header()}


def _bad_stats(case: str) -> bytes:
    tensors, header = _good_parts()
    if case == "garbage":
        return b"\x00\x01garbage"
    if case == "huge header length":
        return (10**9).to_bytes(8, "little") + b"{}"
    if case == "pickle":
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return buffer.getvalue()
    if case == "no metadata":
        return _stats_file(tensors, None)
    if case == "unknown version":
        return _stats_file(tensors, {**header, "format": "cpreg.stats/9"})
    if case == "mask version":
        return _stats_file(tensors, {**header, "format": MASK_FORMAT})
    if case == "missing tensor":
        del tensors["reference/mid.ff"]
        return _stats_file(tensors, header)
    if case == "extra tensor":
        tensors["other/x"] = torch.zeros(1)
        return _stats_file(tensors, header)
    if case == "float16":
        tensors["target/mid.ff"] = tensors["target/mid.ff"].half()
        return _stats_file(tensors, header)
    if case == "wrong width":
        tensors["target/mid.ff"] = torch.zeros(4, 63)
        return _stats_file(tensors, header)
    if case == "step mismatch":
        tensors["target/mid.ff"] = torch.zeros(3, 64)
        return _stats_file(tensors, header)
    if case == "bad config":
        return _stats_file(tensors, {**header, "config": {**header["config"], "tau": 0}})
    if case == "missing config":
        return _stats_file(tensors, {k: v for k, v in header.items() if k != "config"})
    if case == "truncated":
        return _stats_file(tensors, header)[:-100]
    raise AssertionError(case)


STATS_CASES = {
    "garbage": "not a safetensors",
    "huge header length": "exceeds",
    "pickle": "",
    "no metadata": "no 'cpreg' metadata",
    "unknown version": "cpreg.stats/9",
    "mask version": "unsupported statistics format",
    "missing tensor": "missing ['reference/mid.ff']",
    "extra tensor": "unexpected ['other/x']",
    "float16": "float32",
    "wrong width": "[steps, 64]",
    "step mismatch": "steps",
    "bad config": "tau",
    "missing config": "config",
    "truncated": "",
}


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_bad_stats_files_are_rejected(case):
    with pytest.raises(ArtifactFormatError) as info:
        stats_from_bytes(_bad_stats(case))
    assert isinstance(info.value, ValueError)
    assert STATS_CASES[case] in str(info.value), str(info.value)


def test_stats_writer_rejects_non_fp32():
    stats = random_stats(0)
    stats.target["mid.ff"] = stats.target["mid.ff"].double()
    with pytest.raises(ArtifactFormatError, match="float32"):
        stats_to_bytes(stats)
    with pytest.raises(TypeError):
        stats_to_bytes({"target": {}})


def test_formats_do_not_confuse_each_other():
    with pytest.raises(ArtifactFormatError):
        mask_from_bytes(stats_to_bytes(random_stats(0)))
    with pytest.raises(ArtifactFormatError):
        stats_from_bytes(mask_to_bytes(random_mask(0)))


def test_read_tensors_are_independent_and_writable():
    # The reader hands back contiguous, writable, independent tensors.
    mask = random_mask(5)
    back = mask_from_bytes(mask_to_bytes(mask))
    layer = back.layers["mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    assert layer.indices.is_contiguous() and layer.indices.storage_offset() == 0
    layer.indices.add_(0)  # writable (no read-only numpy buffer underneath)
    assert np.array_equal(layer.indices.numpy(), mask.layers["mid_block.attentions.0.transformer_blocks.0.ff.net.2"].indices.numpy())
