"""ObjectStore: content addressing, verification on read, atomic writes, id validation."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from cpreg.artifacts import (
    ArtifactError,
    CorruptObjectError,
    MissingObjectError,
    ObjectStore,
    sha256_hex,
)

# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["local", "file-url", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield ObjectStore(tmp_path / "store")
    elif request.param == "file-url":
        yield ObjectStore(f"file://{tmp_path}/store")
    else:
        root = f"memory://cpreg-test-{uuid.uuid4().hex}/store"
        yield ObjectStore(root)
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def object_location(store: ObjectStore, oid: str):
    """(fsspec filesystem, path) of the object file, found independently of the store's internals."""
    fs, root = fsspec.core.url_to_fs(str(store.root))
    return fs, f"{root.rstrip('/')}/objects/{oid[:2]}/{oid[2:]}"


def tamper(store: ObjectStore, oid: str, change) -> None:
    fs, path = object_location(store, oid)
    fs.pipe_file(path, change(fs.cat_file(path)))


def flip_byte(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# ---------------------------------------------------------------------------------- basics


def test_sha256_hex():
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()
    assert sha256_hex(memoryview(b"abc")) == hashlib.sha256(b"abc").hexdigest()


def test_put_get_exists_ids_delete(store):
    blobs = [b"", b"hello", os.urandom(100_000), bytearray(b"mutable")]
    oids = [store.put(blob) for blob in blobs]
    assert oids == [hashlib.sha256(blob).hexdigest() for blob in blobs]
    for oid, blob in zip(oids, blobs):
        assert store.exists(oid)
        assert store.get(oid) == bytes(blob)
        assert store.size(oid) == len(blob)
    assert list(store.ids()) == sorted(set(oids))
    assert store.verify() == []

    fs, path = object_location(store, oids[1])
    assert fs.isfile(path)  # layout: objects/<2 hex>/<62 hex>
    assert path.endswith(f"objects/{oids[1][:2]}/{oids[1][2:]}")

    assert store.delete(oids[1]) is True
    assert not store.exists(oids[1])
    assert store.delete(oids[1]) is False  # deleting twice is harmless
    with pytest.raises(MissingObjectError, match=oids[1]):
        store.get(oids[1])
    with pytest.raises(MissingObjectError):
        store.size(oids[1])
    assert oids[1] not in set(store.ids())


def test_put_is_idempotent_and_leaves_no_temporary_files(store):
    data = os.urandom(10_000)
    assert store.put(data) == store.put(data) == store.put(memoryview(data))
    assert list(store.ids()) == [sha256_hex(data)]
    assert store.verify() == []


def test_empty_store(store):
    assert list(store.ids()) == []
    assert store.verify() == []
    oid = sha256_hex(b"absent")
    assert not store.exists(oid)
    with pytest.raises(MissingObjectError):
        store.get(oid)


def test_missing_object_error_is_a_value_error(store):
    assert issubclass(MissingObjectError, ArtifactError) and issubclass(CorruptObjectError, ArtifactError)
    assert issubclass(ArtifactError, ValueError)
    with pytest.raises(ValueError):
        store.get("0" * 64)


def test_local_path(tmp_path):
    local = ObjectStore(str(tmp_path / "s"))
    oid = local.put(b"abc")
    path = local.local_path(oid)
    assert isinstance(path, Path) and path.read_bytes() == b"abc"
    assert path == tmp_path / "s" / "objects" / oid[:2] / oid[2:]
    with pytest.raises(MissingObjectError):
        local.local_path(sha256_hex(b"nope"))
    assert ObjectStore(f"file://{tmp_path}/s").local_path(oid) == path

    memory = ObjectStore(f"memory://cpreg-test-{uuid.uuid4().hex}")
    assert memory.local_path(memory.put(b"abc")) is None
    assert not memory.is_local and local.is_local


# ---------------------------------------------------------------------------------- corruption


def test_flipped_byte_is_detected_by_get_and_verify(store):
    good = store.put(b"fine")
    oid = store.put(os.urandom(5000))
    tamper(store, oid, lambda data: flip_byte(data, 1234))
    with pytest.raises(CorruptObjectError, match=oid) as info:
        store.get(oid)
    assert isinstance(info.value, ValueError)
    problems = store.verify()
    assert [p[0] for p in problems] == [oid]
    assert oid in problems[0][1] and "corrupt" in problems[0][1]
    assert store.get(good) == b"fine"
    # exists() and ids() do not hash; the object is still listed (so the registry can see it).
    assert store.exists(oid) and oid in set(store.ids())


def test_truncated_object_is_detected(store):
    oid = store.put(os.urandom(5000))
    tamper(store, oid, lambda data: data[:-1])
    with pytest.raises(CorruptObjectError, match=oid):
        store.get(oid)
    assert [p[0] for p in store.verify()] == [oid]
    tamper(store, oid, lambda data: b"")
    with pytest.raises(CorruptObjectError, match=oid):
        store.get(oid)


def test_put_repairs_a_corrupt_copy(store):
    data = os.urandom(3000)
    oid = store.put(data)
    tamper(store, oid, lambda d: flip_byte(d))
    assert store.put(data) == oid
    assert store.get(oid) == data and store.verify() == []


def test_misnamed_and_stray_files_are_reported(store):
    oid = store.put(b"content")
    fs, path = object_location(store, oid)
    other = sha256_hex(b"other")
    misnamed = f"{path.rsplit('/objects/', 1)[0]}/objects/{other[:2]}/{other[2:]}"
    fs.makedirs(misnamed.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(misnamed, b"content")  # right bytes, wrong name
    stray = f"{path.rsplit('/', 1)[0]}/README"
    fs.pipe_file(stray, b"?")
    problems = dict(store.verify())
    assert other in problems and "corrupt" in problems[other]
    assert f"{oid[:2]}/README" in problems
    assert set(store.ids()) == {oid, other}


def test_stray_temporary_file_is_hidden_and_reported(store):
    oid = store.put(b"real")
    fs, path = object_location(store, oid)
    temp = f"{path.rsplit('/', 1)[0]}/.{oid[2:]}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temp, b"partial")
    assert list(store.ids()) == [oid]
    problems = store.verify()
    assert len(problems) == 1 and problems[0][0].endswith(".tmp") and "temporary" in problems[0][1]
    assert store.remove_temp_files(older_than_s=3600) == []  # too young: may be a write in progress
    assert store.remove_temp_files(older_than_s=0) == [problems[0][0]]
    assert store.verify() == [] and store.get(oid) == b"real"


# ---------------------------------------------------------------------------------- id validation

BAD_IDS = [
    "../x",
    "../" + "0" * 61,
    "0" * 63,
    "0" * 65,
    "A" * 64,
    "g" * 64,
    "0" * 64 + "\n",
    "/" + "0" * 63,
    "",
    None,
    b"0" * 64,
    64,
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_ids_are_rejected_before_touching_the_filesystem(tmp_path, bad):
    root = tmp_path / "store"
    store = ObjectStore(root)
    for method in (store.get, store.exists, store.delete, store.size, store.local_path):
        with pytest.raises(ArtifactError, match="invalid object id"):
            method(bad)
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_put_rejects_non_bytes(tmp_path):
    with pytest.raises(TypeError):
        ObjectStore(tmp_path).put("a string")


# ---------------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_failed_local_write_leaves_nothing(tmp_path, monkeypatch, failing):
    store = ObjectStore(tmp_path / "store")
    data = os.urandom(50_000)
    oid = sha256_hex(data)

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash in {failing}")

    if failing == "write":
        monkeypatch.setattr("builtins.open", _open_failing_writes(boom))
    else:
        monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(data)
    monkeypatch.undo()
    assert not store.exists(oid)
    assert list(store.ids()) == []
    assert store.verify() == []  # the temporary file was removed as well
    assert store.put(data) == oid and store.get(oid) == data


def _open_failing_writes(boom):
    real_open = open

    class Handle:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            self._handle.write(bytes(data)[: len(data) // 2])  # half the bytes land, then the crash
            self._handle.flush()
            boom()

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Handle(handle) if "x" in mode else handle

    return fake_open


def test_failed_remote_move_leaves_nothing(monkeypatch):
    store = ObjectStore(f"memory://cpreg-test-{uuid.uuid4().hex}")
    fs, _ = fsspec.core.url_to_fs(store.root)

    def boom(*args, **kwargs):
        raise OSError("simulated crash in mv")

    monkeypatch.setattr(fs, "mv", boom)
    with pytest.raises(OSError, match="simulated"):
        store.put(b"payload")
    monkeypatch.undo()
    assert list(store.ids()) == [] and store.verify() == []


def test_remote_write_is_read_back_and_checked(monkeypatch):
    store = ObjectStore(f"memory://cpreg-test-{uuid.uuid4().hex}")
    fs, _ = fsspec.core.url_to_fs(store.root)
    real_cat = fs.cat_file
    monkeypatch.setattr(fs, "cat_file", lambda path, *a, **k: flip_byte(real_cat(path, *a, **k)))
    oid = sha256_hex(b"payload")
    with pytest.raises(CorruptObjectError, match=oid):
        store.put(b"payload")
    monkeypatch.undo()
    assert not store.exists(oid)


def test_concurrent_puts_of_the_same_object(tmp_path):
    store = ObjectStore(tmp_path / "store")
    data = os.urandom(1 << 20)
    results, errors = [], []

    def work():
        try:
            results.append(store.put(data))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and set(results) == {sha256_hex(data)}
    assert store.verify() == [] and store.get(results[0]) == data


# A child process loads only artifacts/errors.py and artifacts/store.py (no torch import: fast).
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from cpreg.artifacts.store import ObjectStore  # light: the artifact formats (torch) load lazily
    store = ObjectStore(sys.argv[1])
    if sys.argv[2] == "hang-before-rename":
        def fsync(fd):
            print("written", flush=True)
            time.sleep(60)
        os.fsync = fsync
        store.put(os.urandom(4 << 20))
    else:
        while True:
            print(store.put(os.urandom(8 << 20)), flush=True)
    """
)


def _child(root: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), mode], stdout=subprocess.PIPE, text=True)


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL


def test_sigkill_between_write_and_rename_leaves_no_object(tmp_path):
    root = tmp_path / "store"
    child = _child(root, "hang-before-rename")
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        _kill(child)
    store = ObjectStore(root)
    assert list(store.ids()) == []
    problems = store.verify()
    assert len(problems) == 1 and problems[0][0].endswith(".tmp") and "temporary" in problems[0][1]
    temp = root / "objects" / problems[0][0]
    assert temp.stat().st_size == 4 << 20  # the bytes were there, only under a temporary name


def test_sigkill_at_a_random_moment_never_exposes_a_partial_object(tmp_path):
    root = tmp_path / "store"
    rng = random.Random(1234)
    written: list[str] = []
    for _ in range(3):
        child = _child(root, "loop")
        try:
            for _ in range(2):
                written.append(child.stdout.readline().strip())
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            _kill(child)
    store = ObjectStore(root)
    ids = list(store.ids())
    assert set(written) <= set(ids)
    for oid in ids:
        assert sha256_hex(store.local_path(oid).read_bytes()) == oid
    assert all(path.endswith(".tmp") for path, _ in store.verify())
