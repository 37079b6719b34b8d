"""
Tests for secrets kept out of the process list: the Redis password from a
file or the environment, the warning for a file others may read, and the
one for a password left in the C{--queue} URL.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from mixingest.options import Options
from mixingest.queues.urls import JournalTarget, RedisTarget
from mixingest.secretfiles import REDIS_PASSWORD_ENV, readSecretFile
from mixingest.tap import makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


@pytest.fixture(autouse=True)
def noPasswordInEnvironment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)


def test_passwordFromFile(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret:with@chars\n")
    secret.chmod(0o600)
    options = parse("--queue", "redis://127.0.0.1:6380/2", "--redis-password-file", str(secret))
    target = options["queue"]
    assert isinstance(target, RedisTarget)
    assert (target.host, target.port, target.db) == ("127.0.0.1", 6380, 2)
    assert target.password == "s3cret:with@chars"
    assert "s3cret" not in repr(target)


def test_passwordFromEnvironment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "from-env")
    target = parse("--queue", "redis+unix:///run/redis.sock")["queue"]
    assert isinstance(target, RedisTarget) and target.password == "from-env"
    # The variable is ignored by a daemon that does not use Redis.
    assert isinstance(parse()["queue"], JournalTarget)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--queue", "redis://:inline@h/0"], "given twice"),
        (["--queue", "kestrel://h"], "redis:// queue only"),
    ],
)
def test_passwordErrors(tmp_path: Path, args: list, message: str) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("pw")
    with pytest.raises(usage.UsageError, match=message):
        parse(*args, "--redis-password-file", str(secret))


def test_badPasswordFile(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(usage.UsageError, match="is empty"):
        parse("--queue", "redis://h", "--redis-password-file", str(empty))
    with pytest.raises(usage.UsageError, match="cannot read"):
        parse("--queue", "redis://h", "--redis-password-file", str(tmp_path / "missing"))


def test_warnsWhenOthersMayRead(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("pw")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        secret.chmod(0o600)
        assert readSecretFile(str(secret), "Redis password") == "pw"
        assert not events
        secret.chmod(0o644)
        readSecretFile(str(secret), "Redis password")
    finally:
        globalLogPublisher.removeObserver(events.append)
    (warning,) = events
    assert warning["log_level"] == LogLevel.warn
    assert "chmod 600" in warning["log_format"]
    assert os.stat(secret).st_mode & 0o044


def startWarnings(tmp_path: Path, *args: str) -> list[str]:
    """
    Every event C{makeService} logs at warning level, in full (its format,
    fields and text), for these options.
    """
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        makeService(
            parse(f"--data-dir={tmp_path / 'data'}", "--listen=tcp:0", *args), MemoryReactorClock()
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [f"{formatEvent(e)} {e!r}" for e in events if e.get("log_level") == LogLevel.warn]


@pytest.mark.parametrize("workers", ["--workers=1", "--workers=2"])
def test_passwordInURLWarned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    """
    A password in the C{--queue} URL is logged once (by the process started,
    not by each worker), naming the two other ways to give it, and never
    logged itself; given by a file or the environment, it is not warned
    about.
    """
    [warning] = startWarnings(tmp_path, "--queue=redis://:s3cret-pw@127.0.0.1:1/0", workers)
    assert "/proc/PID/cmdline" in warning
    assert "--redis-password-file" in warning and REDIS_PASSWORD_ENV in warning
    assert "s3cret-pw" not in warning
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret-pw")
    secret.chmod(0o600)
    url = "--queue=redis://127.0.0.1:1/0"
    assert startWarnings(tmp_path, url, f"--redis-password-file={secret}", workers) == []
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "s3cret-pw")
    assert startWarnings(tmp_path, url, workers) == []
