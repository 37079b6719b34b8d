# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: one port, N processes, one C{twistd} command.

The parent (the C{twistd} process the operator started) opens the listening
sockets before it drops privileges, then starts N workers, each an ordinary
C{twistd mixingest} with the same options, that I{adopts} its listening
socket instead of opening one (C{reactor.adoptStreamPort}) and keeps its own
journal in C{DATA_DIR/worker-K}.  The parent holds no journal and serves
nothing itself; it supervises:

  - for each TCP C{--listen} it opens one socket per worker, all bound to the
    same address with C{SO_REUSEPORT}, so the kernel spreads new connections
    evenly over the workers (with one shared socket, whichever worker wakes
    first takes a whole burst of connections);  a UNIX socket is shared;
  - the parent keeps every socket open, so connections arriving for a worker
    that died wait in its backlog until the replacement adopts it: none is
    refused or reset;
  - a worker that exits is started again (after 0.5 s, doubling up to 30 s
    while workers keep dying within 10 s of starting);
  - C{SIGTERM} or C{SIGINT} to the parent closes the listening sockets and
    forwards C{SIGTERM} to every worker, which drains (stops listening, lets
    the events in flight be stored, flushes the journal) and exits; the
    parent waits for them, killing any still alive C{--drain-timeout} plus
    15 seconds later;
  - workers run in sessions of their own (a terminal's Ctrl-C reaches only
    the parent, which forwards it) and get C{SIGTERM} if the parent dies;
  - workers log through the parent: each writes its log events as JSON
    lines to its standard output (L{workerLogObserver}), and the parent
    publishes them, level and all, to its own observers with the system
    C{worker-K}, so twistd's C{--logger}, C{--logfile} and C{--syslog}
    apply to every worker and a worker's errors are the parent's errors;
    anything a worker writes to its standard error (a traceback before its
    logging started) is logged as an error.

The parent also forwards the journals that a change of C{--workers} left
behind (see L{mixingest.orphans}).

Worker K's admin endpoint (C{--admin-listen}) is the configured one with
its port plus K (or, for a UNIX socket, its path plus C{-K}): each worker has
its own counters, so Prometheus scrapes every one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import socket
import stat
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    eventFromJSON,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from mixingest.journal.service import makePrivateDirectories

__all__ = [
    "FDS_ENV",
    "AdoptedListener",
    "WorkerSupervisor",
    "checkWorkerOptions",
    "inheritedListeners",
    "runWorker",
    "workerAdminEndpoint",
    "workerDirectory",
    "workerLogObserver",
]

FDS_ENV = "MIXINGEST_WORKER_FDS"
"""
Set by the parent for a worker: C{FD:FAMILY,...}, one per C{--listen}, in
order.  A process that finds it adopts those sockets instead of listening.
"""
PARENT_ENV = "MIXINGEST_WORKER_PARENT"
"""
The parent's pid, so that a worker whose parent died before it could ask
for C{SIGTERM} on its death exits at once.
"""

FIRST_FD = 3
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
QUICK_DEATH = 10.0
"""
A worker that exits within this many seconds of starting doubles the delay
before the next start.
"""
KILL_GRACE = 15.0
"""
Seconds past C{--drain-timeout} that the parent waits for draining workers
before it kills them.
"""
PR_SET_PDEATHSIG = 1
_TIMESTAMP = re.compile(r"\A\d{4}-\d\d-\d\dT\S+ ")
"""
The timestamp twistd starts a worker's log lines with: the parent adds its own.
"""
_LEVELS = frozenset(LogLevel.iterconstants())


def _parse(description: str) -> Any:
    from twisted.internet import reactor

    return serverFromString(reactor, description)


def checkWorkerOptions(options: Any) -> None:
    """
    Refuse, as a usage error, what C{--workers} cannot do: endpoints other
    than TCP or UNIX sockets (terminate TLS at the proxy) and admin
    endpoints whose per-worker address cannot be derived.
    """
    for description in options["listen"]:
        if description.partition(":")[0] not in ("tcp", "tcp6", "unix"):
            raise usage.UsageError(
                f"--workers needs tcp:, tcp6: or unix: listeners, not {description!r} "
                "(terminate TLS in the proxy in front)"
            )
        try:
            _parse(description)
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from None
    for index in range(options["workers"]):
        workerAdminEndpoint(options["admin-listen"], index)


def workerDirectory(dataDir: str, index: int) -> str:
    """
    Where worker C{index} keeps its journal.
    """
    return os.path.join(dataDir, f"worker-{index}")


def workerAdminEndpoint(description: str, index: int) -> str:
    """
    Worker C{index}'s admin endpoint: the port plus C{index} (port 0 stays
    0), or the UNIX socket path plus C{-index}.
    """
    kind, sep, rest = description.partition(":")
    if kind in ("tcp", "tcp6") and sep:
        head, colon, tail = rest.partition(":")
        prefix = ""
        if head.startswith("port="):
            prefix, head = "port=", head[len("port=") :]
        if head.isdigit():
            port = int(head)
            return f"{kind}:{prefix}{port + index if port else 0}{colon}{tail}"
    elif kind == "unix" and sep:
        head, colon, tail = rest.partition(":")
        prefix = ""
        if head.startswith("address="):
            prefix, head = "address=", head[len("address=") :]
        if head and "=" not in head:
            return f"unix:{prefix}{head}-{index}{colon}{tail}"
    raise usage.UsageError(
        f"--admin-listen {description!r}: with --workers give it as tcp:PORT[:...] or "
        "unix:PATH[:...] (worker K listens on PORT+K or PATH-K)"
    )


def _openTCP(endpoint: Any, count: int) -> List[socket.socket]:
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "")
    port = endpoint._port
    sockets: List[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((interface, port))
            port = s.getsockname()[1]
            s.listen(endpoint._backlog)
            s.setblocking(False)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def _openUNIX(endpoint: Any) -> socket.socket:
    path = endpoint._address
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, endpoint._mode)
        s.listen(endpoint._backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def openListeners(description: str, count: int) -> List[socket.socket]:
    """
    The listening sockets for one C{--listen}: C{count} TCP sockets sharing
    the address with C{SO_REUSEPORT}, or one UNIX socket C{count} times.
    """
    endpoint = _parse(description)
    if isinstance(endpoint, UNIXServerEndpoint):
        return [_openUNIX(endpoint)] * count
    return _openTCP(endpoint, count)


def inheritedListeners() -> Optional[List[Tuple[int, int]]]:
    """
    In a worker: the listening sockets it was given, as C{(fd, family)} in
    C{--listen} order; L{None} in any other process.  Read once: the
    variable is removed so that nothing this process starts inherits it.
    """
    value = os.environ.pop(FDS_ENV, None)
    if value is None:
        return None
    os.environ.pop(PARENT_ENV, None)
    listeners = []
    for field in value.split(","):
        fd, family = field.split(":")
        listeners.append((int(fd), int(family)))
    return listeners


class AdoptedListener(Service):
    """
    Serves C{factory} on an inherited listening socket; stopping stops
    listening (the parent's copy of the socket stays open).
    """

    def __init__(self, reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._factory = factory
        self._port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        self._port = self._reactor.adoptStreamPort(self._fd, self._family, self._factory)
        os.close(self._fd)  # adoptStreamPort works on a duplicate
        super().privilegedStartService()

    def startService(self) -> None:
        if self._port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        return port.stopListening()


class _Worker(ProcessProtocol):
    """
    One worker process: relays its output to the log, tells the supervisor
    when it ends.
    """

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = time.monotonic()
        self.pid: Optional[int] = None
        self.ended: Deferred[None] = Deferred()
        self.signalled = False
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        """
        Publish one line of the worker's output in the parent's log: a log
        event as is (L{workerLogObserver}), anything else as text, an error
        if it came on standard error.
        """
        system = f"worker-{self.index}"
        text = line.decode("utf-8", "replace").rstrip("\r")
        if childFD == 1 and text.startswith("{"):
            try:
                event = eventFromJSON(text)
            except ValueError:
                pass
            else:
                if isinstance(event, dict) and event.get("log_level") in _LEVELS:
                    worker = event.get("log_system")
                    event["log_system"] = system if worker in (None, "-") else f"{system} {worker}"
                    self.supervisor.publish(event)
                    return
        text = _TIMESTAMP.sub("", text, count=1)
        if text.strip():
            level = LogLevel.error if childFD == 2 else LogLevel.info
            self.supervisor.log.emit(level, "{line}", line=text, log_system=system)

    def terminate(self) -> None:
        if not self.signalled and not self.ended.called:
            self.signalled = True
            with contextlib.suppress(OSError):
                self.transport.signalProcess("TERM")  # type: ignore[union-attr]

    def kill(self) -> None:
        if not self.ended.called:
            with contextlib.suppress(OSError):
                self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._relay(childFD, rest)
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    The parent of C{--workers N}: opens the sockets, starts the workers and
    keeps them running, stops them gracefully.

    @ivar workers: the live worker of each index, if any.
    @ivar restarts: how many times a worker was started again.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        listen: Sequence[str],
        argv: Sequence[str],
        dataDir: str,
        adminListen: str,
        drainTimeout: float,
        python: str = sys.executable,
        publish: ILogObserver = globalLogPublisher,
    ) -> None:
        """
        @param argv: the C{twistd mixingest} options the parent was given;
            each worker gets them too, followed by its own C{--workers=1},
            C{--data-dir} and C{--admin-listen}.
        @param publish: where the workers' log events go.
        """
        self.publish = publish
        self._reactor = reactor
        self.count = count
        self._listen = list(listen)
        self._argv = list(argv)
        self._dataDir = os.path.abspath(dataDir)
        self._adminListen = adminListen
        self._drainTimeout = drainTimeout
        self._python = python
        self._sockets: List[List[socket.socket]] = []
        self.workers: Dict[int, _Worker] = {}
        self._delays = [RESTART_DELAY] * count
        self._pendingStarts: Dict[int, IDelayedCall] = {}
        self._stopping = False
        self.restarts = 0

    def privilegedStartService(self) -> None:
        if not self._sockets:
            self._sockets = [openListeners(d, self.count) for d in self._listen]
        super().privilegedStartService()

    def startService(self) -> None:
        if not self._sockets:
            self.privilegedStartService()
        super().startService()
        # The workers' journals go inside: as private as the ones they make.
        makePrivateDirectories(self._dataDir, durable=True)
        for index in range(self.count):
            self._start(index)

    def workerCommand(self, index: int) -> List[str]:
        return [
            self._python,
            "-c",
            "from mixingest.workers import runWorker; runWorker()",
            "--nodaemon",
            "--pidfile=",
            f"--logger={workerLogObserver.__module__}.{workerLogObserver.__qualname__}",
            "mixingest",
            *self._argv,
            "--workers=1",
            f"--data-dir={workerDirectory(self._dataDir, index)}",
            f"--admin-listen={workerAdminEndpoint(self._adminListen, index)}",
        ]

    def _start(self, index: int) -> None:
        self._pendingStarts.pop(index, None)
        if self._stopping:
            return
        childFDs: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        fields = []
        for i, sockets in enumerate(self._sockets):
            s = sockets[index]
            childFDs[FIRST_FD + i] = s.fileno()
            fields.append(f"{FIRST_FD + i}:{int(s.family)}")
        env = dict(os.environ)
        env[FDS_ENV] = ",".join(fields)
        env[PARENT_ENV] = str(os.getpid())
        worker = _Worker(self, index)
        self.workers[index] = worker
        process = self._reactor.spawnProcess(
            worker,
            self._python,
            self.workerCommand(index),
            env=env,
            path=os.getcwd(),
            childFDs=childFDs,
        )
        worker.pid = process.pid
        self.log.info("worker-{index} started, pid {pid}", index=index, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        status = getattr(reason.value, "exitCode", None)
        signalNumber = getattr(reason.value, "signal", None)
        how = f"signal {signalNumber}" if signalNumber is not None else f"status {status}"
        if self._stopping or not self.running:
            self.log.info("worker-{index} exited ({how})", index=worker.index, how=how)
            return
        lived = time.monotonic() - worker.started
        if lived >= QUICK_DEATH:
            self._delays[worker.index] = RESTART_DELAY
        delay = self._delays[worker.index]
        self._delays[worker.index] = min(delay * 2, MAX_RESTART_DELAY)
        self.restarts += 1
        self.log.warn(
            "worker-{index} (pid {pid}) exited ({how}) after {lived:.1f}s; "
            "starting it again in {delay}s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            lived=lived,
            delay=delay,
        )
        self._pendingStarts[worker.index] = self._reactor.callLater(
            delay, self._start, worker.index
        )

    def stopService(self) -> Deferred[None]:
        """
        Close the listening sockets (so that new connections are refused
        once the workers stop listening), forward C{SIGTERM} and wait for
        every worker to exit.
        """
        super().stopService()
        self._stopping = True
        for call in self._pendingStarts.values():
            call.cancel()
        self._pendingStarts.clear()
        closed = set()
        for sockets in self._sockets:
            for s in sockets:
                if id(s) not in closed:
                    closed.add(id(s))
                    s.close()
        self._sockets = []
        workers = list(self.workers.values())
        if not workers:
            return succeed(None)
        self.log.info("stopping {count} workers", count=len(workers))
        for worker in workers:
            worker.terminate()
        killer = self._reactor.callLater(self._drainTimeout + KILL_GRACE, self._killAll, workers)
        done = DeferredList([w.ended for w in workers])

        def stopped(_: object) -> None:
            if killer.active():
                killer.cancel()

        return done.addCallback(stopped)

    def _killAll(self, workers: List[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                self.log.warn("worker-{index} did not drain in time: killed", index=worker.index)
                worker.kill()


@implementer(ILogObserver)
class _JSONLines:
    """
    Log events as JSON lines, failures with their exception's message (JSON
    cannot carry the exception itself).
    """

    def __init__(self, out: TextIO) -> None:
        self._write = jsonFileLogObserver(out, recordSeparator="")

    def __call__(self, event: LogEvent) -> None:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            failure = copy.copy(failure)
            failure.value = f"{failure.value}"
            event = dict(event, log_failure=failure)
        self._write(event)


def workerLogObserver(out: Optional[TextIO] = None) -> ILogObserver:
    """
    A worker's log observer (twistd's C{--logger}): every event as one line
    of JSON on C{out}, by default its standard output, which its parent
    reads.  twistd makes it before it redirects C{sys.stdout} into the log.
    """
    return _JSONLines(sys.stdout if out is None else out)


def _dieWithParent() -> None:
    """
    Ask Linux for C{SIGTERM} when the parent dies, and exit now if it
    already has.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and os.getppid() != int(parent):
        sys.exit("mixingest worker: the supervisor is gone")


def runWorker() -> None:
    """
    The entry point of a worker process: its own session, death with the
    parent, then C{twistd} as usual.
    """
    with contextlib.suppress(OSError):  # already a session leader
        os.setsid()
    _dieWithParent()
    from twisted.scripts.twistd import run

    run()
