"""
Names and imports that say what things are: the command line parses
without importing the daemon, each option default is defined once, and each
listener's site is named for what it serves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError

from mixingest.admin import AdminService, AdminSite
from mixingest.metrics import PublicSite
from mixingest.options import Options
from mixingest.tap import makeService
from tests.daemon import ROOT

HEAVY = ("klein", "txredisapi", "mixingest.funnel", "mixingest.api", "mixingest.admin")


def test_optionsImportNoDaemon() -> None:
    """
    C{mixingest.options} imports neither Klein, txredisapi nor the daemon's
    modules (the control: C{mixingest.tap} does).
    """
    script = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )

    def imported(module: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", script, module],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert imported("mixingest.options") == ""
    assert imported("mixingest.tap") == " ".join(HEAVY)


def test_listenersNamedForWhatTheyServe(tmp_path: Path) -> None:
    """
    The admin endpoint's site is an L{AdminSite} and the public API's a
    L{PublicSite}: Twisted names them so in "... starting on PORT".
    """
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path), "--listen", "tcp:0"])
    top = makeService(options, MemoryReactorClock())
    [adminService] = [s for s in top if isinstance(s, AdminService)]
    [adminListener] = list(adminService)
    assert isinstance(adminListener, StreamServerEndpointService)
    assert type(adminListener.factory) is AdminSite
    [public] = [s for s in top if isinstance(s, StreamServerEndpointService)]
    assert type(public.factory) is PublicSite
    assert (AdminSite.__name__, PublicSite.__name__) == ("AdminSite", "PublicSite")


def test_routeToAWorkerDirectoryRefused() -> None:
    with pytest.raises(UsageError, match="--workers journal directory"):
        Options().parseOptions(["--route", "tok=worker-1"])
    options = Options()
    options.parseOptions(["--route", "tok=worker_1"])
    assert options["route"] == {"tok": "worker_1"}
