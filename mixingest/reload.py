# -*- test-case-name: tests.test_reload -*-
"""
C{SIGHUP}: re-read what can change without a restart, and reopen the log
file.

Anything with a C{reload() -> None} method can be registered: it re-reads
its file and applies it whole, or raises (L{ValueError} for a bad file,
L{OSError} for one that cannot be read) and keeps what it had.  Each file
stands alone: a bad routes file does not stop new import secrets from
applying.  Reloads run on the reactor thread, between requests, so a
request sees the old settings or the new ones, never a mix, and none is
dropped: the files are a few kilobytes, read in well under a millisecond,
and every setting they replace is reactor-owned.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple

from twisted.application.service import Service
from twisted.logger import Logger, globalLogPublisher
from twisted.python.logfile import BaseLogFile

from mixingest.naming import validQueueName
from mixingest.ratelimit import RateLimiter
from mixingest.settingsfile import readJSONFile
from mixingest.systemd import Notifier, monotonicUsec

__all__ = [
    "LimitsFile",
    "ReloadOnSignal",
    "Reloadable",
    "Reloader",
    "RoutesFile",
    "SignalWorkers",
    "readJSONObject",
    "twistdLogFiles",
]


class Reloadable(Protocol):
    def reload(self) -> None:
        """
        Re-read and apply, atomically.

        @raise ValueError: the new settings are invalid; the old ones stay.
        @raise OSError: the file cannot be read; the old settings stay.
        """


def twistdLogFiles() -> Iterator[BaseLogFile]:
    """
    The log files the process writes to: those of twistd's C{--logfile}.
    twistd keeps its L{LogFile<twisted.python.logfile.LogFile>} to itself
    (only its C{SIGUSR1} handler, which renames the file, reaches it), so
    they are found through the global log publisher's observers: the file
    observer's private C{_outFile}, and the publisher's private
    C{_observers} (listed in the daemon's notes on upstream internals).
    """
    for observer in getattr(globalLogPublisher, "_observers", ()):
        out = getattr(observer, "_outFile", None)
        if isinstance(out, BaseLogFile):
            yield out


class Reloader:
    """
    What C{SIGHUP} reloads, by name.
    """

    log = Logger()

    def __init__(
        self,
        notifier: Optional[Notifier] = None,
        logFiles: Callable[[], Iterator[BaseLogFile]] = twistdLogFiles,
    ) -> None:
        self._notifier = notifier if notifier is not None else Notifier(None)
        self._logFiles = logFiles
        self._reloadables: List[Tuple[str, Reloadable]] = []

    def register(self, name: str, reloadable: Reloadable) -> None:
        self._reloadables.append((name, reloadable))

    def reload(self) -> Dict[str, Optional[str]]:
        """
        Reopen the log files (first, so that what follows is in the new
        file), then reload everything registered.

        @return: per name, L{None} if it reloaded, or why it did not.
        """
        self._notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonicUsec()}")
        for logFile in self._logFiles():
            try:
                logFile.reopen()
            except OSError as e:
                self.log.error("reopening the log file failed: {error}", error=e)
        results: Dict[str, Optional[str]] = {}
        for name, reloadable in self._reloadables:
            try:
                reloadable.reload()
            except (OSError, ValueError) as e:
                results[name] = str(e)
                self.log.error(
                    "reloading {name} failed, the previous settings stay: {error}",
                    name=name,
                    error=e,
                )
            except Exception as e:
                results[name] = repr(e)
                self.log.failure("reloading {name} failed, the previous settings stay", name=name)
            else:
                results[name] = None
        failed = sorted(name for name, error in results.items() if error is not None)
        if failed:
            status = f"reload failed for {', '.join(failed)}: previous settings kept"
        else:
            status = "reloaded"
        self.log.info("SIGHUP: {status}", status=status)
        self._notifier.notify(f"READY=1\nSTATUS={status}")
        return results


class ReloadOnSignal(Service):
    """
    Calls C{reload} on the reactor thread when the process gets C{signum}.
    The handler is installed once the reactor runs, after twistd's own;
    until then the signal is ignored rather than fatal (C{SIGHUP}'s default
    action kills the process).  It stays installed through the stop: a
    reload during a drain is harmless, dying of it is not.
    """

    def __init__(
        self,
        reactor: Any,
        reload: Callable[[], object],
        signum: int = signal.SIGHUP,
        installHandler: Callable[[int, Any], object] = signal.signal,
    ) -> None:
        self._reactor = reactor
        self._reload = reload
        self._signum = signum
        self._installHandler = installHandler

    def privilegedStartService(self) -> None:
        self._installHandler(self._signum, signal.SIG_IGN)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        self._installHandler(self._signum, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload)


def readJSONObject(path: str, option: str, what: str) -> Dict[str, Any]:
    """
    The JSON object in the file C{path}, which C{option} names.

    @param what: what the object maps, for the error message.
    @raise ValueError: the file cannot be read or is not a JSON object.
    """
    document = readJSONFile(path, option, private=False)
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object of {what}")
    return document


class RoutesFile:
    """
    C{--routes-file}: a JSON object of project token to queue name, on top
    of the C{--route} options (the file wins for a token in both).
    """

    def __init__(self, path: str, funnel: Any, base: Mapping[str, str]) -> None:
        """
        @param funnel: whose C{routes} this sets.
        @param base: the routes of the command line.
        """
        self.path = path
        self._funnel = funnel
        self._base = dict(base)

    def reload(self) -> None:
        routes = readJSONObject(self.path, "--routes-file", "project token to queue name")
        for token, queue in routes.items():
            if not token or not isinstance(queue, str) or not validQueueName(queue):
                raise ValueError(
                    f"{self.path}: {token!r} must map to a queue name of letters, digits, _ and -"
                )
        self._funnel.routes = {**self._base, **routes}


class LimitsFile:
    """
    C{--limits-file}: a JSON object with C{"rate_limit"} (events per second
    per project token) and C{"global_rate_limit"} (for all tokens
    together), each a positive number or C{null} for none; a key left out
    keeps the command line's C{--rate-limit} or C{--global-rate-limit}.
    When the rates change every bucket starts full again (at most one
    second's worth of extra events); unchanged, the buckets are kept.
    """

    KEYS = ("rate_limit", "global_rate_limit")

    def __init__(
        self,
        path: str,
        funnel: Any,
        maxTokens: int,
        rate: Optional[float] = None,
        globalRate: Optional[float] = None,
    ) -> None:
        """
        @param funnel: whose C{limiter} this sets.
        @param maxTokens: buckets kept at most.
        @param rate: C{--rate-limit}.
        @param globalRate: C{--global-rate-limit}.
        """
        self.path = path
        self._funnel = funnel
        self._maxTokens = maxTokens
        self._defaults = {"rate_limit": rate, "global_rate_limit": globalRate}

    def reload(self) -> None:
        limits = readJSONObject(self.path, "--limits-file", "limit name to value")
        unknown = set(limits) - set(self.KEYS)
        if unknown:
            raise ValueError(f"{self.path}: unknown limits {sorted(unknown)}")
        rates: List[Optional[float]] = []
        for key in self.KEYS:
            value = limits.get(key, self._defaults[key])
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            ):
                raise ValueError(f"{self.path}: {key} must be a positive number or null")
            rates.append(None if value is None else float(value))
        rate, globalRate = rates
        funnel = self._funnel
        current = funnel.limiter
        if current is not None and (current.rate, current.globalRate) == (rate, globalRate):
            return
        if rate is None and globalRate is None:
            funnel.limiter = None
        else:
            funnel.limiter = RateLimiter(rate, self._maxTokens, globalRate)


class SignalWorkers:
    """
    Under C{--workers N}, the parent's reload: forward C{SIGHUP} to every
    live worker, which reloads its own settings.
    """

    def __init__(self, supervisor: Any) -> None:
        """
        @param supervisor: the L{WorkerSupervisor<mixingest.workers.WorkerSupervisor>}.
        """
        self._supervisor = supervisor

    def reload(self) -> None:
        for worker in list(self._supervisor.workers.values()):
            transport = worker.transport
            if transport is not None and transport.pid is not None:
                try:
                    transport.signalProcess("HUP")
                except OSError as e:
                    raise ValueError(f"signalling worker {worker.index} failed: {e}") from None
