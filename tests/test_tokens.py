"""
C{--tokens} and C{--import-secrets} files: read, re-read on SIGHUP
(C{reload}), refused with a clear reason when bad (the settings in use
stay), and a warning when others may read them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from mixingest.auth import ImportSecrets
from mixingest.tokens import TokenList


@pytest.fixture
def warnings() -> Iterator[List[str]]:
    seen: List[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


def write(path: Path, value: Any, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(value) if not isinstance(value, str) else value)
    path.chmod(mode)
    return path


def test_tokensFromFile(tmp_path: Path, warnings: List[str]) -> None:
    tokens = TokenList.fromFile(str(write(tmp_path / "tokens.json", ["a", "b"])))
    assert "a" in tokens and "b" in tokens and "c" not in tokens
    assert len(tokens) == 2
    assert warnings == []


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{", "is not valid JSON"),
        ({"a": "b"}, "must hold a JSON array of project token strings"),
        (["a", 1], "must hold a JSON array of project token strings"),
        (["a", ""], "must hold a JSON array of project token strings"),
    ],
)
def test_badTokensFile(tmp_path: Path, content: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        TokenList.fromFile(str(write(tmp_path / "tokens.json", content)))


def test_tokensReload(tmp_path: Path) -> None:
    """
    reload() takes the new file whole; a bad or missing file raises and
    the tokens in use stay.
    """
    path = write(tmp_path / "tokens.json", ["a"])
    tokens = TokenList.fromFile(str(path))
    write(path, ["b", "c"])
    tokens.reload()
    assert ("a" in tokens, "b" in tokens) == (False, True)
    write(path, '["d", ')
    with pytest.raises(ValueError, match=r"tokens\.json is not valid JSON"):
        tokens.reload()
    path.unlink()
    with pytest.raises(ValueError, match="cannot read the --tokens file"):
        tokens.reload()
    assert "b" in tokens and "c" in tokens
    with pytest.raises(ValueError, match="not read from a file"):
        TokenList(["x"]).reload()


def basic(secret: str) -> DummyRequest:
    r = DummyRequest([b"import"])
    r.requestHeaders.setRawHeaders(
        b"authorization", [b"Basic " + base64.b64encode(secret.encode() + b":")]
    )
    return r


def test_secretsReload(tmp_path: Path) -> None:
    path = write(tmp_path / "secrets.json", {"tok": "one"})
    secrets = ImportSecrets.fromFile(str(path))
    write(path, {"tok": "two"})
    secrets.reload()
    assert secrets.tokensFor(basic("two"), {}) == {"tok"}
    for bad in ("[]", '{"tok": ""}', "{"):
        write(path, bad)
        with pytest.raises(ValueError):
            secrets.reload()
    path.unlink()
    with pytest.raises(ValueError, match="cannot read the --import-secrets file"):
        secrets.reload()
    assert secrets.tokensFor(basic("two"), {}) == {"tok"}


@pytest.mark.parametrize(
    "load, option",
    [(TokenList.fromFile, "--tokens"), (ImportSecrets.fromFile, "--import-secrets")],
    ids=["tokens", "import-secrets"],
)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_warnWhenOthersMayRead(
    tmp_path: Path, warnings: List[str], load: Callable[[str], Any], option: str, mode: int
) -> None:
    """
    A file others than its owner may read is used, with a warning that
    says which and how to fix it; a private one (the control) is not.
    """
    path = write(tmp_path / "file.json", {"tok": "s"} if "secrets" in option else ["tok"])
    load(str(path))
    assert warnings == []
    path.chmod(mode)
    load(str(path))
    [warning] = warnings
    assert option in warning and str(path) in warning and "chmod 600" in warning
