"""
Geolocation (C{--geoip}) against tiny MaxMind databases the tests write
with C{mmdb-writer}, for exact expectations: missing subdivisions,
country-only databases, IPv6, the cache, reloads and the IP privacy policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage

from mixingest.cleaning import Context, clean
from mixingest.geoip import (
    PRIVACY_ANONYMISE,
    PRIVACY_KEEP,
    GeoIPDatabase,
    GeoIPWatcher,
    Geolocator,
    Location,
    anonymise,
)
from mixingest.options import Options
from mixingest.reload import Reloader

mmdbWriter = pytest.importorskip("mmdb_writer", reason="mmdb-writer (test extra) is not installed")
netaddr = pytest.importorskip("netaddr", reason="netaddr (mmdb-writer's) is not installed")

NOW = 1795697832.5
LONDON = "81.2.69.142"
NO_REGION = "89.160.20.113"
V6 = "2a02:ff0::1"
COUNTRY_ONLY = "175.16.199.1"


def place(city: str | None, region: str | None, country: str) -> Dict[str, Any]:
    record: Dict[str, Any] = {"country": {"iso_code": country, "names": {"en": country}}}
    if city is not None:
        record["city"] = {"names": {"en": city, "de": city + "-de"}}
    if region is not None:
        record["subdivisions"] = [{"iso_code": "X", "names": {"en": region}}]
    return record


CITY_NETWORKS = {
    "81.2.69.0/24": place("London", "England", "GB"),
    "89.160.20.0/24": place("Linköping", None, "SE"),
    "2a02:ff0::/32": place("Milan", "Lombardy", "IT"),
    "10.0.0.0/8": place("Nowhere", "Private", "ZZ"),
}


def writeDatabase(
    path: Path, networks: Mapping[str, Dict[str, Any]], kind: str = "GeoLite2-City"
) -> Path:
    """
    Write a MaxMind database of C{networks} (CIDR: record) at C{path}.
    """
    writer = mmdbWriter.MMDBWriter(ip_version=6, database_type=kind, ipv4_compatible=True)
    for network, record in networks.items():
        writer.insert_network(netaddr.IPSet([network]), record)
    writer.to_db_file(str(path))
    return path


@pytest.fixture
def city(tmp_path: Path) -> GeoIPDatabase:
    return GeoIPDatabase(str(writeDatabase(tmp_path / "city.mmdb", CITY_NETWORKS)))


def track(geo: Geolocator, props: Dict[str, Any], ip: str | None = None, **kw: Any) -> Any:
    record = {"event": "e", "properties": {"token": "t", **props}}
    result = clean("track", [record], Context(NOW, ip, geo=geo, **kw))
    assert not result.failures, result.failures
    return json.loads(result.items[0].payload)["properties"]


def engage(geo: Geolocator, update: Dict[str, Any], ip: str | None = None, **kw: Any) -> Any:
    record = {"$token": "t", "$distinct_id": "u", **update}
    result = clean("engage", [record], Context(NOW, ip, geo=geo, **kw))
    assert not result.failures, result.failures
    return json.loads(result.items[0].payload)


def location(props: Mapping[str, Any], *keys: str) -> Dict[str, Any]:
    return {k: props[k] for k in ("$city", "$region", *keys) if k in props}


def test_cityRegionCountry(city: GeoIPDatabase) -> None:
    props = track(Geolocator(city), {}, LONDON)
    assert location(props, "mp_country_code") == {
        "$city": "London",
        "$region": "England",
        "mp_country_code": "GB",
    }
    assert "ip" not in props


def test_missingSubdivision(city: GeoIPDatabase) -> None:
    props = track(Geolocator(city), {}, NO_REGION)
    assert location(props, "mp_country_code") == {"$city": "Linköping", "mp_country_code": "SE"}


def test_ipv6(city: GeoIPDatabase) -> None:
    props = track(Geolocator(city), {}, V6)
    assert location(props, "mp_country_code") == {
        "$city": "Milan",
        "$region": "Lombardy",
        "mp_country_code": "IT",
    }


def test_countryDatabase(tmp_path: Path) -> None:
    path = writeDatabase(
        tmp_path / "country.mmdb",
        {"175.16.199.0/24": {"country": {"iso_code": "CN", "names": {"en": "China"}}}},
        "GeoLite2-Country",
    )
    props = track(Geolocator(GeoIPDatabase(str(path))), {}, COUNTRY_ONLY)
    assert location(props, "mp_country_code") == {"mp_country_code": "CN"}


@pytest.mark.parametrize(
    "address", ["10.1.2.3", "127.0.0.1", "192.0.2.1", "::1", "fe80::1", "8.8.8.8", "nonsense", ""]
)
def test_noLocation(city: GeoIPDatabase, address: str) -> None:
    """
    Private (even one the database has), reserved, unknown and malformed
    addresses give no location, and count as misses.
    """
    props = track(Geolocator(city), {"ip": address})
    assert location(props, "mp_country_code") == {}
    assert "ip" not in props
    assert (city.lookups, city.hits, city.misses) == ((1, 0, 1) if address else (0, 0, 0))


def test_counters(city: GeoIPDatabase) -> None:
    geo = Geolocator(city)
    for address in (LONDON, LONDON, "10.0.0.1", V6):
        track(geo, {}, address)
    status = city.status()
    assert (status["lookups"], status["hits"], status["misses"]) == (4, 3, 1)
    assert status["cached"] == 3
    metrics = {m.name: m.samples[0].value for m in city.collect()}
    assert metrics["mixingest_geoip_lookups"] == 4
    assert metrics["mixingest_geoip_hits"] == 3
    assert metrics["mixingest_geoip_misses"] == 1


def test_eventIPPropertyWins(city: GeoIPDatabase) -> None:
    """
    An event's own C{ip} (set by server-side code for its user) is
    geolocated rather than the request's address.
    """
    props = track(Geolocator(city), {"ip": V6}, LONDON)
    assert props["mp_country_code"] == "IT"


def test_noAddressNoLookup(city: GeoIPDatabase) -> None:
    """
    With C{ip=0} the request's address is not given: an event without its
    own C{ip} is not geolocated.
    """
    props = track(Geolocator(city), {})
    assert location(props, "mp_country_code") == {}
    assert city.lookups == 0


def test_manualPropertiesWin(city: GeoIPDatabase) -> None:
    manual = {"$city": "Paris", "mp_country_code": "FR", "$latitude": 48.85, "$longitude": 2.35}
    props = track(Geolocator(city), manual, LONDON)
    assert location(props, "mp_country_code") == {
        "$city": "Paris",
        "$region": "England",
        "mp_country_code": "FR",
    }
    assert (props["$latitude"], props["$longitude"]) == (48.85, 2.35)


def test_keepIP(city: GeoIPDatabase) -> None:
    geo = Geolocator(city, PRIVACY_KEEP)
    assert track(geo, {}, LONDON)["ip"] == LONDON
    assert track(geo, {"ip": V6}, LONDON)["ip"] == V6
    assert track(geo, {"ip": "10.9.9.9"})["ip"] == "10.9.9.9"
    assert "ip" not in track(geo, {})
    assert track(geo, {"ip": 5}, LONDON)["ip"] == 5, "a value the client set is kept"


@pytest.mark.parametrize(
    "address, coarse",
    [
        ("81.2.69.142", "81.2.69.0"),
        ("2a02:ff0:1234:5678:9abc:def0:1234:5678", "2a02:ff0:1234::"),
        ("::ffff:81.2.69.142", "::"),
        ("junk", None),
    ],
)
def test_anonymise(address: str, coarse: str | None) -> None:
    assert anonymise(address) == coarse


def test_anonymiseIP(city: GeoIPDatabase) -> None:
    props = track(Geolocator(city, PRIVACY_ANONYMISE), {}, LONDON)
    assert (props["ip"], props["$city"]) == ("81.2.69.0", "London")
    update = engage(Geolocator(city, PRIVACY_ANONYMISE), {"$set": {}}, V6)
    assert update["$ip"] == "2a02:ff0::"


def test_profileSet(city: GeoIPDatabase) -> None:
    update = engage(Geolocator(city), {"$set": {"plan": "pro", "$city": "Leeds"}}, LONDON)
    assert update["$set"] == {
        "plan": "pro",
        "$city": "Leeds",
        "$region": "England",
        "$country_code": "GB",
    }
    assert "$ip" not in update


def test_profileOwnIP(city: GeoIPDatabase) -> None:
    update = engage(Geolocator(city), {"$set": {}, "$ip": V6}, LONDON)
    assert update["$set"]["$country_code"] == "IT"
    assert "$ip" not in update


@pytest.mark.parametrize("ip", [0, "0"])
def test_profileSkips(city: GeoIPDatabase, ip: Any) -> None:
    """
    C{$ip} of 0 asks an update to skip geolocation.
    """
    assert engage(Geolocator(city), {"$set": {"a": 1}, "$ip": ip}, LONDON)["$set"] == {"a": 1}
    assert city.lookups == 0


@pytest.mark.parametrize(
    "update",
    [
        {"$unset": ["a"]},
        {"$add": {"n": 1}},
        {"$set_once": {"a": 1}},
        {"$delete": ""},
    ],
)
def test_onlySetIsGeolocated(city: GeoIPDatabase, update: Dict[str, Any]) -> None:
    result = engage(Geolocator(city), update, LONDON)
    assert "$country_code" not in json.dumps(result)
    assert "$ip" not in result


def test_groupsUntouched(city: GeoIPDatabase) -> None:
    record = {"$token": "t", "$group_key": "k", "$group_id": "g", "$set": {}}
    result = clean("groups", [record], Context(NOW, LONDON, geo=Geolocator(city)))
    assert json.loads(result.items[0].payload)["$set"] == {}


def test_withoutGeoIPAsToday() -> None:
    """
    Control: without C{--geoip} the address is stored and nothing located.
    """
    assert clean("track", [{"event": "e", "properties": {"token": "t"}}], Context(NOW, LONDON))
    record = {"event": "e", "properties": {"token": "t"}}
    props = json.loads(clean("track", [record], Context(NOW, LONDON)).items[0].payload)
    assert props["properties"]["ip"] == LONDON
    assert "$city" not in props["properties"]


def test_cacheIsBounded(tmp_path: Path) -> None:
    database = GeoIPDatabase(str(writeDatabase(tmp_path / "c.mmdb", CITY_NETWORKS)), cacheSize=2)
    for address in (LONDON, NO_REGION, V6, LONDON):
        database.lookup(address)
    assert database.status()["cached"] == 2


def test_cacheAnswersWithoutTheReader(city: GeoIPDatabase) -> None:
    assert city.lookup(LONDON) == Location("London", "England", "GB")
    city._reader.close()
    assert city.lookup(LONDON) == Location("London", "England", "GB")


def test_reload(tmp_path: Path) -> None:
    path = writeDatabase(tmp_path / "db.mmdb", CITY_NETWORKS)
    database = GeoIPDatabase(str(path))
    assert database.lookup(LONDON) == Location("London", "England", "GB")
    writeDatabase(tmp_path / "new.mmdb", {"81.2.69.0/24": place("Camden", None, "GB")})
    (tmp_path / "new.mmdb").replace(path)
    assert database.changed()
    reloader = Reloader(logFiles=lambda: iter(()))
    reloader.register("--geoip", database)
    assert reloader.reload() == {"--geoip": None}
    assert database.lookup(LONDON) == Location("Camden", None, "GB")
    assert not database.changed()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "asn"])
def test_badReloadKeepsTheDatabase(tmp_path: Path, damage: str) -> None:
    path = writeDatabase(tmp_path / "db.mmdb", CITY_NETWORKS)
    database = GeoIPDatabase(str(path))
    # Replaced, as geoipupdate does: the database in use is mapped.
    new = tmp_path / "new.mmdb"
    if damage == "missing":
        path.unlink()
    elif damage == "corrupt":
        new.write_bytes(b"not a database" * 100)
        new.replace(path)
    else:
        writeDatabase(new, {"81.2.69.0/24": {"autonomous_system_number": 1}}, "GeoLite2-ASN")
        new.replace(path)
    reloader = Reloader(logFiles=lambda: iter(()))
    reloader.register("--geoip", database)
    assert reloader.reload()["--geoip"] is not None
    assert database.lookup(LONDON) == Location("London", "England", "GB")


@pytest.mark.parametrize("damage", ["missing", "corrupt", "asn"])
def test_badDatabaseAtStart(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "db.mmdb"
    if damage == "corrupt":
        path.write_bytes(b"\0" * 4096)
    elif damage == "asn":
        writeDatabase(path, {"81.2.69.0/24": {"autonomous_system_number": 1}}, "GeoLite2-ASN")
    with pytest.raises(usage.UsageError, match="--geoip"):
        Options().parseOptions([f"--geoip={path}"])


def test_options(tmp_path: Path) -> None:
    path = writeDatabase(tmp_path / "db.mmdb", CITY_NETWORKS)
    options = Options()
    options.parseOptions([f"--geoip={path}", "--anonymise-ip"])
    assert isinstance(options["geoip"], GeoIPDatabase)
    for bad in (["--keep-ip"], [f"--geoip={path}", "--keep-ip", "--anonymise-ip"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(bad)


def test_watcherReloadsAChangedFile(tmp_path: Path) -> None:
    path = writeDatabase(tmp_path / "db.mmdb", CITY_NETWORKS)
    database = GeoIPDatabase(str(path))
    clock = Clock()
    watcher = GeoIPWatcher(database, clock, interval=10)
    watcher.startService()
    errors: List[Any] = []

    def observe(event: Dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.error:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        writeDatabase(tmp_path / "new.mmdb", {"81.2.69.0/24": place(None, None, "IE")})
        (tmp_path / "new.mmdb").replace(path)
        clock.advance(10)
        assert database.lookup(LONDON) == Location(None, None, "IE")
        (tmp_path / "bad").write_bytes(b"garbage" * 100)
        (tmp_path / "bad").replace(path)
        clock.advance(10)
        clock.advance(10)
        assert len(errors) == 1, "a bad file is reported once, not at every check"
        assert database.lookup(LONDON) == Location(None, None, "IE")
    finally:
        globalLogPublisher.removeObserver(observe)
        watcher.stopService()
    assert not clock.getDelayedCalls()
