"""
The power-loss file system's model, in process (no FUSE): what survives a
crash is what the fault tests count on, so the model is checked on its own.
A crash is a new L{PowerLossFS} over the same backing directory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.powerloss_fs import PowerLossFS


def written(fs: PowerLossFS, name: str, data: bytes) -> int:
    """
    Append C{data} to file C{name} (created if need be); return its handle.
    """
    fh = fs.create(name, stat.S_IFREG | 0o600, os.O_WRONLY | os.O_APPEND)
    fs.write(name, data, 0, fh)
    return fh


def contents(fs: PowerLossFS, name: str) -> bytes:
    return fs.read(name, 1 << 20, 0, fs.open(name, os.O_RDONLY))


def test_crashKeepsWhatWasSynced(tmp_path: Path) -> None:
    """
    Synced bytes and synced directory entries survive; the rest does not.
    """
    fs = PowerLossFS(str(tmp_path))
    fh = written(fs, "/f", b"durable")
    fs.fsync("/f", 0, fh)
    fs.fsyncdir("/", 0, fs.opendir("/"))
    fs.write("/f", b" cached", 0, fh)
    written(fs, "/g", b"new file, entry never synced")
    assert fs.stats()["droppedBytes"] == len(b" cached") + len(b"new file, entry never synced")
    after = PowerLossFS(str(tmp_path))
    assert contents(after, "/f") == b"durable"
    assert "g" not in after.readdir("/", 0)


def test_failedFsyncLosesItsBytes(tmp_path: Path) -> None:
    """
    A failed fsync answers EIO and its bytes are never written, though they
    stay readable until the crash; a later successful fsync does not save
    them (Linux marks the pages clean after a writeback error), so past
    the durable length they come back as zeros.
    """
    fs = PowerLossFS(str(tmp_path))
    fh = written(fs, "/f", b"synced|")
    fs.fsync("/f", 0, fh)
    fs.fsyncdir("/", 0, fs.opendir("/"))
    fs.write("/f", b"failed|", 0, fh)
    fs.failFsyncs = 1
    with pytest.raises(OSError) as e:
        fs.fsync("/f", 0, fh)
    assert e.value.errno == errno.EIO
    assert contents(fs, "/f") == b"synced|failed|"
    fs.write("/f", b"later", 0, fh)
    fs.fsync("/f", 0, fh)
    assert fs.stats()["failedFsyncs"] == 1
    after = PowerLossFS(str(tmp_path))
    assert contents(after, "/f") == b"synced|" + bytes(len(b"failed|")) + b"later"
