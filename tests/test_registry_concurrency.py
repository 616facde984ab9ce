"""Several processes on one SQLite registry, and writers killed with SIGKILL at random points.

Worker processes come from a ``forkserver`` that has imported torch, diffusers and cpreg once, so
each worker is a fresh process (own connections, own file handles) that starts in milliseconds.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import signal
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from cpreg.registry import ConflictError

from registry_support import FP_A, ON_POSTGRES, db_url, drop_database, make_mask, open_registry

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="forkserver and SIGKILL are POSIX")

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "cpreg.editors", "cpreg.artifacts", "cpreg.registry", __name__])

WORKERS = 6
MASKS_PER_WORKER = 3
KILLS = 20


# ---------------------------------------------------------------- workers (run in child processes)


def _add_versions(folder: str, worker: int, barrier, results) -> None:
    """Open the (maybe new) registry, register the same model/concept as everyone, add masks."""
    try:
        barrier.wait(timeout=60)  # everyone opens (and maybe migrates) a new database at once
        reg = open_registry(Path(folder))
        model = reg.ensure_base_model("tiny/sd", FP_A)
        try:
            reg.add_concept("nudity", "nudity")
        except ConflictError:
            pass
        barrier.wait(timeout=60)
        versions = [reg.add_mask("nudity", make_mask(100 * worker + i), model).version for i in range(MASKS_PER_WORKER)]
        reg.close()
        results.put((worker, versions))
    except BaseException as exc:  # report instead of dying silently
        results.put((worker, repr(exc)))


def _compose(folder: str, worker: int, refs: list[str], barrier, results) -> None:
    try:
        reg = open_registry(Path(folder))
        barrier.wait(timeout=60)
        release = reg.compose("safe", refs)
        reg.close()
        results.put((worker, (release.version, release.union_oid)))
    except BaseException as exc:
        results.put((worker, repr(exc)))


def _write_forever(folder: str, seed: int, ready) -> None:
    """Add masks (large enough that writing them takes a while) until killed."""
    reg = open_registry(Path(folder))
    model = reg.get_base_model(FP_A)
    ready.set()  # connected: the kill lands in the write loop, not in process start-up
    i = 0
    while True:
        reg.add_mask("nudity", make_mask(seed * 1000 + i, density=0.5, shapes={"a": (128, 128), "b": (64, 256)}), model)
        i += 1


# ---------------------------------------------------------------- tests


def _run(processes, results, count: int) -> dict:
    for process in processes:
        process.start()
    outcome = dict(results.get(timeout=120) for _ in range(count))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcome


def test_parallel_writers_get_distinct_consecutive_versions(tmp_path):
    db_url(tmp_path)  # PostgreSQL runs: create the (empty) database before the workers race on it
    barrier, results = CTX.Barrier(WORKERS), CTX.Queue()
    processes = [CTX.Process(target=_add_versions, args=(str(tmp_path), w, barrier, results)) for w in range(WORKERS)]
    outcome = _run(processes, results, WORKERS)
    assert all(isinstance(value, list) for value in outcome.values()), outcome
    given = sorted(version for versions in outcome.values() for version in versions)
    assert given == list(range(1, WORKERS * MASKS_PER_WORKER + 1))
    for versions in outcome.values():
        assert versions == sorted(versions)  # one writer's versions increase
    reg = open_registry(tmp_path)
    counts = reg.counts()
    assert (counts["base_models"], counts["concepts"], counts["masks"]) == (1, 1, WORKERS * MASKS_PER_WORKER)
    assert [m.version for m in reg.list_masks("nudity")] == given
    assert reg.verify() == []

    # Then several processes compose releases of the same members, in different orders, at once.
    refs = [mask.ref for mask in reg.list_masks("nudity")][:5]
    reg.close()
    barrier, results = CTX.Barrier(4), CTX.Queue()
    processes = [
        CTX.Process(
            target=_compose, args=(str(tmp_path), w, random.Random(w).sample(refs, len(refs)), barrier, results)
        )
        for w in range(4)
    ]
    outcome = _run(processes, results, 4)
    assert all(isinstance(value, tuple) for value in outcome.values()), outcome
    assert sorted(version for version, _ in outcome.values()) == [1, 2, 3, 4]
    assert len({oid for _, oid in outcome.values()}) == 1
    reg = open_registry(tmp_path)
    assert [r.ref for r in reg.list_releases()] == [f"safe@{v}" for v in (1, 2, 3, 4)]
    reg.close()
    drop_database(tmp_path)


def test_writers_killed_at_random_points_leave_a_consistent_registry(tmp_path):
    reg = open_registry(tmp_path)
    reg.ensure_base_model("tiny/sd", FP_A)
    reg.add_concept("nudity", "nudity")
    reg.close()
    rng = random.Random(1234)
    for kill in range(KILLS):
        ready = CTX.Event()
        process = CTX.Process(target=_write_forever, args=(str(tmp_path), kill, ready))
        process.start()
        assert ready.wait(timeout=60)
        time.sleep(rng.uniform(0.03, 0.6))
        process.kill()
        process.join(timeout=30)
        assert process.exitcode == -signal.SIGKILL

    reg = open_registry(tmp_path)
    masks = reg.list_masks("nudity")
    assert len(masks) >= KILLS // 2  # the writers did get work done between kills
    assert [m.version for m in masks] == list(range(1, len(masks) + 1))
    problems = [(where, problem) for where, problem in reg.verify() if "temporary file" not in problem]
    assert problems == []  # no row points to a missing object, no partial object under a final name
    for mask in masks[:: max(1, len(masks) // 10)] + masks[-1:]:
        assert reg.load_mask(mask).num_masked == mask.masked_total
    if not ON_POSTGRES:
        with reg._engine.connect() as connection:
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    # Objects written by a killed transaction are garbage, not referenced: gc removes them.
    orphans = reg.gc(dry_run=False)
    assert not set(orphans) & reg.referenced_objects()
    assert reg.add_mask("nudity", make_mask(0), FP_A).version == len(masks) + 1
    reg.close()
    drop_database(tmp_path)
