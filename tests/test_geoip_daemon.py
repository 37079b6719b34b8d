"""
C{--geoip} in the real daemon: the database swapped under load (SIGHUP)
fails no request, and C{/stats} and C{/metrics} count the lookups.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon, Flood, encoded
from tests.test_geoip import CITY_NETWORKS, place, writeDatabase

LONDON = "81.2.69.142"


def locatedCity(daemon: Daemon, n: int) -> object:
    event = {"event": "probe", "properties": {"token": "tok", "ip": LONDON, "probe": n}}
    status, _, body = daemon.request(f"/track?data={encoded(event)}")
    assert (status, body) == (200, b"1")
    (item,) = [i for i in daemon.items() if i["properties"].get("probe") == n]
    assert "ip" not in item["properties"]
    return item["properties"].get("$city")


@pytest.mark.timeout(120)
def test_reloadUnderLoad(tmp_path: Path) -> None:
    path = writeDatabase(tmp_path / "city.mmdb", CITY_NETWORKS)
    daemon = Daemon(tmp_path, f"--geoip={path}").start()
    try:
        assert locatedCity(daemon, 0) == "London"
        flood = Flood(daemon, clients=2, perClient=100_000).start()
        try:
            for n in range(1, 6):
                flood.waitFor(200 * n, timeout=30)
                new = tmp_path / "new.mmdb"
                writeDatabase(new, {"81.2.69.0/24": place(f"City {n}", None, "GB")})
                new.replace(path)
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 20
                while daemon.stats()["geoip"]["reloads"] < n:
                    assert time.monotonic() < deadline, daemon.log()[-3000:]
                    time.sleep(0.05)
            flood.waitFor(len(flood.acknowledged) + 200, timeout=30)
        finally:
            flood.stop()
        assert flood.refused == {}, flood.refused
        assert locatedCity(daemon, 1) == "City 5"
        geoip = daemon.stats()["geoip"]
        assert geoip["hits"] == 2
        assert geoip["misses"] == geoip["lookups"] - 2 >= len(flood.acknowledged)
        _, _, metrics = daemon.admin("/metrics")
        assert f"mixingest_geoip_lookups_total {float(geoip['lookups'])}" in metrics.decode()
    finally:
        daemon.terminate()


def test_badDatabaseIsAStartupError(tmp_path: Path) -> None:
    path = tmp_path / "broken.mmdb"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(RuntimeError) as raised:
        Daemon(tmp_path, f"--geoip={path}").start()
    assert f"--geoip: {path} is not a MaxMind database" in str(raised.value)
