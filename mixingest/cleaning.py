"""
Validate and clean each decoded record into the queue item consumers read.

The rules follow Mixpanel's documented ingestion limits so that whatever
mixingest accepts, Mixpanel (or a consumer written for its data) accepts too.
Where Mixpanel truncates (long strings and names), mixingest truncates and
counts it; where Mixpanel rejects, the one record is rejected with the field
and the reason, and the records beside it are still stored.

The queue item is the cleaned record itself, one JSON object, with
C{received_at} (server receive time, seconds since the epoch, millisecond
precision) added at the top level; see the README for the full format.
"""

from __future__ import annotations

import re
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    NamedTuple,
    Optional,
    Tuple,
)

from mixingest import codec
from mixingest.errors import InvalidEvent

if TYPE_CHECKING:
    from mixingest.geoip import Geolocator

__all__ = [
    "ENDPOINTS",
    "MAX_ITEM_BYTES",
    "CleanItem",
    "Cleaned",
    "Context",
    "clean",
    "normaliseTime",
]

MAX_STRING = 255
MAX_NAME = 255
MAX_PROPERTIES = 255
MAX_COLLECTION = 255
MAX_DEPTH = 3
MAX_COLLECTION_BYTES = 8 * 1024
MAX_ITEM_BYTES = 1024 * 1024
MILLISECONDS_FROM = 10**11
"""
A C{time} at or past this is milliseconds: as seconds it would be the year
5138, as milliseconds it is 1973.
"""
MAX_TIME = 10**14
"""
Times at or past this are refused: as milliseconds, the year 5138.
"""
IMPORT_EARLIEST = 31536000
"""
1971-01-01T00:00:00Z: Mixpanel's C{/import} refuses anything older.
"""
IMPORT_FUTURE = 3600
"""
Seconds past the server's clock that an imported C{time} may be: Mixpanel's
C{/import} refuses events more than an hour in the future.
"""
PLACEHOLDER_IDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "anon",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "<nil>",
        "0",
        "-1",
        "true",
        "false",
        "[]",
        "{}",
    }
)
"""
The placeholder values Mixpanel's C{/import} refuses as C{distinct_id} or
C{$insert_id} (compared case-insensitively): an SDK bug's default, which
would merge unrelated users or deduplicate unrelated events.
"""
INT64 = 1 << 63
INSERT_ID = re.compile(r"\A[A-Za-z0-9-]{1,36}\Z")
_INSERT_ID = INSERT_ID.match

ENGAGE_OPERATIONS = (
    "$set",
    "$set_once",
    "$add",
    "$append",
    "$union",
    "$remove",
    "$unset",
    "$delete",
)
GROUP_OPERATIONS = ("$set", "$set_once", "$unset", "$remove", "$union", "$delete")


class Context(NamedTuple):
    """
    What the request adds to each of its records.

    @ivar received: server receive time, seconds (rounded to milliseconds).
    @ivar ip: the client address to record (C{ip=1}), or L{None}.
    @ivar importTokens: on C{/import}, the project tokens the credentials
        cover; a record's token must be one of them.
    @ivar geo: with C{--geoip}, what geolocates records and applies the IP
        privacy policy; L{ip} is then the address to geolocate (and not
        stored unless the policy says so).
    @ivar requireInsertId: on C{/import}, whether C{$insert_id} is
        required (JSON bodies, as the Ingestion API reference specifies).
    """

    received: float
    ip: Optional[str] = None
    importTokens: Optional[FrozenSet[str]] = None
    geo: Optional[Geolocator] = None
    requireInsertId: bool = False


class CleanItem(NamedTuple):
    """
    One record ready for the funnel: the token it is routed and counted by,
    its C{$insert_id} for deduplication (or L{None}), and the encoded item.
    """

    token: str
    insertId: Optional[str]
    payload: bytes


class Cleaned(NamedTuple):
    items: List[CleanItem]
    failures: List[Tuple[int, InvalidEvent, Optional[str]]]
    """
    Each rejected record's index in the request, why, and its C{$insert_id}.
    """
    truncated: int


class _Walk:
    """
    Checks and cleans property values in place, counting truncations.  A
    class rather than closures so that one allocation serves a whole request;
    field paths are only built when a value is rejected.
    """

    __slots__ = ("nested", "truncate", "truncated")

    def __init__(self, truncate: bool) -> None:
        self.truncate = truncate
        self.truncated = 0
        self.nested = False

    def value(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str:
            if len(value) > MAX_STRING and self.truncate:
                self.truncated += 1
                return value[:MAX_STRING]
            return value
        if kind is int:
            if not -INT64 <= value < INT64:
                raise InvalidEvent("", "integer out of the 64-bit range")
            return value
        if kind is float:
            if value - value != 0.0:
                raise InvalidEvent("", "NaN and Infinity are not valid JSON numbers")
            return value
        if value is None or kind is bool:
            return value
        if depth >= MAX_DEPTH:
            raise InvalidEvent("", f"nested deeper than {MAX_DEPTH} levels")
        if kind is list:
            if len(value) > MAX_COLLECTION:
                raise InvalidEvent("", f"list longer than {MAX_COLLECTION} elements")
            for i, element in enumerate(value):
                try:
                    value[i] = self.value(element, depth + 1)
                except InvalidEvent as e:
                    raise _within(str(i), e) from None
            return value
        if kind is dict:
            return self.mapping(value, depth + 1, MAX_COLLECTION)
        raise InvalidEvent("", f"unsupported value of type {kind.__name__}")

    def mapping(self, value: Dict[str, Any], depth: int, limit: int) -> Dict[str, Any]:
        if len(value) > limit:
            raise InvalidEvent("", f"more than {limit} keys")
        renamed = None
        truncate = self.truncate
        # Constants as locals: this loop runs for every property of every event.
        maxString, maxName, low, high = MAX_STRING, MAX_NAME, -INT64, INT64
        for key, element in value.items():
            # The common values inline (a call per property is most of the
            # walk's cost); the rest, and every refusal, through value().
            kind = type(element)
            if kind is str:
                if len(element) > maxString and truncate:
                    self.truncated += 1
                    value[key] = element[:maxString]
            elif not (
                (kind is int and low <= element < high)
                or (kind is float and element - element == 0.0)
                or kind is bool
                or element is None
            ):
                if kind is list or kind is dict:
                    self.nested = True
                try:
                    cleaned = self.value(element, depth)
                except InvalidEvent as e:
                    raise _within(key, e) from None
                if cleaned is not element:
                    value[key] = cleaned
            if len(key) > maxName:
                if renamed is None:
                    renamed = []
                renamed.append(key)
        if renamed:
            if not self.truncate:
                raise _within(
                    renamed[0][:40] + "...",
                    InvalidEvent("", f"property name longer than {MAX_NAME} characters"),
                )
            for key in renamed:
                self.truncated += 1
                value[key[:MAX_NAME]] = value.pop(key)
        return value

    def properties(self, props: Dict[str, Any], where: str) -> None:
        self.nested = False
        try:
            self.mapping(props, 0, MAX_PROPERTIES)
        except InvalidEvent as e:
            raise _within(where, e) from None
        if self.nested:
            self.sizes(props, where)

    def sizes(self, props: Dict[str, Any], where: str) -> None:
        """
        Refuse a list or object property larger than Mixpanel keeps.
        """
        for key, element in props.items():
            if type(element) in (list, dict):
                try:
                    size = len(codec.dumps(element))
                except ValueError:
                    raise InvalidEvent(
                        f"{where}.{key}",
                        "contains text that is not valid Unicode (a lone surrogate)",
                    ) from None
                if size > MAX_COLLECTION_BYTES:
                    raise InvalidEvent(
                        f"{where}.{key}",
                        f"list or object larger than {MAX_COLLECTION_BYTES} bytes",
                    )

    def others(self, record: Dict[str, Any], checked: Tuple[str, ...]) -> None:
        """
        Check the top-level fields no endpoint rule covers, so that nothing
        stored escapes the value limits (NaN, huge integers, deep nesting).
        """
        for key, element in record.items():
            if key not in checked:
                try:
                    cleaned = self.value(element, 0)
                except InvalidEvent as e:
                    raise _within(key, e) from None
                if cleaned is not element:
                    record[key] = cleaned


def _within(key: str, error: InvalidEvent) -> InvalidEvent:
    return InvalidEvent(f"{key}.{error.field}" if error.field else key, error.message)


def normaliseTime(value: Any, field: str) -> float | int:
    """
    Seconds since the epoch from seconds, fractional seconds or milliseconds.

    Values at or past 10**11 are milliseconds and are divided by 1000; the
    result keeps millisecond precision and is an integer when whole.
    """
    kind = type(value)
    if kind is int:
        # Whole seconds as they are; whole milliseconds divided without
        # round(), which would not change the quotient (the double nearest a
        # number of milliseconds is what the division gives) and costs as
        # much as the rest of this function.
        if 0 < value < MILLISECONDS_FROM:
            return value
        if MILLISECONDS_FROM <= value < MAX_TIME:
            seconds, milliseconds = divmod(value, 1000)
            return seconds if not milliseconds else value / 1000
    elif kind is not float:
        raise InvalidEvent(field, "must be a number of seconds or milliseconds since the epoch")
    if not 0 < value < MAX_TIME:
        raise InvalidEvent(field, "out of range")
    if value >= MILLISECONDS_FROM:
        value = value / 1000
    value = round(value, 3)
    if value <= 0:  # under half a millisecond after the epoch: 0 once rounded
        raise InvalidEvent(field, "out of range")
    if value.is_integer():
        return int(value)
    return value


def _distinctId(value: Any, field: str, required: bool) -> None:
    if value is None:
        if required:
            raise InvalidEvent(field, "missing")
        return
    kind = type(value)
    if kind is str:
        if not value or len(value) > MAX_STRING:
            raise InvalidEvent(field, f"must be 1 to {MAX_STRING} characters")
    elif kind is not int:
        raise InvalidEvent(field, "must be a string")


def _token(value: Any, field: str) -> str:
    if type(value) is not str or not value:
        raise InvalidEvent(field, "missing or empty")
    if len(value) > MAX_STRING:
        raise InvalidEvent(field, f"longer than {MAX_STRING} characters")
    return value


def _importIds(props: Dict[str, Any], context: Context) -> None:
    """
    The identifiers Mixpanel's C{/import} requires: C{distinct_id} (the
    empty string allowed) and C{$insert_id}, neither a placeholder.
    """
    distinctId = props.get("distinct_id")
    if distinctId is None:
        raise InvalidEvent("properties.distinct_id", "required on /import")
    if str(distinctId).lower() in PLACEHOLDER_IDS:
        raise InvalidEvent("properties.distinct_id", f"{distinctId!r} is a placeholder, not an id")
    insertId = props.get("$insert_id")
    if insertId is None:
        if context.requireInsertId:
            raise InvalidEvent("properties.$insert_id", "required on /import")
    elif str(insertId).lower() in PLACEHOLDER_IDS:
        raise InvalidEvent("properties.$insert_id", f"{insertId!r} is a placeholder, not an id")


def _insertId(value: Any, field: str) -> Optional[str]:
    if value is None:
        return None
    if type(value) is not str or INSERT_ID.match(value) is None:
        raise InvalidEvent(field, "must be 1 to 36 characters of A-Z, a-z, 0-9 and -")
    return value


_cleanItem = tuple.__new__
"""
Makes a L{CleanItem} without the generated C{__new__}, a Python call per
event.
"""


def _encode(record: Dict[str, Any]) -> bytes:
    try:
        payload = codec.dumps(record)
    except ValueError:
        raise InvalidEvent(
            "", "contains text that is not valid Unicode (a lone surrogate)"
        ) from None
    if len(payload) > MAX_ITEM_BYTES:
        raise InvalidEvent("", f"larger than {MAX_ITEM_BYTES} bytes once encoded")
    return payload


_EVENT_FIELDS = ("event", "properties")


def _event(record: Any, context: Context, walk: _Walk, imported: bool) -> CleanItem:
    # The hot path of every batch: the common case (short strings, a
    # well-formed token, $insert_id and distinct_id) is checked inline, and
    # only a value that fails it goes through the helper that says why.
    if type(record) is not dict:
        raise InvalidEvent("", "each event must be a JSON object")
    name = record.get("event")
    if type(name) is not str or not name:
        raise InvalidEvent("event", "missing or empty (must be a non-empty string)")
    if len(name) > MAX_NAME:
        walk.truncated += 1
        record["event"] = name[:MAX_NAME]
    props = record.get("properties")
    if props is None and imported and context.importTokens is not None:
        props = record["properties"] = {}
    if type(props) is not dict:
        raise InvalidEvent("properties", "missing or not an object")
    token = props.get("token")
    if imported:
        tokens = context.importTokens or frozenset()
        if token is None and len(tokens) == 1:
            token = props["token"] = next(iter(tokens))
        elif type(token) is not str or token not in tokens:
            raise InvalidEvent("properties.token", "not a project the credentials are for")
    if type(token) is not str or not 0 < len(token) <= MAX_STRING:
        _token(token, "properties.token")
    insertId = props.get("$insert_id")
    if insertId is not None and (type(insertId) is not str or _INSERT_ID(insertId) is None):
        _insertId(insertId, "properties.$insert_id")
    distinctId = props.get("distinct_id")
    # /import takes the empty string (an event of no one in particular).
    if (
        distinctId is not None
        and (type(distinctId) is not str or not 0 < len(distinctId) <= MAX_STRING)
        and not (imported and distinctId == "")
    ):
        _distinctId(distinctId, "properties.distinct_id", False)
    # $merge (Python SDK merge(), Mixpanel's identity-merge reference) comes
    # to /import without a time, a distinct_id or an $insert_id, and
    # Mixpanel takes it.  (A name truncated above was no "$merge" either.)
    merge = name == "$merge"
    # walk.properties(props, "properties") and _encode(record) inline: a
    # Python call costs as much as a property's check.
    walk.nested = False
    try:
        walk.mapping(props, 0, MAX_PROPERTIES)
    except InvalidEvent as e:
        raise _within("properties", e) from None
    if walk.nested:
        walk.sizes(props, "properties")
    if len(record) > 2:
        walk.others(record, _EVENT_FIELDS)
    when = props.get("time")
    if when is None:
        if imported and not merge:
            raise InvalidEvent("properties.time", "required on /import")
        props["time"] = context.received
    else:
        props["time"] = when = normaliseTime(when, "properties.time")
        if imported:
            if when < IMPORT_EARLIEST:
                raise InvalidEvent("properties.time", "before 1971-01-01, which /import refuses")
            if when > context.received + IMPORT_FUTURE:
                raise InvalidEvent(
                    "properties.time", "more than an hour in the future, which /import refuses"
                )
    if imported and not merge:
        _importIds(props, context)
    if context.geo is not None:
        context.geo.event(props, context.ip)
    elif context.ip is not None and "ip" not in props:
        props["ip"] = context.ip
    record["received_at"] = context.received
    return _cleanItem(CleanItem, (token, insertId, _encode(record)))


def _update(
    record: Any,
    context: Context,
    walk: _Walk,
    rule: Tuple[Tuple[str, ...], Tuple[str, ...]],
) -> CleanItem:
    identity, operations = rule
    if type(record) is not dict:
        raise InvalidEvent("", "each update must be a JSON object")
    token = _token(record.get("$token"), "$token")
    for key in identity:
        _distinctId(record.get(key), key, True)
    present = [op for op in operations if op in record]
    if len(present) != 1:
        raise InvalidEvent(
            "",
            f"needs exactly one operation of {', '.join(operations)}"
            + (f", got {', '.join(present)}" if present else ""),
        )
    op = present[0]
    value = record[op]
    if op == "$unset":
        if type(value) is not list or not all(type(n) is str for n in value):
            raise InvalidEvent(op, "must be a list of property names")
    elif op != "$delete":
        if type(value) is not dict:
            raise InvalidEvent(op, "must be an object of properties")
        walk.properties(value, op)
        if op == "$add" and not all(type(v) in (int, float) for v in value.values()):
            raise InvalidEvent(op, "values must be numbers")
        if op == "$union" and not all(type(v) is list for v in value.values()):
            raise InvalidEvent(op, "values must be lists")
    walk.others(record, () if op == "$delete" else (op,))
    if "$time" in record:
        record["$time"] = normaliseTime(record["$time"], "$time")
    if identity == ("$distinct_id",):
        if context.geo is not None:
            context.geo.update(record, op, context.ip)
        elif context.ip is not None and "$ip" not in record:
            record["$ip"] = context.ip
    record["received_at"] = context.received
    return _cleanItem(CleanItem, (token, None, _encode(record)))


_ENGAGE = (("$distinct_id",), ENGAGE_OPERATIONS)
_GROUPS = (("$group_key", "$group_id"), GROUP_OPERATIONS)

_CLEANERS: Dict[str, Tuple[Callable[[Any, Context, _Walk, Any], CleanItem], bool, Any]] = {
    # endpoint: (cleaner, whether long strings are truncated, the cleaner's rule)
    "track": (_event, True, False),
    "import": (_event, True, True),
    "engage": (_update, False, _ENGAGE),
    "groups": (_update, False, _GROUPS),
}

ENDPOINTS = tuple(_CLEANERS)


def clean(endpoint: str, records: List[Any], context: Context) -> Cleaned:
    """
    Clean every record of one request; one bad record never costs the others.

    Events (C{/track}, C{/import}) have long strings truncated as Mixpanel
    does; profile and group updates are checked but never truncated, because
    Mixpanel keeps long profile values.
    """
    cleaner, truncate, rule = _CLEANERS[endpoint]
    walk = _Walk(truncate)
    items: List[CleanItem] = []
    failures: List[Tuple[int, InvalidEvent, Optional[str]]] = []
    for index, record in enumerate(records):
        try:
            items.append(cleaner(record, context, walk, rule))
        except InvalidEvent as e:
            failures.append((index, e, _failedInsertId(record)))
    return Cleaned(items, failures, walk.truncated)


def _failedInsertId(record: Any) -> Optional[str]:
    if type(record) is dict:
        props = record.get("properties")
        if type(props) is dict:
            insertId = props.get("$insert_id")
            if type(insertId) is str:
                return insertId[:MAX_STRING]
    return None
