"""
Per-event costs of a batch of 50, in process: what the floor does to each
event (decode, add the address, re-encode) against what mixingest does
(the same decode, then clean, dedupe check and remember, journal framing).

    python scripts/bench.d/events.py [REPETITIONS]

Each repetition builds 200 fresh SDK-shaped batches (unique $insert_ids) and
times every step over all of them; prints the minimum and median over the
repetitions in microseconds per event.  A microbenchmark: it resolves
changes of a few tenths of a microsecond that wrk on a shared machine cannot.
"""

from __future__ import annotations

import base64
import copy
import gc
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from floor import encodeWithAddress
from twisted.internet.task import Clock

from mixingest.cleaning import Context, clean
from mixingest.decoding import decodeRequest
from mixingest.dedupe import RecentInsertIds
from mixingest.funnel import Funnel
from mixingest.journal.framing import encodeRecords

BATCHES = 200
EVENTS = 50


def event() -> Dict[str, Any]:
    return {
        "event": "Signed Up",
        "properties": {
            "token": "bench-token",
            "distinct_id": "user-4242",
            "time": 1718000000123,
            "$browser": "Chrome",
            "$os": "Linux",
            "$current_url": "https://example.com/signup?ref=bench",
            "mp_lib": "web",
            "$lib_version": "2.55.0",
            "plan": "pro",
            "$insert_id": str(uuid.uuid4()),
        },
    }


def storedItems(count: int) -> List[bytes]:
    """
    Distinct SDK-shaped events as the funnel stores them (the address and
    a processing time added), about 350 bytes each: what the queue writers'
    benchmarks put.
    """
    out = []
    for n in range(count):
        cleaned = event()
        cleaned["properties"].update(ip="203.0.113.7", mp_processing_time_ms=1718000000456 + n)
        out.append(json.dumps(cleaned, separators=(",", ":")).encode())
    return out


def body() -> bytes:
    data = base64.b64encode(json.dumps([event() for _ in range(EVENTS)]).encode())
    return b"data=" + data.replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


class _NoQueue:
    def status(self) -> Dict[str, Any]:
        return {}


def main(repetitions: int) -> None:
    context = Context(1718000000.123, "127.0.0.1", None)
    results: Dict[str, List[float]] = {}

    def timed(label: str, step: Callable[[Any], Any], inputs: List[Any]) -> List[Any]:
        started = time.perf_counter()
        outputs = [step(i) for i in inputs]
        elapsed = time.perf_counter() - started
        results.setdefault(label, []).append(elapsed / len(inputs) / EVENTS * 1e6)
        return outputs

    for _ in range(repetitions):
        bodies = [body() for _ in range(BATCHES)]
        gc.collect()
        decoded = timed(
            "decode (both)",
            lambda b: decodeRequest(b"ip=1&verbose=1", b, None, 10**7),
            bodies,
        )
        copies = [copy.deepcopy(d.items) for d in decoded]
        timed("floor: address + encode", lambda r: encodeWithAddress(r, "127.0.0.1"), copies)
        cleaned = timed("clean (with encode)", lambda d: clean("track", d.items, context), decoded)
        recent = RecentInsertIds()
        funnel = Funnel(_NoQueue(), Clock(), recent=recent)  # type: ignore[arg-type]
        groups = timed("dedupe check", lambda c, f=funnel: f._fresh(c.items, 1.0), cleaned)
        timed("dedupe remember", lambda g, r=recent: r.remember(g[0][2], 1.0), groups)
        timed("journal framing", lambda g: encodeRecords(g[0][1], 1), groups)
    for label, values in results.items():
        middle = statistics.median(values)
        print(f"{label:26s} min {min(values):5.2f}  median {middle:5.2f} us/event")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
