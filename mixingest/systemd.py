# -*- test-case-name: tests.test_systemd -*-
"""
The service manager's notification protocol (C{sd_notify}), without
libsystemd: one datagram of C{KEY=VALUE} lines to the Unix socket named by
C{$NOTIFY_SOCKET} (a path, or C{@name} for the abstract namespace).

Under C{Type=notify} systemd counts the daemon started only when it says
C{READY=1}, so units ordered after it (and C{systemctl start}) wait until it
listens; C{STOPPING=1} and C{STATUS=} show in C{systemctl status}; with
C{WatchdogSec=}, a daemon whose reactor stops turning (and so stops sending
C{WATCHDOG=1}) is killed and restarted.

The variables are removed from the environment when read, as
C{sd_notify(unset_environment=1)} does: a process this one starts (the
workers of C{--workers N}) is not the unit's main process and must not
speak for it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, MutableMapping, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["Notifier", "ReadyNotifier", "Watchdog", "monotonicUsec"]

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def monotonicUsec() -> int:
    """
    C{CLOCK_MONOTONIC} in microseconds, as C{RELOADING=1} wants it in
    C{MONOTONIC_USEC=}.
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """
    Sends notifications to the service manager, or nothing when there is
    none to send to.

    @ivar address: the socket address to send to, or L{None}.
    @ivar watchdogPeriod: seconds within which the manager wants
        C{WATCHDOG=1}, or L{None} when it does not watch.
    """

    log = Logger()

    def __init__(self, address: Optional[str], watchdogPeriod: Optional[float] = None) -> None:
        """
        @param address: C{$NOTIFY_SOCKET}: an absolute path, or C{@name} for
            an abstract socket.
        """
        if address is not None and address[:1] not in ("/", "@"):
            self.log.warn("NOTIFY_SOCKET={address} is unsupported: not notifying", address=address)
            address = None
        self.address = address
        self.watchdogPeriod = watchdogPeriod
        self._socket: Optional[socket.socket] = None
        self._failing = False

    @classmethod
    def fromEnvironment(
        cls, environ: Optional[MutableMapping[str, str]] = None, pid: Optional[int] = None
    ) -> Notifier:
        """
        The notifier the environment asks for, removing its variables.  The
        watchdog applies only if C{$WATCHDOG_PID} is unset or this process.
        """
        env = os.environ if environ is None else environ
        address = env.pop(NOTIFY_SOCKET, None) or None
        usec = env.pop(WATCHDOG_USEC, None)
        watchdogPid = env.pop(WATCHDOG_PID, None)
        period = None
        if usec and (watchdogPid is None or watchdogPid == str(pid or os.getpid())):
            try:
                period = int(usec) / 1_000_000
            except ValueError:
                cls.log.warn("WATCHDOG_USEC={usec} is not a number: ignored", usec=usec)
            else:
                period = period if period > 0 else None
        return cls(address, period)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> None:
        """
        Send C{message} (C{KEY=VALUE} lines), if there is a manager.  A
        failure is logged (once, until a send works again: the watchdog
        would repeat it every few seconds), never raised: the daemon serves
        with or without its manager listening.
        """
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address[0] == "@" else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8"), target)
        except OSError as e:
            if not self._failing:
                self._failing = True
                self.log.warn(
                    "notifying the service manager at {address} failed: {error}",
                    address=self.address,
                    error=e,
                )
        else:
            self._failing = False


def _oneLine(text: str) -> str:
    return " ".join(text.split())


class ReadyNotifier(Service):
    """
    Says C{READY=1} once the reactor runs (the services before it in the
    tree listen by then, and twistd's signal handlers are installed, so a
    stop asked for from then on is graceful), and C{STOPPING=1} when the
    stop begins.  It is the newest service of the tree, so it is stopped
    first.
    """

    def __init__(self, reactor: Any, notifier: Notifier, status: Callable[[], str]) -> None:
        """
        @param status: what to show as C{STATUS=} once ready.
        """
        self._reactor = reactor
        self._notifier = notifier
        self._status = status

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self._notifier.notify(f"READY=1\nSTATUS={_oneLine(self._status())}")

    def stopService(self) -> None:
        super().stopService()
        self._notifier.notify("STOPPING=1\nSTATUS=stopping: finishing the requests in flight")


class Watchdog(Service):
    """
    C{WATCHDOG=1} every half period, from the reactor: a reactor stuck for
    longer than C{WatchdogSec=} gets the daemon restarted.  It is the
    oldest service of the tree, stopped last, so that it keeps the daemon
    alive through a long drain and the queues' flush.
    """

    def __init__(self, clock: Any, notifier: Notifier) -> None:
        self._notifier = notifier
        self._call = LoopingCall(notifier.notify, "WATCHDOG=1")
        self._call.clock = clock

    def startService(self) -> None:
        super().startService()
        period = self._notifier.watchdogPeriod
        if period is not None:
            self._call.start(period / 2, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._call.running:
            self._call.stop()
