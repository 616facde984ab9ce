"""The object store on S3-compatible storage (s3fs), against a local moto server on loopback.

The server (moto in server mode, a real HTTP endpoint) listens on 127.0.0.1 on a free port for
the duration of this module. The store finds it the way a user's store finds MinIO or AWS:
through the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), see docs/team.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

pytest.importorskip("moto.server", reason="moto's server mode is not installed (pip install -e '.[dev]')")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'cpreg[s3]')")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (it comes with moto)")

from moto.server import ThreadedMotoServer  # noqa: E402

from cpreg.artifacts import CorruptObjectError, MissingObjectError, ObjectStore, mask_from_bytes, sha256_hex  # noqa: E402
from cpreg.registry import Registry  # noqa: E402

from registry_support import FP_A, db_url, drop_database, make_mask, make_stats  # noqa: E402

BUCKET = "cpreg-test"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1:<free port>, and the environment that points clients at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Nothing from this machine's AWS setup, and never the instance metadata service.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        try:
            yield {"endpoint": endpoint, "client": client, "env": env}
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def prefix(s3_server) -> str:
    """A fresh key prefix in the test bucket (one per test)."""
    return f"run-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(prefix) -> ObjectStore:
    return ObjectStore(f"s3://{BUCKET}/{prefix}")


def keys(client, prefix: str) -> list[str]:
    """Every key under ``prefix``, straight from the server (no s3fs, no cache)."""
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def final_key(prefix: str, oid: str) -> str:
    return f"{prefix}/objects/{oid[:2]}/{oid[2:]}"


# ---------------------------------------------------------------- the store's API on S3


def test_put_get_ids_delete_on_s3(store, prefix, s3_server):
    client = s3_server["client"]
    assert not store.is_local and store.local_path(sha256_hex(b"x")) is None
    assert list(store.ids()) == [] and store.verify() == []
    blobs = [os.urandom(1000 + i) for i in range(3)] + [b""]
    oids = [store.put(blob) for blob in blobs]
    assert oids == [sha256_hex(blob) for blob in blobs]
    assert store.put(blobs[0]) == oids[0]  # idempotent
    assert keys(client, prefix) == sorted(final_key(prefix, oid) for oid in oids)  # no temporary key left
    for oid, blob in zip(oids, blobs):
        assert store.get(oid) == blob and store.exists(oid) and store.size(oid) == len(blob)
    assert list(store.ids()) == sorted(oids)
    assert store.verify() == []

    assert store.delete(oids[0]) is True and store.delete(oids[0]) is False
    assert not store.exists(oids[0])
    with pytest.raises(MissingObjectError, match=oids[0]):
        store.get(oids[0])
    assert list(store.ids()) == sorted(oids[1:])

    other = ObjectStore(f"s3://{BUCKET}/{prefix}", storage_options={"endpoint_url": s3_server["endpoint"]})
    assert other.get(oids[1]) == blobs[1]  # explicit storage options reach the same objects


def test_objects_written_or_deleted_elsewhere_are_seen_at_once(store, prefix, s3_server):
    """Listing caches never hide another process's writes or deletes from per-object checks."""
    client = s3_server["client"]
    oid = store.put(b"first")
    assert list(store.ids()) == [oid]  # a listing: s3fs now caches this folder
    client.delete_object(Bucket=BUCKET, Key=final_key(prefix, oid))
    assert not store.exists(oid)
    data = b"written by someone else"
    other = sha256_hex(data)
    client.put_object(Bucket=BUCKET, Key=final_key(prefix, other), Body=data)
    assert store.exists(other) and store.size(other) == len(data) and store.get(other) == data


def test_corrupt_object_is_refused_by_name_and_repaired_by_put(store, prefix, s3_server):
    client = s3_server["client"]
    data = os.urandom(5000)
    oid = store.put(data)
    damaged = bytearray(data)
    damaged[2500] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=final_key(prefix, oid), Body=bytes(damaged))
    with pytest.raises(CorruptObjectError, match=oid) as info:
        store.get(oid)
    assert f"s3://{BUCKET}/{prefix}" in str(info.value)
    assert [where for where, _ in store.verify()] == [oid]
    client.put_object(Bucket=BUCKET, Key=final_key(prefix, oid), Body=data[:100])  # truncated
    assert [where for where, _ in store.verify()] == [oid]
    assert store.put(data) == oid  # a corrupt copy is replaced, not trusted
    assert store.get(oid) == data and store.verify() == []


# ---------------------------------------------------------------- atomicity: failures midway


def test_upload_failing_midway_leaves_no_object_and_no_temporary(store, prefix, s3_server, monkeypatch):
    client, fs = s3_server["client"], store._fs
    data = os.urandom(4096)
    oid = sha256_hex(data)
    real_pipe = fs.pipe_file

    def half_then_fail(path, value, **kwargs):
        real_pipe(path, value[: len(value) // 2], **kwargs)  # half the bytes reach the server...
        raise ConnectionResetError("injected: connection lost mid-upload")  # ...then the write fails

    monkeypatch.setattr(fs, "pipe_file", half_then_fail)
    with pytest.raises(ConnectionResetError):
        store.put(data)
    monkeypatch.undo()
    assert keys(client, prefix) == []  # neither a partial object nor the temporary key
    assert not store.exists(oid) and list(store.ids()) == []
    assert store.put(data) == oid and store.get(oid) == data


def test_failure_between_upload_and_move_never_exposes_the_final_key(store, prefix, s3_server, monkeypatch):
    client, fs = s3_server["client"], store._fs
    data = os.urandom(4096)
    oid = sha256_hex(data)
    seen = {}

    def fail_move(source, destination, **kwargs):
        seen["temporary"] = keys(client, prefix)  # the bytes are there, under a temporary key only
        raise TimeoutError("injected: copy request timed out")

    monkeypatch.setattr(fs, "mv", fail_move)
    with pytest.raises(TimeoutError):
        store.put(data)
    monkeypatch.undo()
    assert len(seen["temporary"]) == 1 and seen["temporary"][0].endswith(".tmp")
    assert final_key(prefix, oid) not in seen["temporary"]
    assert keys(client, prefix) == []  # the failed write removed its temporary key


def test_a_move_that_lands_wrong_bytes_is_caught_and_removed(store, prefix, s3_server, monkeypatch):
    client, fs = s3_server["client"], store._fs
    data = os.urandom(4096)
    oid = sha256_hex(data)

    def broken_move(source, destination, **kwargs):
        fs.pipe_file(destination, data[:-1])  # a server-side copy that lost a byte
        fs.rm_file(source)

    monkeypatch.setattr(fs, "mv", broken_move)
    with pytest.raises(CorruptObjectError, match=oid):
        store.put(data)
    monkeypatch.undo()
    assert keys(client, prefix) == []  # read back, found wrong, removed


def test_writer_killed_mid_write_leaves_only_whole_objects(store, prefix, s3_server, tmp_path):
    """SIGKILL a process writing objects to S3 in a loop: every final key holds a whole object."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from cpreg.artifacts import ObjectStore
        store = ObjectStore("s3://{BUCKET}/{prefix}")
        print("ready", flush=True)
        while True:
            store.put(os.urandom(300_000))
    """))
    env = {**os.environ, **s3_server["env"]}
    process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while len(keys(s3_server["client"], prefix)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    written = list(store.ids())
    assert len(written) >= 2
    for oid in written:
        assert sha256_hex(store.get(oid)) == oid
    problems = store.verify()
    assert all("temporary" in problem for _, problem in problems), problems
    store.remove_temp_files(older_than_s=0)
    assert store.verify() == []


# ---------------------------------------------------------------- the registry on an S3 store


def test_registry_on_an_s3_store_end_to_end(prefix, s3_server, tmp_path):
    """add_mask / compose / load / delete / gc / verify with every object on S3."""
    client = s3_server["client"]
    reg = Registry(db_url(tmp_path), f"s3://{BUCKET}/{prefix}", actor="tester")
    try:
        model = reg.ensure_base_model("tiny/sd", FP_A)
        reg.add_concept("nudity", "nudity")
        reg.add_concept("van-gogh", "style")
        prompts = reg.ensure_prompt_set(["a", "b"], ["c", "d"])
        calibration = reg.add_calibration(
            make_stats(3), model, prompts, dtype="float32", device="cpu", duration_s=1.0, library_versions={}
        )
        first = reg.add_mask("nudity", make_mask(1), model, calibration)
        second = reg.add_mask("nudity", make_mask(2), model)
        style = reg.add_mask("van-gogh", make_mask(3), model)
        release = reg.compose("safe", ["nudity@1", "van-gogh"])
        assert reg.load("nudity@1").equals(make_mask(1))
        assert reg.load_release_mask("safe").num_masked == release.masked_total
        assert reg.load_stats(calibration).num_target_prompts == 2
        stored = set(reg.store.ids())
        assert stored == {first.artifact_oid, second.artifact_oid, style.artifact_oid, release.union_oid,
                          calibration.stats_oid}
        assert set(keys(client, prefix)) == {final_key(prefix, oid) for oid in stored}
        assert reg.verify() == []

        reg.delete_mask("nudity@2")
        assert reg.gc() == [second.artifact_oid]
        assert reg.gc(dry_run=False) == [second.artifact_oid]
        assert final_key(prefix, second.artifact_oid) not in keys(client, prefix)
        assert reg.verify() == [] and reg.gc() == []

        damaged = bytearray(client.get_object(Bucket=BUCKET, Key=final_key(prefix, style.artifact_oid))["Body"].read())
        damaged[len(damaged) // 2] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=final_key(prefix, style.artifact_oid), Body=bytes(damaged))
        with pytest.raises(CorruptObjectError, match=style.artifact_oid):
            reg.load("van-gogh@1")
        assert [where for where, _ in reg.verify()] == [style.artifact_oid]
        client.delete_object(Bucket=BUCKET, Key=final_key(prefix, release.union_oid))
        missing = [problem for where, problem in reg.verify() if where == release.union_oid]
        assert missing and "release safe@1" in missing[0]
    finally:
        reg.close()
        drop_database(tmp_path)


def test_workspace_cli_with_artifact_uri_on_s3(prefix, s3_server, tmp_path, monkeypatch):
    """`CPREG_ARTIFACT_URI=s3://...`: the CLI computes, composes and verifies with objects on S3."""
    from typer.testing import CliRunner

    from cpreg.cli import app

    monkeypatch.setenv("CPREG_ARTIFACT_URI", f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CPREG_DB_URL", raising=False)
    home = tmp_path / ".cpreg"

    def run(*args: str) -> dict:
        result = CliRunner().invoke(app, ["--home", str(home), *args, "--json"])
        assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
        return json.loads(result.stdout)

    fast = ["--model", "tiny", "--steps", "3", "--timesteps", "2", "--batch-size", "40"]
    mask = run("compute", "nudity", *fast)["mask"]
    assert run("compose", "nudity@1", "--release", "safe")["ref"] == "safe@1"
    assert run("verify")["ok"] is True
    stored = keys(s3_server["client"], prefix)
    assert final_key(prefix, mask["artifact_oid"]) in stored and len(stored) == 3  # mask, stats, union
    assert not (home / "objects").exists()  # nothing in the local home
    loaded = mask_from_bytes(ObjectStore(f"s3://{BUCKET}/{prefix}").get(mask["artifact_oid"]))
    assert loaded.num_masked == mask["masked_total"]
