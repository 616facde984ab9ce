"""Distributed calibration: 2 CPU processes (gloo, launched by torchrun) equal one process.

The workers build the tiny SD pipeline (same seed: same weights), each calibrates its share of the
prompt pairs, the sums of squares are all-reduced, and every rank writes what it got. The test
checks that both ranks hold the same statistics, equal to a single-process ``calibrate`` up to
float rounding, with the full prompt counts, and that the derived masks are equal.
Everything talks over loopback only (``--standalone`` rendezvous on localhost, gloo on ``lo``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cpreg.artifacts import stats_from_bytes
from cpreg.distributed import distributed_calibrate, is_main_process, on_main_process, shard_pairs
from cpreg.editors import CalibrationConfig, calibrate, derive_mask, hooked_layers

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not torch.distributed.is_available(),
                                reason="needs torch.distributed with gloo (POSIX)")

TARGETS = ["a photo of a naked man", "a dog in the style of van gogh", "a red car", "a naked woman in a city"]
REFERENCES = ["a photo of a man", "a photo of a dog", "a car", "a woman in a city"]
CONFIG = dict(num_inference_steps=4, tau=3, batch_size=2, seed=0)

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from cpreg.artifacts import stats_to_bytes
    from cpreg.distributed import distributed_calibrate, is_main_process, on_main_process, rank, world_size
    from cpreg.editors import CalibrationConfig
    from cpreg.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    pipe = build_tiny_pipeline("sd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    stats = distributed_calibrate(pipe, {targets!r}, {references!r}, CalibrationConfig(**{config!r}))
    (out / f"rank{{rank()}}-of-{{world_size()}}.safetensors").write_bytes(stats_to_bytes(stats))
    # Only rank 0 runs the write; every rank gets its result.
    written = on_main_process(lambda: str(out / "written-by-rank0"))
    if is_main_process():
        Path(written).write_text("rank 0")
    assert written == str(out / "written-by-rank0"), written
    """
)


def _torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_gloo_processes_equal_one(tmp_path, tiny_pipeline):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(targets=TARGETS, references=REFERENCES, config=CONFIG))
    out = tmp_path / "out"
    out.mkdir()
    result = _torchrun(script, str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [stats_from_bytes((out / f"rank{r}-of-2.safetensors").read_bytes()) for r in (0, 1)]
    assert (out / "written-by-rank0").read_text() == "rank 0"

    pipe = tiny_pipeline("sd")
    torch.set_num_threads(1)
    single = calibrate(pipe, TARGETS, REFERENCES, CalibrationConfig(**CONFIG))
    for stats in ranks:
        assert (stats.num_target_prompts, stats.num_reference_prompts) == (len(TARGETS), len(REFERENCES))
        assert stats.fingerprint == single.fingerprint and stats.layer_shapes == single.layer_shapes
        assert stats.config == single.config and stats.recorded_steps == single.recorded_steps
        for name in single.layer_shapes:
            assert torch.equal(stats.target[name], ranks[0].target[name])  # every rank: the same sums
            torch.testing.assert_close(stats.target[name], single.target[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.reference[name], single.reference[name], rtol=1e-5, atol=1e-6)
    # Sanity: one shard alone is clearly not the whole (the all-reduce did something).
    half = calibrate(pipe, TARGETS[0::2], REFERENCES[0::2], CalibrationConfig(**CONFIG))
    name = next(iter(single.layer_shapes))
    assert not torch.allclose(half.target[name], single.target[name], rtol=1e-2)

    weights = {n: m.weight for n, m in hooked_layers(pipe, single.config.hook).modules.items()}
    for skill_ratio in (0.05, 0.2):
        expected = derive_mask(single, weights, skill_ratio)
        got = derive_mask(ranks[0], weights, skill_ratio)
        assert expected.num_masked > 0
        assert got.equals(expected)


def test_single_process_is_plain_calibrate(shared_tiny_sd, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    config = CalibrationConfig(num_inference_steps=3, tau=2, batch_size=8)
    stats = distributed_calibrate(shared_tiny_sd, TARGETS[:2], REFERENCES[:2], config)
    plain = calibrate(shared_tiny_sd, TARGETS[:2], REFERENCES[:2], config)
    assert all(torch.equal(stats.target[n], plain.target[n]) for n in plain.target)
    assert is_main_process() and on_main_process(lambda: 42) == 42
    monkeypatch.setenv("RANK", "1")  # a launcher's rank before the group exists
    assert not is_main_process()


def test_pairs_are_dealt_round_robin_and_every_rank_needs_one():
    assert shard_pairs(TARGETS, REFERENCES, 0, 2) == ([TARGETS[0], TARGETS[2]], [REFERENCES[0], REFERENCES[2]])
    assert shard_pairs(TARGETS, REFERENCES, 1, 2) == ([TARGETS[1], TARGETS[3]], [REFERENCES[1], REFERENCES[3]])
    assert shard_pairs(TARGETS[:3], REFERENCES[:3], 2, 3) == ([TARGETS[2]], [REFERENCES[2]])
    with pytest.raises(ValueError, match="4 prompt pair.*5 processes.*at most 4"):
        shard_pairs(TARGETS, REFERENCES, 0, 5)
    with pytest.raises(ValueError, match="do not pair up"):
        shard_pairs(TARGETS, REFERENCES[:3], 0, 2)


FAILING_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import cpreg.distributed as distributed
    from cpreg.distributed import distributed_calibrate, rank
    from cpreg.editors import CalibrationConfig
    from cpreg.tiny import build_tiny_pipeline

    out = Path(sys.argv[1])
    pipe = build_tiny_pipeline("sd", seed=0)
    targets, references = ["a naked man", "a naked woman"], ["a man", "a woman"]
    config = CalibrationConfig(num_inference_steps=2, tau=1)
    outcomes = []

    # 1. calibration fails on rank 1 only: both ranks raise, neither waits forever.
    real = distributed.calibrate
    def flaky(*args, **kwargs):
        if rank() == 1:
            raise MemoryError("injected: out of memory on rank 1")
        return real(*args, **kwargs)
    distributed.calibrate = flaky
    try:
        distributed_calibrate(pipe, targets, references, config)
        outcomes.append("no error")
    except (RuntimeError, MemoryError) as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")
    distributed.calibrate = real

    # 2. rank 1 uses another configuration: refused on both ranks instead of adding unlike sums.
    other = CalibrationConfig(num_inference_steps=2, tau=1, guidance_scale=3.0) if rank() == 1 else config
    try:
        distributed_calibrate(pipe, targets, references, other)
        outcomes.append("no error")
    except RuntimeError as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")

    # 3. rank 1 loaded another model: refused on both ranks.
    other_pipe = build_tiny_pipeline("sd", seed=1) if rank() == 1 else pipe
    try:
        distributed_calibrate(other_pipe, targets, references, config)
        outcomes.append("no error")
    except RuntimeError as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")

    # 4. the group is still usable afterwards.
    stats = distributed_calibrate(pipe, targets, references, config)
    outcomes.append(f"ok {stats.num_target_prompts}")
    (out / f"rank{rank()}.txt").write_text("\\n".join(outcomes))
    """
)


def test_a_failing_or_mismatched_rank_fails_every_rank(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_WORKER)
    result = _torchrun(script, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = (tmp_path / "rank0.txt").read_text().splitlines()
    rank1 = (tmp_path / "rank1.txt").read_text().splitlines()
    assert rank0[0] == "CalibrationError: distributed calibration failed on rank 1: MemoryError: injected: out of memory on rank 1"
    assert rank1[0] == "MemoryError: injected: out of memory on rank 1"
    for lines in (rank0, rank1):
        assert lines[1] == ("CalibrationError: rank 1 calibrated something else than rank 0 (different config): "
                            "every rank must be given the same prompts and configuration")
        assert lines[2] == ("CalibrationError: rank 1 calibrated something else than rank 0 (different fingerprint): "
                            "every rank must load the same base model")
        assert lines[3] == "ok 2"


COUNTING_RUNNER = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path

    import cpreg.distributed as distributed
    from cpreg.cli import main

    record_dir, real = Path(sys.argv.pop(1)), distributed.calibrate

    def counting(pipe, targets, references, config, **kwargs):
        record = record_dir / f"calibrated-rank{os.environ['RANK']}.json"
        record.write_text(json.dumps([len(targets), len(references)]))
        return real(pipe, targets, references, config, **kwargs)

    distributed.calibrate = counting
    main()
    """
)


def test_torchrun_cli_compute_writes_once_and_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m cpreg compute`: one mask version, one calibration, one report,
    and the same mask as a single-process `cpreg compute`."""
    import json

    from typer.testing import CliRunner

    from cpreg.cli import app
    from cpreg.registry import Registry

    fast = ["compute", "nudity", "--model", "tiny", "--steps", "3", "--timesteps", "2", "--batch-size", "4", "--json"]
    single_home, team_home = tmp_path / "single", tmp_path / "team"
    single = CliRunner().invoke(app, ["--home", str(single_home), *fast])
    assert single.exit_code == 0, (single.stdout, single.stderr)

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CPREG_DB_URL", None)
    env.pop("CPREG_ARTIFACT_URI", None)
    # The CLI's entry point, with cpreg.distributed's per-rank calibration counted: if `cpreg compute`
    # stopped sharding through cpreg.distributed, no rank would report and the test fails.
    runner = tmp_path / "cpreg_counting.py"
    runner.write_text(COUNTING_RUNNER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               str(runner), str(tmp_path), "--home", str(team_home), *fast]
    team = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert team.returncode == 0, team.stderr[-4000:]
    shards = {rank: json.loads((tmp_path / f"calibrated-rank{rank}.json").read_text()) for rank in (0, 1)}
    assert shards == {0: [10, 10], 1: [10, 10]}  # each rank calibrated its half of the 20 pairs
    reports = [line for line in team.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, team.stdout  # rank 0 reports, rank 1 stays quiet
    assert json.loads(reports[0])["ref"] == "nudity@1"

    with Registry(f"sqlite:///{team_home / 'registry.db'}", str(team_home)) as registry:
        counts = registry.counts()
        assert (counts["masks"], counts["calibrations"]) == (1, 1)  # written once, by rank 0
        stats = registry.load_stats(registry.list_calibrations()[0])
        assert (stats.num_target_prompts, stats.num_reference_prompts) == (20, 20)
        team_mask = registry.load("nudity@1")
    with Registry(f"sqlite:///{single_home / 'registry.db'}", str(single_home)) as registry:
        assert team_mask.equals(registry.load("nudity@1"))
