"""
The operator endpoints over real loopback sockets: in process against a
funnel on a queue double (to steer readiness), and in the real daemon.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Tuple

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from mixingest.admin import AdminService
from mixingest.api import IngestAPI
from mixingest.funnel import Funnel
from mixingest.metrics import PublicSite
from tests.daemon import Daemon, freePort
from tests.test_funnel import HeldQueue

EVENT = {"event": "e", "properties": {"token": "tok", "$insert_id": "i1"}}
DATA = base64.b64encode(json.dumps(EVENT).encode()).decode()


class Running:
    """
    A funnel with its admin listener and a public listener, on loopback.
    """

    def __init__(self) -> None:
        self.queue = HeldQueue()
        self.funnel = Funnel(self.queue, reactor)
        self.adminPort = freePort()
        self.admin = AdminService(reactor, f"tcp:{self.adminPort}:interface=127.0.0.1", self.funnel)
        site = PublicSite(
            IngestAPI(self.funnel, reactor, maxBody=100_000).resource(),
            metrics=self.funnel.metrics,
            clock=reactor,
        )
        self.publicPort = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.admin.startService()
        self.funnel.startService()

    async def get(
        self, path: str, public: bool = False, **kwargs: Any
    ) -> Tuple[int, Dict[str, str], bytes]:
        port = self.publicPort.getHost().port if public else self.adminPort
        response = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False, **kwargs)
        body = await response.content()
        headers = {
            k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()
        }
        return response.code, headers, body

    async def stop(self) -> None:
        if self.funnel.running:
            await self.funnel.stopService()
        await self.admin.stopService()
        await self.publicPort.stopListening()


@pytest_twisted.async_yield_fixture
async def running() -> AsyncIterator[Running]:
    r = Running()
    try:
        yield r
    finally:
        await r.stop()


@pytest_twisted.ensureDeferred
async def test_healthz(running: Running) -> None:
    code, headers, body = await running.get("/healthz")
    assert (code, json.loads(body)) == (200, {"status": "ok"})
    assert headers["content-type"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_readyzFollowsQueueBacklogAndDrain(running: Running) -> None:
    code, _, body = await running.get("/readyz")
    assert (code, json.loads(body)["ready"]) == (200, True)
    running.queue.isReady = False
    code, _, body = await running.get("/readyz")
    assert code == 503
    assert json.loads(body)["queue_ready"] is False
    running.queue.isReady = True
    running.funnel.overBacklog = True
    assert (await running.get("/readyz"))[0] == 503
    running.funnel.overBacklog = False
    running.queue.hold = True
    answer = Deferred.fromCoroutine(running.get(f"/track?data={DATA}", public=True))
    while not running.queue.held:
        await deferLater(reactor, 0.01)
    stopped = running.funnel.stopService()
    code, _, body = await running.get("/readyz")
    assert (code, json.loads(body)["draining"]) == (503, True)
    assert json.loads((await running.get("/stats"))[2])["in_flight"]["events"] == 1
    assert not stopped.called
    running.queue.release()
    await stopped
    assert (await answer)[::2] == (200, b"1")


@pytest_twisted.ensureDeferred
async def test_readyzStoppingWhileServing(running: Running) -> None:
    """
    During the shutdown grace: not ready, and still storing.
    """
    running.funnel.stopping = True
    code, _, body = await running.get("/readyz")
    assert (code, json.loads(body)["stopping"], json.loads(body)["draining"]) == (503, True, False)
    assert (await running.get(f"/track?data={DATA}", public=True))[::2] == (200, b"1")
    assert running.queue.stored() != []


@pytest_twisted.ensureDeferred
async def test_statsAndMetricsAfterTraffic(running: Running) -> None:
    for _ in range(2):
        code, _, body = await running.get(f"/track?data={DATA}", public=True)
        assert (code, body) == (200, b"1")
    assert (await running.get("/nowhere", public=True))[0] == 404
    code, headers, body = await running.get("/stats")
    assert code == 200
    stats = json.loads(body)
    assert stats["queues"]["events"]["stored"]["events"] == 1
    assert stats["dedupe"]["hits"] == 1
    assert stats["tokens"]["tok"]["5m"]["events"] == 1
    assert stats["backend"] == {"backend": "double", "backlog": {}}

    code, headers, body = await running.get("/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'mixingest_requests_total{code="200",endpoint="track"} 2.0' in text
    assert 'mixingest_requests_total{code="404",endpoint="other"} 1.0' in text
    assert 'mixingest_request_duration_seconds_count{endpoint="track"} 2.0' in text
    assert 'mixingest_events_stored_total{queue="events"} 1.0' in text
    assert 'mixingest_queue_write_duration_seconds_count{queue="events"} 1.0' in text
    assert "mixingest_journal_backlog_events 0.0" in text
    assert "mixingest_dedupe_hits_total 1.0" in text
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"
    }
    assert all(name.startswith(("mixingest_", "process_")) for name in names)
    assert not [name for name in names if name.endswith("_created")]


@pytest_twisted.ensureDeferred
async def test_metricsOpenMetricsWhenAsked(running: Running) -> None:
    code, headers, body = await running.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert code == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/stats", "/metrics"])
@pytest_twisted.ensureDeferred
async def test_notOnThePublicPort(running: Running, path: str) -> None:
    assert (await running.get(path, public=True))[0] == 404


def test_daemonServesAdminOnItsOwnPort(tmp_path: Path) -> None:
    adminPort = freePort()
    daemon = Daemon(tmp_path, f"--admin-listen=tcp:{adminPort}:interface=127.0.0.1").start()
    admin = Daemon(tmp_path, port=adminPort)
    try:
        assert daemon.request(f"/track?data={DATA}")[2] == b"1"
        assert daemon.request(f"/track?data={DATA}")[2] == b"1"
        status, _, body = admin.request("/readyz")
        assert (status, json.loads(body)["ready"]) == (200, True)
        assert admin.request("/healthz")[0] == 200
        stats = json.loads(admin.request("/stats")[2])
        assert stats["queues"]["events"]["stored"]["events"] == 1
        assert stats["dedupe"]["hits"] == 1
        assert stats["backend"]["backend"] == "journal"
        metrics = admin.request("/metrics")[2].decode()
        assert 'mixingest_requests_total{code="200",endpoint="track"} 2.0' in metrics
        assert "\nprocess_resident_memory_bytes " in metrics
        assert daemon.request("/stats")[0] == 404
    finally:
        daemon.terminate()
    assert len(daemon.items("events")) == 1
