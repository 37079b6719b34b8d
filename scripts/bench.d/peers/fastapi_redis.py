"""
Peer: FastAPI + uvicorn (one worker, uvloop, httptools) -> Redis through
redis.asyncio with hiredis, one C{RPUSH KEY ITEM...} per request.

    python fastapi_redis.py --port PORT --redis redis://127.0.0.1:6379/0 --key events

The minimal job of a Mixpanel-style C{/track} endpoint, written the way the
framework's documentation teaches (a route per method, C{Form} for the POST
body): take C{data}, base64-decode it, JSON-decode it, accept one event or a
list, check that each has C{event} and C{properties.token}, add
C{properties.ip} and C{received_at}, push, answer C{1} (C{0} on bad input;
the C{{"status":...}} JSON with C{verbose=1}).  Nothing else: no cleaning,
no dedupe, no limits, no metrics, no spool when Redis is down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any, AsyncIterator, List, Optional

import minimal
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Form, Request
from fastapi.responses import PlainTextResponse, Response

queue: Optional[aioredis.Redis] = None
URL = ""
KEY = "events"


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global queue
    queue = aioredis.Redis.from_url(URL)
    yield
    await queue.aclose()


app = FastAPI(lifespan=lifespan)


def decode(data: str, ip: str) -> List[str]:
    """The minimal job, with the standard library's json."""
    return minimal.decode(data, ip, json.loads, json.dumps)


def answer(ok: bool, verbose: Optional[str], error: str = "") -> Response:
    if verbose == "1":
        body: Any = {"status": 1, "error": None} if ok else {"status": 0, "error": error}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")
    return PlainTextResponse("1" if ok else "0")


async def track(request: Request, data: Optional[str], verbose: Optional[str]) -> Response:
    try:
        events = decode(data or "", request.client.host if request.client else "")
    except ValueError as e:
        return answer(False, verbose, str(e))
    assert queue is not None
    await queue.rpush(KEY, *events)
    return answer(True, verbose)


@app.get("/track")
@app.get("/track/")
async def trackGet(
    request: Request, data: Optional[str] = None, verbose: Optional[str] = None
) -> Response:
    return await track(request, data, verbose)


@app.post("/track")
@app.post("/track/")
async def trackPost(
    request: Request, data: Optional[str] = Form(None), verbose: Optional[str] = None
) -> Response:
    return await track(request, data, verbose)


def main() -> None:
    global URL, KEY
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--key", default="events")
    args = parser.parse_args()
    URL, KEY = args.redis, args.key
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
