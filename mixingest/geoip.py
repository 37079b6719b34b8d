# -*- test-case-name: tests.test_geoip -*-
"""
Geolocation with an operator's MaxMind database (C{--geoip}), as Mixpanel
does it: the address becomes C{$city}, C{$region} and a country code, and
the address itself is then discarded unless the operator asks to keep it.

The database is read with C{maxminddb} (its C extension where installed),
memory-mapped: opening one costs a few system calls, so a reload runs on
the reactor thread and swaps the reader and its cache in one assignment.
Lookups are cached per address (a bounded LRU) because a few busy addresses
(proxies, offices, mobile gateways) send most of the traffic, and a lookup
that hits the cache costs one dictionary probe.

The file is mapped, not copied: it must be replaced (a new file renamed over
it, as C{geoipupdate} and C{mv} do), never written into in place.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import maxminddb
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = [
    "CACHE_SIZE",
    "PRIVACY_ANONYMISE",
    "PRIVACY_DROP",
    "PRIVACY_KEEP",
    "GeoIPDatabase",
    "GeoIPWatcher",
    "Geolocator",
    "Location",
    "anonymise",
]

CACHE_SIZE = 65536
"""
Addresses whose location is remembered: some 10 MB at most.
"""
PRIVACY_DROP = "drop"
PRIVACY_KEEP = "keep"
PRIVACY_ANONYMISE = "anonymise"


class Location(NamedTuple):
    """
    What the database says of one address; L{None} where it has nothing.
    """

    city: Optional[str]
    region: Optional[str]
    country: Optional[str]


def _english(entry: Any) -> Optional[str]:
    """
    The English name of a city or subdivision entry of the database.
    """
    if type(entry) is dict:
        names = entry.get("names")
        if type(names) is dict:
            name = names.get("en")
            if type(name) is str:
                return name
    return None


def _locate(reader: Any, address: str) -> Optional[Location]:
    """
    The location of C{address}, or L{None} for an address that is not a
    public one (private, reserved, loopback), not an address, or unknown to
    the database.
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    if not parsed.is_global:
        return None
    try:
        record = reader.get(parsed)
    except (ValueError, maxminddb.InvalidDatabaseError):
        # An IPv6 address in an IPv4-only database, or a damaged file.
        return None
    if type(record) is not dict:
        return None
    country = record.get("country")
    code = country.get("iso_code") if type(country) is dict else None
    subdivisions = record.get("subdivisions")
    # The first subdivision is the largest (England, not Brent), as Mixpanel's $region.
    region = _english(subdivisions[0]) if type(subdivisions) is list and subdivisions else None
    location = Location(_english(record.get("city")), region, code if type(code) is str else None)
    if location == (None, None, None):
        return None
    return location


def _open(path: str) -> Any:
    """
    Open a City or Country database.

    @raise ValueError: the file is not a MaxMind database of locations.
    @raise OSError: the file cannot be read.
    """
    try:
        reader = maxminddb.open_database(path)
    except maxminddb.InvalidDatabaseError as e:
        raise ValueError(f"{path} is not a MaxMind database: {e}") from None
    kind = reader.metadata().database_type
    if "City" not in kind and "Country" not in kind:
        reader.close()
        raise ValueError(f"{path} is a {kind} database, not a City or Country one")
    return reader


class GeoIPDatabase:
    """
    The database in use, its lookup cache and its counters.  Reactor-owned.

    @ivar lookups: addresses looked up (cached or not).
    @ivar hits: lookups that gave a location.
    @ivar misses: lookups that gave none (private, reserved, unknown).
    """

    log = Logger()

    def __init__(self, path: str, cacheSize: int = CACHE_SIZE) -> None:
        """
        @raise ValueError: not a City or Country database.
        @raise OSError: the file cannot be read.
        """
        self.path = path
        self.cacheSize = cacheSize
        self.lookups = 0
        self.hits = 0
        self.misses = 0
        self.reloads = 0
        self._reader: Any = None
        self._identity: Optional[Tuple[int, int, int, int]] = None
        self._rejected: Optional[Tuple[int, int, int, int]] = None
        self._take(_open(path), self._stat())

    def _stat(self) -> Optional[Tuple[int, int, int, int]]:
        try:
            s = os.stat(self.path)
        except OSError:
            return None
        return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)

    def _take(self, reader: Any, identity: Optional[Tuple[int, int, int, int]]) -> None:
        old = self._reader
        cached: Callable[[str], Optional[Location]] = lru_cache(maxsize=self.cacheSize)(
            lambda address: _locate(reader, address)
        )
        # One assignment each, between requests: no lookup sees a mix.
        self._reader, self._cached, self._identity = reader, cached, identity
        self.databaseType = reader.metadata().database_type
        self.buildEpoch = reader.metadata().build_epoch
        if old is not None:
            old.close()

    def reload(self) -> None:
        """
        Open the file again and use it from now on (SIGHUP, or a changed
        file); a file that is missing or not a database is an error and the
        database in use stays.
        """
        identity = self._stat()
        try:
            reader = _open(self.path)
        except (OSError, ValueError):
            self._rejected = identity
            raise
        self._take(reader, identity)
        self.reloads += 1
        self.log.info(
            "GeoIP database {path} loaded: {kind}, built {epoch}",
            path=self.path,
            kind=self.databaseType,
            epoch=self.buildEpoch,
        )

    def changed(self) -> bool:
        """
        Whether the file is not the one loaded (replaced, or written in
        place): one C{stat}, cheap enough to ask every few seconds.
        """
        identity = self._stat()
        return identity is not None and identity not in (self._identity, self._rejected)

    def lookup(self, address: str) -> Optional[Location]:
        """
        The location of C{address}, counted.
        """
        self.lookups += 1
        location = self._cached(address)
        if location is None:
            self.misses += 1
        else:
            self.hits += 1
        return location

    def status(self) -> Dict[str, Any]:
        """
        For C{/stats}.
        """
        info = self._cached.cache_info()  # type: ignore[attr-defined]
        return {
            "path": self.path,
            "databaseType": self.databaseType,
            "buildEpoch": self.buildEpoch,
            "lookups": self.lookups,
            "hits": self.hits,
            "misses": self.misses,
            "cached": info.currsize,
            "reloads": self.reloads,
        }

    def collect(self) -> Iterator[Metric]:
        """
        For C{/metrics}: a collector of the daemon's registry.
        """
        yield CounterMetricFamily(
            "mixingest_geoip_lookups", "Addresses geolocated (--geoip).", value=self.lookups
        )
        yield CounterMetricFamily(
            "mixingest_geoip_hits", "Geolocations that found a location.", value=self.hits
        )
        yield CounterMetricFamily(
            "mixingest_geoip_misses",
            "Geolocations that found none (private, reserved or unknown addresses).",
            value=self.misses,
        )
        yield GaugeMetricFamily(
            "mixingest_geoip_build_epoch",
            "When the GeoIP database in use was built, seconds since the epoch.",
            value=self.buildEpoch,
        )


def anonymise(address: str) -> Optional[str]:
    """
    A coarse address: an IPv4 address's last octet, an IPv6 address's last
    80 bits zeroed; L{None} for what is not an address.
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    bits = 8 if parsed.version == 4 else 80
    network = ipaddress.ip_network(f"{parsed}/{parsed.max_prefixlen - bits}", strict=False)
    return str(network.network_address)


def _address(value: Any) -> Optional[str]:
    if type(value) is str and value and value != "0":
        return value
    return None


class Geolocator:
    """
    Adds location properties to records and applies the IP privacy policy
    (C{--keep-ip}, C{--anonymise-ip}, or by default no address stored).
    """

    def __init__(self, database: GeoIPDatabase, privacy: str = PRIVACY_DROP) -> None:
        if privacy not in (PRIVACY_DROP, PRIVACY_KEEP, PRIVACY_ANONYMISE):
            raise ValueError(f"unknown IP privacy policy {privacy!r}")
        self.database = database
        self.privacy = privacy

    def _locate(self, target: Dict[str, Any], address: str, countryKey: str) -> None:
        location = self.database.lookup(address)
        if location is None:
            return
        city, region, country = location
        if city is not None and "$city" not in target:
            target["$city"] = city
        if region is not None and "$region" not in target:
            target["$region"] = region
        if country is not None and countryKey not in target:
            target[countryKey] = country

    def _store(self, record: Dict[str, Any], key: str, address: Optional[str]) -> None:
        if self.privacy == PRIVACY_KEEP:
            if address is not None:
                record.setdefault(key, address)
            return
        record.pop(key, None)
        if self.privacy == PRIVACY_ANONYMISE and address is not None:
            coarse = anonymise(address)
            if coarse is not None:
                record[key] = coarse

    def event(self, props: Dict[str, Any], requestAddress: Optional[str]) -> None:
        """
        Geolocate an event from its C{ip} property (what server-side code
        sets for its user, whose SDKs send C{ip=0}), or else the request's
        address (L{None} with C{ip=0}).  Location properties the event
        carries are kept.
        """
        address = _address(props.get("ip")) or requestAddress
        if address is not None:
            self._locate(props, address, "mp_country_code")
        self._store(props, "ip", address)

    def update(self, record: Dict[str, Any], operation: str, requestAddress: Optional[str]) -> None:
        """
        Geolocate a profile update from its C{$ip}, or else the request's
        address, into its C{$set}; other operations, and a C{$ip} of C{0},
        are not geolocated.
        """
        own = record.get("$ip")
        address = None if own == 0 or own == "0" else _address(own) or requestAddress
        values = record.get(operation)
        if operation == "$set" and address is not None and type(values) is dict:
            self._locate(values, address, "$country_code")
        self._store(record, "$ip", address)


class GeoIPWatcher(Service):
    """
    Reloads the database when its file changes (as C{geoipupdate} replaces
    it), checking with one C{stat} every C{interval} seconds.
    """

    log = Logger()

    def __init__(self, database: GeoIPDatabase, clock: IReactorTime, interval: float = 60.0):
        self.database = database
        self.interval = interval
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def check(self) -> None:
        if not self.database.changed():
            return
        try:
            self.database.reload()
        except (OSError, ValueError) as e:
            self.log.error(
                "reloading the GeoIP database failed, the previous one stays: {error}", error=e
            )

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
