"""
Peer: aiohttp.web (its C HTTP parser, the default asyncio loop) -> Redis
through redis.asyncio with hiredis, one C{RPUSH KEY ITEM...} per request.

    python aiohttp_redis.py --port PORT --redis redis://127.0.0.1:6379/0 --key events

The same minimal job as the FastAPI peer (see fastapi_redis.py), in
aiohttp's idiom: C{request.query} for GET, C{await request.post()} for the
form body, the client connection made in an C{on_startup} hook.
"""

from __future__ import annotations

import argparse
import json
from typing import List

import minimal
import redis.asyncio as aioredis
from aiohttp import web


def decode(data: str, ip: str) -> List[str]:
    """The minimal job, with the standard library's json."""
    return minimal.decode(data, ip, json.loads, json.dumps)


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def answer(ok: bool, verbose: bool, error: str = "") -> web.Response:
    if verbose:
        body = {"status": 1, "error": None} if ok else {"status": 0, "error": error}
        return web.json_response(body, dumps=compact)
    return web.Response(text="1" if ok else "0")


async def track(request: web.Request) -> web.Response:
    verbose = request.query.get("verbose") == "1"
    if request.method == "POST":
        data = (await request.post()).get("data", "")
    else:
        data = request.query.get("data", "")
    try:
        events = decode(str(data), request.remote or "")
    except ValueError as e:
        return answer(False, verbose, str(e))
    await request.app["redis"].rpush(request.app["key"], *events)
    return answer(True, verbose)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--key", default="events")
    args = parser.parse_args()
    app = web.Application()
    app["key"] = args.key

    async def connect(app: web.Application) -> None:
        app["redis"] = aioredis.Redis.from_url(args.redis)

    app.on_startup.append(connect)
    for path in ("/track", "/track/"):
        app.router.add_get(path, track)
        app.router.add_post(path, track)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
