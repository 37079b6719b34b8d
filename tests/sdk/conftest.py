"""
Fixtures for the official Mixpanel SDKs against the real daemon.

These tests run only in their own tox env (C{tox -e sdk}, which sets
C{MIXINGEST_SDK=1}); anywhere else each of them is skipped with a message
saying so, and the default envs don't run them a second time.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon, freePort  # noqa: E402
from tests.sdk.harness import (  # noqa: E402
    ENABLE,
    Certificate,
    NodeRunner,
    SDKDaemon,
    installNodeModules,
    makeCertificate,
    nodeEnvironment,
    startDaemon,
)


@pytest.fixture(autouse=True, scope="session")
def _sdkSuiteEnabled() -> None:
    if os.environ.get(ENABLE) != "1":
        pytest.skip(f"SDK end-to-end tests run in `tox -e sdk` (or with {ENABLE}=1)")


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return makeCertificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mixingest(
    tmp_path_factory: pytest.TempPathFactory, certificate: Certificate
) -> Iterator[SDKDaemon]:
    """
    One daemon per test module; each test keeps to tokens of its own.
    """
    running = startDaemon(tmp_path_factory.mktemp("daemon"), certificate, freePort())
    try:
        yield running
    finally:
        running.daemon.stop()


@pytest.fixture(scope="module")
def dropsIP(
    tmp_path_factory: pytest.TempPathFactory, certificate: Certificate
) -> Iterator[SDKDaemon]:
    """
    A daemon with C{--geoip} and nothing else about addresses, so that it
    stores none (what an operator gets without C{--keep-ip}); it believes
    C{X-Forwarded-For} from loopback (C{--trusted-proxy 127.0.0.1}, as behind
    a proxy on the same host), so a browser's requests can come from a
    public address.  The L{mixingest} daemon keeps them (C{--keep-ip}).
    """
    try:
        from _maxminddb_geolite2 import geolite2_database
    except ImportError:
        pytest.skip("maxminddb-geolite2 (a test extra) is not installed")
    sslPort = freePort()
    daemon = Daemon(
        tmp_path_factory.mktemp("drops-ip"),
        f"--listen=ssl:{sslPort}:privateKey={certificate.key}:certKey={certificate.cert}"
        ":interface=127.0.0.1",
        f"--geoip={geolite2_database()}",
        "--trusted-proxy=127.0.0.1",
    ).start()
    try:
        yield SDKDaemon(daemon, sslPort)
    finally:
        daemon.stop()


@pytest.fixture
def token(request: pytest.FixtureRequest) -> str:
    """
    A project token unique to the test, so that tests sharing a daemon never
    see each other's items.
    """
    return "tok-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:60]


@pytest.fixture(scope="session")
def nodeModules() -> Path:
    return installNodeModules()


@pytest.fixture(scope="session")
def node(nodeModules: Path, certificate: Certificate) -> NodeRunner:
    return NodeRunner(nodeModules, nodeEnvironment(nodeModules, certificate.ca))
