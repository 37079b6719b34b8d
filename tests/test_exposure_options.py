"""
The options of issue 11's exposure fixes and how C{makeService} wires them;
their behaviour is tested in L{tests.test_exposure} and the unit tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError

from mixingest.funnel import Funnel
from mixingest.options import Options
from mixingest.tap import makeService

MiB = 1024 * 1024


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    options = parse()
    assert options["max-buffered-bytes"] == 128 * MiB
    assert options["max-connections"] == 1000
    assert options["global-rate-limit"] is None
    assert options["tokens"] is None
    assert options["redirect-allow"] == []


def test_given(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('["a"]')
    options = parse(
        f"--tokens={tokens}",
        "--max-buffered-bytes=20000000",
        "--max-connections=10",
        "--global-rate-limit=2.5",
        "--redirect-allow=Shop.Example",
        "--redirect-allow=www.shop.example",
    )
    assert options["tokens"] == str(tokens)
    assert (options["max-buffered-bytes"], options["max-connections"]) == (20_000_000, 10)
    assert options["global-rate-limit"] == 2.5
    assert options["redirect-allow"] == ["shop.example", "www.shop.example"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens=/nonexistent"], "--tokens: no such file"),
        (["--max-connections=0"], "positive"),
        (["--global-rate-limit=-1"], "positive"),
        (["--redirect-allow=https://shop.example/"], "takes a host name"),
        (["--redirect-allow=shop example"], "takes a host name"),
        (["--max-body=7000000", "--max-buffered-bytes=7000000"], "at least 8000000"),
    ],
)
def test_bad(args: List[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*args)


def test_wired(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('["a"]')
    tokens.chmod(0o600)
    top = makeService(
        parse(
            f"--data-dir={tmp_path / 'data'}",
            f"--tokens={tokens}",
            "--max-buffered-bytes=20000000",
            "--max-connections=10",
            "--global-rate-limit=3",
        ),
        MemoryReactorClock(),
    )
    [funnel] = [s for s in top if isinstance(s, Funnel)]
    [listener] = [s for s in top if isinstance(s, StreamServerEndpointService)]
    site = listener.factory
    assert (site.budget.limit, site.maxConnections) == (20_000_000, 10)
    assert funnel.limiter is not None
    assert (funnel.limiter.rate, funnel.limiter.globalRate) == (None, 3)
    assert funnel.status()["http"] == site.status()


def rotationWarnings(*args: str) -> List[str]:
    """
    The warnings C{makeService} logs about tokens rotated past the
    per-token rate limit, for these options.
    """
    events: List[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        makeService(parse(*args), MemoryReactorClock())
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [
        formatEvent(e)
        for e in events
        if e.get("log_level") == LogLevel.warn and "fresh project token" in formatEvent(e)
    ]


@pytest.mark.parametrize(
    "args, limits, warned",
    [
        (["--rate-limit=5"], None, True),
        ([], {"rate_limit": 5}, True),
        (["--rate-limit=5", "--workers=2"], None, True),
        (["--rate-limit=5", "--global-rate-limit=50"], {"global_rate_limit": None}, True),
        (["--rate-limit=5", "--global-rate-limit=50"], None, False),
        (["--rate-limit=5"], {"global_rate_limit": 50}, False),
        (["--rate-limit=5", "--workers=2"], {"global_rate_limit": 50}, False),
        (["--rate-limit=5", "--tokens=TOKENS"], None, False),
        (["--rate-limit=5"], {"rate_limit": None}, False),
        ([], None, False),
    ],
)
def test_rotatingTokensWarned(
    tmp_path: Path, args: List[str], limits: Optional[dict], warned: bool
) -> None:
    """
    A per-token rate limit alone (from the command line or a limits file,
    in one process or the parent of workers) is logged once as no bound
    on a client rotating tokens, naming the two options that bound it;
    with either of them, nothing is logged.
    """
    tokens = tmp_path / "tokens.json"
    tokens.write_text('["a"]')
    tokens.chmod(0o600)
    args = [a.replace("TOKENS", str(tokens)) for a in args]
    if limits is not None:
        path = tmp_path / "limits.json"
        path.write_text(json.dumps(limits))
        args.append(f"--limits-file={path}")
    found = rotationWarnings(
        f"--data-dir={tmp_path / 'data'}", "--listen=tcp:0", "--shutdown-grace=0", *args
    )
    if warned:
        [warning] = found
        assert "--global-rate-limit" in warning and "--tokens" in warning
    else:
        assert found == []
