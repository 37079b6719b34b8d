# -*- test-case-name: tests.test_admin_logs -*-
"""
Logs as one flat JSON object per line, for log shippers (Vector, Fluent Bit,
journald to Loki...).

The daemon logs through twisted.logger; twistd picks the observer, and its
C{--logger} option is the hook for a different one::

    twistd --nodaemon --logger=mixingest.logs.jsonLogger mixingest ...

writes JSON lines to standard output (hence C{--nodaemon}, as under
systemd or in a container) instead of twistd's text log file.  Twisted's
own L{twisted.logger.jsonFileLogObserver} serialises the whole event
structure for Twisted to read back; shippers want flat, named fields.

There is no per-request access log unless C{--access-log} is given (it
costs about 15% of throughput); its lines then arrive here as messages.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, Dict, Optional

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent

__all__ = ["eventAsJSONLine", "jsonLogger"]

_SKIPPED = frozenset(
    ("format", "message", "isError", "time", "why", "failure", "system", "printed")
)
"""
Keys of events from the legacy twisted.python.log API that repeat what the
record already says.
"""

_SCALARS = (str, int, float, bool, type(None))


def eventAsJSONLine(event: LogEvent) -> Optional[str]:
    """
    C{event} as a JSON object and a newline: C{time} (ISO 8601, UTC),
    C{level}, C{namespace}, C{message} (the formatted text), C{system} when
    there is one, C{traceback} for a failure, and the event's own fields
    (what the code passed to the logger: values that are not JSON scalars
    are given as their C{repr}).
    """
    level = event.get("log_level")
    record: Dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        record["system"] = system
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIPPED or key in record:
            continue
        record[key] = value if isinstance(value, _SCALARS) else repr(value)
    return json.dumps(record) + "\n"


def jsonLogger() -> ILogObserver:
    """
    A log observer factory for twistd's C{--logger}: JSON lines to standard
    output.
    """
    return FileLogObserver(sys.stdout, eventAsJSONLine)
