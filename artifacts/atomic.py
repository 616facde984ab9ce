"""Atomic files and folders: a result appears complete under its final name, or not at all.

Everything cpreg writes for others to read (store objects, exported masks and pipelines, DVC
outputs) is first written to a hidden sibling ``.<name>.<random>.tmp`` and then renamed over the
final name (``os.replace``, atomic on POSIX filesystems). A failure removes the temporary; a
killed process leaves at most a ``*.tmp`` sibling, never a partial result. Results get the
permissions a plain ``open`` or ``mkdir`` gives under the user's umask (``tempfile.mkstemp``
would give ``0600``, unreadable to a teammate or a serving account).

Example:
    >>> atomic_write("out/metrics.json", b"{}")
    >>> with atomic_path("out/pipeline", folder=True) as staging:
    ...     pipe.save_pretrained(staging)
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

#: Names of the temporaries (``.<name>.<32 hex>.tmp``): what a killed writer can leave behind.
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


@contextmanager
def atomic_path(final: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``final`` to fill; renamed over ``final`` on success, removed on failure.

    With ``folder=True`` the temporary is an (empty) folder and ``final`` must be absent or an
    empty folder; otherwise nothing exists at the temporary path yet and the caller creates the file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    if folder:
        temp.mkdir()
    try:
        yield temp
        os.replace(temp, final)
    except BaseException:
        if folder:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with suppress(OSError):
                os.unlink(temp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``durable`` also fsyncs the file and its folder."""
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "xb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    if durable:
        fsync_dir(path.parent)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
