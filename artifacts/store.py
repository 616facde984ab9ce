"""A content-addressed object store: bytes in, a sha256 id out; bytes back only if they still hash.

Layout: ``<root>/objects/ab/cdef...`` where ``abcdef...`` is the 64-hex sha256 of the content.
``root`` is a local path or any fsspec URL (``file://``, ``memory://``, ``s3://bucket/prefix``...).

Guarantees:
    * writes are atomic: the bytes go to a temporary file in the object's own directory
      (``.<name>.<random>.tmp``), are flushed and fsync'ed, then renamed over the final name
      (``os.replace``; the directory is fsync'ed too). On other fsspec filesystems the bytes go to a
      temporary key that is then moved, and the moved object is read back and checked. A crash
      leaves at most a temporary file, never a partial object under its final name;
    * every read is verified: :meth:`ObjectStore.get` raises :class:`CorruptObjectError` naming the
      object when the content does not hash to its id;
    * object ids are validated (64 lowercase hex characters) before any filesystem access.

Deciding which objects are garbage is the registry's job; the store only offers :meth:`ids`,
:meth:`delete`, :meth:`verify` and :meth:`remove_temp_files`.

Remote stores (S3 and the like) take their settings from the filesystem's usual sources: for
``s3://`` (``pip install "cpreg[s3]"``), botocore's environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for S3-compatible servers, ``AWS_PROFILE``) or fsspec's configuration
(``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``); or explicitly ``storage_options``. Every
per-object check bypasses the filesystem's directory-listing cache, so objects written or
deleted by other processes are seen at once.

Example:
    >>> store = ObjectStore("/data/cpreg")          # or "s3://bucket/cpreg", "memory://tests"
    >>> oid = store.put(mask_to_bytes(mask))
    >>> mask_from_bytes(store.get(oid)).equals(mask)
    True
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

from .atomic import atomic_write
from .errors import ArtifactError, CorruptObjectError, MissingObjectError

_OID = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_NAME = re.compile(r"[0-9a-f]{62}")
_TEMP = re.compile(r"\..+\.tmp")
_CHUNK = 1 << 20

BytesLike = bytes | bytearray | memoryview


def sha256_hex(data: BytesLike) -> str:
    """Lowercase hex sha256 of ``data``: the id of ``data`` in an :class:`ObjectStore`."""
    return hashlib.sha256(data).hexdigest()


def check_oid(oid: object) -> str:
    """Return ``oid`` if it is 64 lowercase hex characters, else raise :class:`ArtifactError`."""
    if not isinstance(oid, str) or not _OID.fullmatch(oid):
        raise ArtifactError(f"invalid object id {oid!r}: need a sha256 as 64 lowercase hex characters")
    return oid


class ObjectStore:
    """Content-addressed, verified, atomically written objects under ``<root>/objects/``.

    Args:
        root: a local directory (created on first write) or an fsspec URL; ``file://`` URLs are
            handled as local paths (fsync + rename).
        storage_options: keyword arguments of the fsspec filesystem (e.g. ``{"endpoint_url":
            "http://127.0.0.1:9000"}`` for ``s3://``); by default the filesystem's own
            configuration (environment variables, fsspec config files) applies.
    """

    def __init__(self, root: str | os.PathLike, *, storage_options: dict | None = None) -> None:
        self.root = os.fspath(root)
        self._fs = None
        if "://" in self.root or "::" in self.root:
            from fsspec.core import url_to_fs
            from fsspec.implementations.local import LocalFileSystem

            fs, path = url_to_fs(self.root, **(storage_options or {}))
            if isinstance(fs, LocalFileSystem):
                self._local = Path(path)
            else:
                self._fs = fs
                self._remote = path.rstrip("/")
        else:
            self._local = Path(self.root)

    def __repr__(self) -> str:
        return f"ObjectStore({self.root!r})"

    @property
    def is_local(self) -> bool:
        """True when objects are plain files of this machine (see :meth:`local_path`)."""
        return self._fs is None

    # ---------------------------------------------------------------- locations

    def _local_file(self, oid: str) -> Path:
        return self._local / "objects" / oid[:2] / oid[2:]

    def _remote_key(self, oid: str) -> str:
        return f"{self._remote}/objects/{oid[:2]}/{oid[2:]}"

    def _where(self, oid: str) -> str:
        return str(self._local_file(oid)) if self._fs is None else f"{self.root.rstrip('/')}/objects/{oid[:2]}/{oid[2:]}"

    def _fresh(self, key: str) -> str:
        """Forget what the remote filesystem's listing cache knows about ``key`` (and its parents),
        so the next call asks the server: another process may have written or deleted it."""
        with suppress(Exception):
            self._fs.invalidate_cache(key)
        return key

    def _read(self, oid: str) -> bytes:
        try:
            if self._fs is None:
                return self._local_file(oid).read_bytes()
            return self._fs.cat_file(self._fresh(self._remote_key(oid)))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingObjectError(f"object {oid} is not in the store {self.root}") from None

    def _hash_file(self, path: str | Path) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        opener = open if self._fs is None else self._fs.open
        with opener(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def _intact(self, oid: str) -> bool:
        """True when the object exists and hashes to its id."""
        try:
            path = self._local_file(oid) if self._fs is None else self._fresh(self._remote_key(oid))
            return self._hash_file(path)[0] == oid
        except (OSError, ValueError):
            return False

    # ---------------------------------------------------------------- API

    def put(self, data: BytesLike) -> str:
        """Store ``data``; return its sha256 id. Idempotent; atomic (see the module docstring).

        An existing intact copy is kept as is; a corrupt one is replaced.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"ObjectStore.put needs bytes, got {type(data).__name__}")
        oid = sha256_hex(data)
        if self._intact(oid):
            return oid
        if self._fs is None:
            self._put_local(oid, data)
        else:
            self._put_remote(oid, data)
        return oid

    def _put_local(self, oid: str, data: BytesLike) -> None:
        atomic_write(self._local_file(oid), data, durable=True)

    def _put_remote(self, oid: str, data: BytesLike) -> None:
        fs, final = self._fs, self._remote_key(oid)
        directory = final.rsplit("/", 1)[0]
        temp = f"{directory}/.{oid[2:]}.{uuid.uuid4().hex}.tmp"
        try:
            with suppress(NotImplementedError):
                fs.makedirs(directory, exist_ok=True)
            fs.pipe_file(temp, bytes(data))
            fs.mv(temp, final)
        except BaseException:
            with suppress(Exception):
                if fs.exists(temp):
                    fs.rm_file(temp)
            raise
        self._fresh(final)
        stored = fs.cat_file(final)
        actual = sha256_hex(stored)
        if actual != oid:
            with suppress(Exception):
                fs.rm_file(final)
            raise CorruptObjectError(
                f"object {oid}: the copy written to {self._where(oid)} reads back as {len(stored)} bytes hashing to {actual}"
            )

    def get(self, oid: str) -> bytes:
        """The bytes of object ``oid``, after checking that they hash to ``oid``.

        Raises:
            ArtifactError: ``oid`` is not a valid id.
            MissingObjectError: no such object.
            CorruptObjectError: the stored bytes do not hash to ``oid``.
        """
        check_oid(oid)
        data = self._read(oid)
        actual = sha256_hex(data)
        if actual != oid:
            raise CorruptObjectError(
                f"object {oid} is corrupt: its {len(data)} stored bytes hash to {actual} ({self._where(oid)})"
            )
        return data

    def exists(self, oid: str) -> bool:
        """Whether an object file named ``oid`` exists (its content is not checked)."""
        check_oid(oid)
        if self._fs is None:
            return self._local_file(oid).is_file()
        return bool(self._fs.isfile(self._fresh(self._remote_key(oid))))

    def delete(self, oid: str) -> bool:
        """Remove object ``oid``; True if it existed. Deleting an absent object is not an error."""
        check_oid(oid)
        if self._fs is None:
            try:
                self._local_file(oid).unlink()
            except FileNotFoundError:
                return False
            return True
        key = self._fresh(self._remote_key(oid))
        if not self._fs.isfile(key):
            return False
        self._fs.rm_file(key)
        self._fresh(key)
        return True

    def size(self, oid: str) -> int:
        """Size in bytes of object ``oid`` (not verified); :class:`MissingObjectError` if absent."""
        check_oid(oid)
        try:
            if self._fs is None:
                path = self._local_file(oid)
                if not path.is_file():
                    raise FileNotFoundError(path)
                return path.stat().st_size
            return int(self._fs.size(self._fresh(self._remote_key(oid))))
        except FileNotFoundError:
            raise MissingObjectError(f"object {oid} is not in the store {self.root}") from None

    def local_path(self, oid: str) -> Path | None:
        """Path of object ``oid`` on this machine, or None for a non-local store.

        The file is not verified (use :meth:`get` for checked bytes); never write to it.
        Raises :class:`MissingObjectError` when a local store lacks the object.
        """
        check_oid(oid)
        if self._fs is not None:
            return None
        path = self._local_file(oid)
        if not path.is_file():
            raise MissingObjectError(f"object {oid} is not in the store {self.root}")
        return path

    # ---------------------------------------------------------------- walking

    def _files(self) -> Iterator[tuple[str, str | Path]]:
        """``(path relative to objects/, full path)`` of every file under ``objects/``, sorted."""
        if self._fs is None:
            base = self._local / "objects"
            if not base.is_dir():
                return
            found = []
            for directory, dirnames, filenames in os.walk(base):
                dirnames.sort()
                for name in filenames:
                    full = Path(directory) / name
                    found.append((full.relative_to(base).as_posix(), full))
            yield from sorted(found)
        else:
            base = self._fresh(f"{self._remote}/objects")
            try:
                keys = self._fs.find(base, withdirs=False)
            except FileNotFoundError:
                return
            prefix = self._fs._strip_protocol(base).rstrip("/") + "/"
            for key in sorted(keys):
                key = self._fs._strip_protocol(key)
                if key.startswith(prefix):
                    yield key[len(prefix) :], key

    @staticmethod
    def _classify(relative: str) -> tuple[str, str | None]:
        """``("object", oid)``, ``("temp", None)`` or ``("other", None)``."""
        parts = relative.split("/")
        if len(parts) == 2 and _SHARD.fullmatch(parts[0]):
            if _NAME.fullmatch(parts[1]):
                return "object", parts[0] + parts[1]
            if _TEMP.fullmatch(parts[1]):
                return "temp", None
        return "other", None

    def ids(self) -> Iterator[str]:
        """Ids of every stored object, in sorted order (temporary and stray files skipped)."""
        for relative, _ in self._files():
            kind, oid = self._classify(relative)
            if kind == "object":
                yield oid

    def verify(self) -> list[tuple[str, str]]:
        """Hash every object; return ``(oid or path under objects/, problem)`` for each problem.

        Problems: objects whose content does not hash to their name (corrupt, truncated,
        misnamed), unreadable objects, leftover temporary files of interrupted writes and
        files that do not belong in the store. An empty list means the store is sound.
        """
        problems: list[tuple[str, str]] = []
        for relative, full in self._files():
            kind, oid = self._classify(relative)
            if kind == "temp":
                problems.append((relative, "leftover temporary file of an interrupted write"))
            elif kind == "other":
                problems.append((relative, "unexpected file: not named objects/<2 hex>/<62 hex>"))
            else:
                try:
                    actual, size = self._hash_file(full)
                except OSError as exc:
                    problems.append((oid, f"object {oid} is unreadable: {exc}"))
                    continue
                if actual != oid:
                    problems.append((oid, f"object {oid} is corrupt: its {size} bytes hash to {actual}"))
        return problems

    def remove_temp_files(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete leftover temporary files older than ``older_than_s`` seconds; return their paths.

        The age guard keeps writes in progress (by other processes) intact. On filesystems
        without modification times only ``older_than_s <= 0`` removes anything.
        """
        removed = []
        now = time.time()
        for relative, full in self._files():
            if self._classify(relative)[0] != "temp":
                continue
            try:
                if self._fs is None:
                    age = now - Path(full).stat().st_mtime
                else:
                    try:
                        age = now - self._fs.modified(full).timestamp()
                    except (NotImplementedError, AttributeError, KeyError):
                        age = float("inf") if older_than_s <= 0 else float("-inf")
                if age < older_than_s:
                    continue
                if self._fs is None:
                    Path(full).unlink()
                else:
                    self._fs.rm_file(full)
            except FileNotFoundError:
                continue
            removed.append(relative)
        return removed
