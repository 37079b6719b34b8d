"""
The minimal job every peer does, shared so that all three do exactly the
same work: base64, JSON, one event or a list, C{event} and
C{properties.token} required, the client address and the time received
added, each event encoded again for the queue.  The peers import it from
their own directory (a script's directory is first on C{sys.path}).
"""

from __future__ import annotations

import base64
import time
from typing import Any, Callable, List


def decode(
    data: str, ip: str, loads: Callable[[bytes], Any], dumps: Callable[[Any], str]
) -> List[str]:
    """
    The encoded events of C{data}, with C{loads}/C{dumps} of the peer's
    JSON library; C{ValueError} on anything malformed.
    """
    try:
        payload = loads(base64.b64decode(data))
    except Exception as e:
        raise ValueError(str(e)) from None
    events = payload if isinstance(payload, list) else [payload]
    received = time.time()
    out = []
    for event in events:
        props = event.get("properties") if isinstance(event, dict) else None
        if not isinstance(props, dict) or not event.get("event") or not props.get("token"):
            raise ValueError("event and properties.token are required")
        props["ip"] = ip
        event["received_at"] = received
        out.append(dumps(event))
    return out
