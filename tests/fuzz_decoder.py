"""
An atheris (libFuzzer) target for the decoder and the cleaner: any query, body
and Content-Encoding must give cleaned items (strict JSON objects within the
size limit) or a clean L{DecodeError} / L{BodyTooLarge}; anything else is a
crash that atheris reports with the input that caused it.

    pip install atheris
    PYTHONPATH=. python tests/fuzz_decoder.py -max_total_time=60 [CORPUS_DIR]

Not collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from mixingest.cleaning import MAX_ITEM_BYTES, Context, clean
    from mixingest.decoding import decodeRequest
    from mixingest.errors import BodyTooLarge, DecodeError

MAX_BODY = 256 * 1024
CONTEXT = Context(1700000000.25, "127.0.0.1", frozenset(["tok"]))
ENCODINGS = [None, b"gzip", b"identity", b"", b"br", b"x-gzip"]
SEEDS = [
    b'data={"event":"e","properties":{"token":"tok","time":1700000000}}',
    b'[{"event":"e","properties":{"token":"tok","x":[1,{"a":null}]}}]',
    b'{"$token":"tok","$distinct_id":"d","$set":{"a":1}}',
    b"data=eyJldmVudCI6ImUiLCJwcm9wZXJ0aWVzIjp7InRva2VuIjoidG9rIn19",
]


def refuse(name: str) -> None:
    raise AssertionError(f"{name} in a stored item")


def testOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    encoding = ENCODINGS[fdp.ConsumeIntInRange(0, len(ENCODINGS) - 1)]
    query = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        decoded = decodeRequest(query, body, encoding, MAX_BODY)
    except (DecodeError, BodyTooLarge):
        return
    for endpoint in ("track", "import", "engage", "groups"):
        records: Any = json.loads(json.dumps(decoded.items, allow_nan=True))
        cleaned = clean(endpoint, records, CONTEXT)
        assert len(cleaned.items) + len(cleaned.failures) == len(decoded.items)
        for item in cleaned.items:
            assert len(item.payload) <= MAX_ITEM_BYTES
            stored = json.loads(item.payload.decode("utf-8"), parse_constant=refuse)
            assert isinstance(stored, dict)


def main() -> None:
    for seed in SEEDS:
        testOneInput(b"\x00\x00" + seed)
    atheris.Setup(sys.argv, testOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
