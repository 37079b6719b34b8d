"""
Names and imports that say what things are: the command line parses
without importing the daemon, the journal does not depend on the queues
built on it, each option default is defined once, and each listener's site
is named for what it serves.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import List

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


def afterImporting(module: str, script: str) -> str:
    """
    What C{script} prints in a fresh interpreter that has imported
    C{module} (its C{sys.argv[1]}): only a new process shows what an import
    loads.
    """
    return subprocess.run(
        [sys.executable, "-c", script, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_optionsImportNoDaemon() -> None:
    """
    C{mixingest.options} imports neither Klein, txredisapi nor the daemon's
    modules (the control: C{mixingest.tap} does).
    """
    script = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert afterImporting("mixingest.options", script) == ""
    assert afterImporting("mixingest.tap", script) == " ".join(HEAVY)


def queuesImported(source: str, package: str) -> List[str]:
    """
    The modules of C{mixingest.queues} that Python source of C{package}
    imports anywhere (at the top, in a function, under C{TYPE_CHECKING}),
    relative imports resolved.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [n for n in names if n == "mixingest.queues" or n.startswith("mixingest.queues.")]
    return found


def test_journalImportsNoQueues() -> None:
    """
    C{mixingest.journal} is the layer the queues are built on: none of its
    modules imports C{mixingest.queues}, directly or through another module
    (the controls: such imports, written in each way, are found, and
    C{mixingest.tap} does load the queues).
    """
    journal = ROOT / "mixingest" / "journal"
    sources = sorted(journal.glob("*.py"))
    assert len(sources) > 5
    found = {p.name: queuesImported(p.read_text(), "mixingest.journal") for p in sources}
    assert not any(found.values()), found
    for control in (
        "from mixingest.queues.base import Queue",
        "import mixingest.queues.redis",
        "from mixingest import queues",
        "from ..queues import base",
        "def later():\n    from .. import queues",
    ):
        assert queuesImported(control, "mixingest.journal"), control
    assert queuesImported((ROOT / "mixingest" / "tap.py").read_text(), "mixingest")

    script = (
        "import sys, importlib, pkgutil; importlib.import_module(sys.argv[1]); "
        "import mixingest.journal as j; "
        "[importlib.import_module('mixingest.journal.' + m.name) "
        "for m in pkgutil.iter_modules(j.__path__)]; "
        "print(sorted(m for m in sys.modules if m.startswith('mixingest.queues')))"
    )
    assert afterImporting("mixingest.journal", script) == "[]"
    assert "'mixingest.queues'" in afterImporting("mixingest.tap", script)


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
