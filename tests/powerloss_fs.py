"""
A FUSE file system that forgets what a power cut forgets, for crash tests of
the real daemon.

It models a disk behind a volatile cache, strictly by POSIX: written bytes
are held in memory until an C{fsync} or C{fdatasync} of that file makes them
durable, and a directory's entries (create, mkdir, rename, unlink, rmdir)
are durable only once that directory is fsynced.  Closing a file makes
nothing durable.  The durable state lives in a backing directory on the real
disk (one file per inode, holding its durable bytes, and C{tree.json}, every
directory's durable entries), so the process that serves the mount holds
exactly what a power cut would drop, and a B{crash} is that process exiting
at once: mounting again on the same backing directory shows what survived.

The file system runs in a process of its own (C{python -m tests.powerloss_fs
BACKING MOUNTPOINT CONTROL}), so that it shares no interpreter lock with
the test or the daemon.  C{CONTROL} is a UNIX socket: a line C{crash} is
answered with what is being dropped and what was synced (a JSON object,
see L{PowerLossFS.stats}) and the process exits at once, under the lock that
every file operation takes, so nothing is made durable after the answer.  A
line C{fail-fsync N} makes the next N fsyncs of files fail with EIO, the way
Linux reports a writeback error: the file's unsynced bytes stay readable but
are never written (their pages are marked clean), so a later fsync does not
save them and a crash loses them (past the durable length they come back as
zeros once a later fsync extends the file).

Tests use L{PowerLossMount} (or the L{powerLossMount} fixture), which skips
the test with a reason when FUSE cannot be used here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

__all__ = ["PowerLossFS", "PowerLossMount", "fuseUnavailable", "powerLossMount"]

ROOT_INO = 1
MOUNT_TIMEOUT = 15.0
"""Seconds the file system process gets to mount and answer."""


class _Node:
    """
    A file or directory: its current state, and what of it is durable.

    @ivar data: a file's current bytes.
    @ivar dirtyFrom: the lowest offset changed since the last fsync, or
        C{None}: the bytes before it are already on the backing disk.
    @ivar entries: a directory's current entries, name to inode.
    @ivar durableEntries: the entries as of the directory's last fsync.
    """

    __slots__ = ("data", "dirtyFrom", "durableEntries", "entries", "ino", "mode", "mtime")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.mtime = time.time_ns()
        self.data = bytearray()
        self.dirtyFrom: Optional[int] = None
        self.entries: Dict[str, int] = {}
        self.durableEntries: Dict[str, int] = {}

    @property
    def isDir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class PowerLossFS:
    """
    The file system's operations (an mfusepy C{Operations}), all under one
    lock; the current tree is in memory, the durable one in C{backing}.
    """

    use_ns = True

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self._lock = threading.Lock()
        self.nodes: Dict[int, _Node] = {}
        self.handles: Dict[int, Tuple[int, int]] = {}
        self._nextHandle = 1
        self.fsyncs = 0
        self.dirSyncs = 0
        self.lastFsync: Optional[float] = None
        self.failFsyncs = 0
        self.failedFsyncs = 0
        os.makedirs(os.path.join(backing, "data"), exist_ok=True)
        self._load()

    # -- the backing disk

    def _dataPath(self, ino: int) -> str:
        return os.path.join(self.backing, "data", str(ino))

    def _load(self) -> None:
        """
        Rebuild the tree from the durable state: every node reachable from
        the root through durable entries, with its durable bytes.
        """
        try:
            with open(os.path.join(self.backing, "tree.json")) as f:
                tree = json.load(f)
        except FileNotFoundError:
            tree = {"next": ROOT_INO + 1, "modes": {}, "dirs": {}}
        # Inodes written since the tree was last saved left data files
        # behind: new inodes must not take their numbers and their bytes.
        written = [int(name) for name in os.listdir(os.path.join(self.backing, "data"))]
        self._nextIno = max([tree["next"], *(i + 1 for i in written)])
        modes = {int(k): v for k, v in tree["modes"].items()}
        dirs = {int(k): v for k, v in tree["dirs"].items()}
        modes.setdefault(ROOT_INO, stat.S_IFDIR | 0o755)
        pending = [ROOT_INO]
        while pending:
            ino = pending.pop()
            node = self.nodes[ino] = _Node(ino, modes[ino])
            if node.isDir:
                node.entries = dict(dirs.get(ino, {}))
                node.durableEntries = dict(node.entries)
                pending.extend(i for i in node.entries.values() if i not in self.nodes)
            else:
                with contextlib.suppress(FileNotFoundError), open(self._dataPath(ino), "rb") as f:
                    node.data = bytearray(f.read())

    def _saveTree(self) -> None:
        tree = {
            "next": self._nextIno,
            "modes": {n.ino: n.mode for n in self.nodes.values()},
            "dirs": {n.ino: n.durableEntries for n in self.nodes.values() if n.isDir},
        }
        path = os.path.join(self.backing, "tree.json")
        with open(path + ".new", "w") as f:
            json.dump(tree, f)
        os.replace(path + ".new", path)

    def stats(self) -> Dict[str, Any]:
        """
        What a crash now would drop (bytes not yet fsynced, directory
        entries not yet made durable; not the bytes of failed fsyncs, which
        are lost already), how often the daemon synced and when it last did
        with success, and how many fsyncs failed.
        """
        droppedBytes = 0
        droppedEntries = 0
        for node in self.nodes.values():
            if node.dirtyFrom is not None:
                droppedBytes += max(0, len(node.data) - node.dirtyFrom)
            if node.isDir:
                droppedEntries += len(set(node.entries.items()) ^ set(node.durableEntries.items()))
        return {
            "droppedBytes": droppedBytes,
            "droppedEntries": droppedEntries,
            "fsyncs": self.fsyncs,
            "dirSyncs": self.dirSyncs,
            "lastFsync": self.lastFsync,
            "failedFsyncs": self.failedFsyncs,
        }

    # -- lookups

    def _split(self, path: str) -> Tuple[_Node, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        node = self._lookup(parent or "/")
        if not node.isDir:
            raise _error(errno.ENOTDIR)
        return node, name

    def _lookup(self, path: str) -> _Node:
        node = self.nodes[ROOT_INO]
        for part in path.split("/"):
            if not part:
                continue
            if not node.isDir:
                raise _error(errno.ENOTDIR)
            ino = node.entries.get(part)
            if ino is None:
                raise _error(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def _node(self, path: Optional[str], fh: Optional[int]) -> _Node:
        if fh is not None and fh in self.handles:
            return self.nodes[self.handles[fh][0]]
        if path is None:
            raise _error(errno.EBADF)
        return self._lookup(path)

    def _newNode(self, mode: int) -> _Node:
        node = _Node(self._nextIno, mode)
        self._nextIno += 1
        self.nodes[node.ino] = node
        return node

    def _handle(self, node: _Node, flags: int) -> int:
        fh = self._nextHandle
        self._nextHandle += 1
        self.handles[fh] = (node.ino, flags)
        return fh

    # -- operations

    def getattr(self, path: Optional[str], fh: Optional[int] = None) -> Dict[str, Any]:
        with self._lock:
            node = self._node(path, fh)
            return {
                "st_mode": node.mode,
                "st_nlink": 2 if node.isDir else 1,
                "st_size": len(node.data),
                "st_blocks": (len(node.data) + 511) // 512,
                "st_atime": node.mtime,
                "st_mtime": node.mtime,
                "st_ctime": node.mtime,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
            }

    def readdir(self, path: str, fh: int) -> List[str]:
        with self._lock:
            node = self._node(path, None)
            return [".", "..", *node.entries]

    def opendir(self, path: str) -> int:
        with self._lock:
            node = self._lookup(path)
            if not node.isDir:
                raise _error(errno.ENOTDIR)
            return self._handle(node, os.O_RDONLY)

    def releasedir(self, path: Optional[str], fh: int) -> int:
        with self._lock:
            self.handles.pop(fh, None)
        return 0

    def fsyncdir(self, path: Optional[str], datasync: int, fh: int) -> int:
        with self._lock:
            node = self._node(path, fh)
            node.durableEntries = dict(node.entries)
            self.dirSyncs += 1
            self._saveTree()
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            parent, name = self._split(path)
            if name in parent.entries:
                raise _error(errno.EEXIST)
            parent.entries[name] = self._newNode(stat.S_IFDIR | (mode & 0o7777)).ino
        return 0

    def rmdir(self, path: str) -> int:
        with self._lock:
            parent, name = self._split(path)
            node = self._lookup(path)
            if not node.isDir:
                raise _error(errno.ENOTDIR)
            if node.entries:
                raise _error(errno.ENOTEMPTY)
            del parent.entries[name]
        return 0

    def create(self, path: str, mode: int, flags: int) -> int:
        with self._lock:
            parent, name = self._split(path)
            ino = parent.entries.get(name)
            if ino is not None:
                if flags & os.O_EXCL:
                    raise _error(errno.EEXIST)
                return self._handle(self.nodes[ino], flags)
            node = self._newNode(stat.S_IFREG | (mode & 0o7777))
            parent.entries[name] = node.ino
            return self._handle(node, flags)

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            node = self._lookup(path)
            if node.isDir:
                raise _error(errno.EISDIR)
            return self._handle(node, flags)

    def release(self, path: Optional[str], fh: int) -> int:
        with self._lock:
            self.handles.pop(fh, None)
        return 0

    def flush(self, path: Optional[str], fh: int) -> int:
        return 0

    def read(self, path: Optional[str], size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            return bytes(self._node(path, fh).data[offset : offset + size])

    def write(self, path: Optional[str], data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            node = self._node(path, fh)
            if self.handles.get(fh, (0, 0))[1] & os.O_APPEND:
                offset = len(node.data)
            if offset > len(node.data):
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            self._dirty(node, offset)
            return len(data)

    def truncate(self, path: Optional[str], length: int, fh: Optional[int] = None) -> int:
        with self._lock:
            node = self._node(path, fh)
            if length < len(node.data):
                del node.data[length:]
            else:
                node.data.extend(bytes(length - len(node.data)))
            self._dirty(node, length)
        return 0

    def fsync(self, path: Optional[str], datasync: int, fh: int) -> int:
        with self._lock:
            node = self._node(path, fh)
            if self.failFsyncs:
                self.failFsyncs -= 1
                self.failedFsyncs += 1
                node.dirtyFrom = None  # marked clean, never written
                raise _error(errno.EIO)
            self.lastFsync = time.monotonic()
            self.fsyncs += 1
            if node.dirtyFrom is not None:
                fd = os.open(self._dataPath(node.ino), os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.ftruncate(fd, len(node.data))
                    os.pwrite(fd, node.data[node.dirtyFrom :], node.dirtyFrom)
                finally:
                    os.close(fd)
                node.dirtyFrom = None
        return 0

    def unlink(self, path: str) -> int:
        with self._lock:
            parent, name = self._split(path)
            if self._lookup(path).isDir:
                raise _error(errno.EISDIR)
            del parent.entries[name]
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        with self._lock:
            oldParent, oldName = self._split(old)
            newParent, newName = self._split(new)
            node = self._lookup(old)
            target = newParent.entries.get(newName)
            if target is not None:
                if flags & 1:  # RENAME_NOREPLACE
                    raise _error(errno.EEXIST)
                if flags or self.nodes[target].isDir:
                    raise _error(errno.EINVAL if flags else errno.EISDIR)
            del oldParent.entries[oldName]
            newParent.entries[newName] = node.ino
        return 0

    def chmod(self, path: Optional[str], mode: int) -> int:
        with self._lock:
            node = self._node(path, None)
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        return 0

    def chown(self, path: Optional[str], uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: Optional[str], times: Optional[Tuple[int, int]] = None) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        return 0

    def statfs(self, path: str) -> Dict[str, int]:
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": 1 << 20,
            "f_bfree": 1 << 19,
            "f_bavail": 1 << 19,
            "f_files": 1 << 20,
            "f_ffree": 1 << 19,
            "f_favail": 1 << 19,
            "f_namemax": 255,
        }

    def _dirty(self, node: _Node, offset: int) -> None:
        node.mtime = time.time_ns()
        node.dirtyFrom = offset if node.dirtyFrom is None else min(node.dirtyFrom, offset)


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _serveControl(fs: PowerLossFS, path: str) -> None:
    """
    Answer control commands on UNIX socket C{path}: C{stats};
    C{fail-fsync N}; or C{crash}, which answers and then ends the process
    with the lock held.
    """
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    while True:
        connection, _ = server.accept()
        with connection:
            command = connection.makefile("rb").readline().strip()
            if command == b"crash":
                fs._lock.acquire()
                connection.sendall(json.dumps(fs.stats()).encode() + b"\n")
                os._exit(0)
            with fs._lock:
                if command.startswith(b"fail-fsync "):
                    fs.failFsyncs = int(command.split()[1])
                connection.sendall(json.dumps(fs.stats()).encode() + b"\n")


def main(argv: List[str]) -> None:
    """
    Mount the file system in the foreground: C{BACKING MOUNTPOINT CONTROL}.
    """
    from mfusepy import FUSE

    backing, mountpoint, control = argv
    fs = PowerLossFS(backing)
    threading.Thread(target=_serveControl, args=(fs, control), daemon=True).start()
    FUSE(
        fs,
        mountpoint,
        foreground=True,
        nothreads=True,
        fsname="powerloss",
        # Every read and write reaches this process (no page cache in the
        # kernel that could answer for it), and the kernel caches no names
        # or attributes that a crash would make stale.
        direct_io=True,
        hard_remove=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )


# -- the test side


def fuseUnavailable() -> Optional[str]:
    """
    @return: why a FUSE file system cannot be mounted here, or C{None}.
    """
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (on Debian: apt-get install fuse3; in a container, --device /dev/fuse)"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3 (apt-get install fuse3)"
    check = subprocess.run(
        [sys.executable, "-c", "import mfusepy"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines()
        why = lines[-1] if lines else "?"
        return f"mfusepy cannot load libfuse3 (pip install mfusepy; apt install libfuse3-3): {why}"
    return None


def unmount(mountpoint: Path) -> None:
    """
    Detach C{mountpoint} if anything is mounted there, even a dead mount.
    """
    for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run(
            [*command, str(mountpoint)], capture_output=True, check=False, timeout=30
        )
        if done.returncode == 0:
            return


class PowerLossMount:
    """
    The file system mounted on C{mountpoint} over C{backing}, in a process
    of its own: L{crash} cuts the power, L{mount} brings it back.
    """

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.control = backing.parent / f"{backing.name}.control"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.crashes: List[Dict[str, Any]] = []

    def mount(self) -> PowerLossMount:
        """
        Start the file system and wait until it serves the mount point.
        """
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already a mount point")
        self.control.unlink(missing_ok=True)
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        with open(self.backing.parent / f"{self.backing.name}.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.powerloss_fs",
                    str(self.backing),
                    str(self.mountpoint),
                    str(self.control),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (os.path.ismount(self.mountpoint) and self.control.exists()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the power-loss file system did not mount:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        path = self.backing.parent / f"{self.backing.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _command(self, command: bytes) -> Dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(command + b"\n")
            reply = s.makefile("rb").readline()
        if not reply:
            raise RuntimeError(f"no answer to {command!r}:\n{self.log()}")
        result: Dict[str, Any] = json.loads(reply)
        return result

    def stats(self) -> Dict[str, Any]:
        """
        See L{PowerLossFS.stats}.
        """
        return self._command(b"stats")

    def failFsyncs(self, count: int) -> Dict[str, Any]:
        """
        Make the next C{count} fsyncs of files fail with EIO, losing what
        each would have made durable.

        @return: L{PowerLossFS.stats} before the first failure.
        """
        return self._command(b"fail-fsync %d" % count)

    def crash(self) -> Dict[str, Any]:
        """
        Cut the power: everything not yet durable is gone, the mount is
        detached.  The figures of the moment are appended to C{crashes}.

        @return: L{PowerLossFS.stats} at the moment of the crash.
        """
        figures = self._command(b"crash")
        self.crashes.append(figures)
        self.kill()
        return figures

    def kill(self) -> None:
        """
        End the file system process (if it still runs) and detach the mount.
        """
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
            self.process = None
        unmount(self.mountpoint)


@pytest.fixture
def powerLossMount(tmp_path: Path) -> Iterator[PowerLossMount]:
    """
    A mounted power-loss file system at C{tmp_path / "mnt"}; unmounted
    afterwards whatever happens.  Skips if FUSE cannot be used here.
    """
    reason = fuseUnavailable()
    if reason is not None:
        pytest.skip(reason)
    mount = PowerLossMount(tmp_path / "backing", tmp_path / "mnt")
    try:
        yield mount.mount()
    finally:
        mount.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
