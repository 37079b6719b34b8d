"""
/import credentials.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Dict, Optional

import pytest
from twisted.web.test.requesthelper import DummyRequest

from mixingest.auth import ImportSecrets
from mixingest.errors import Unauthorized

SECRETS = ImportSecrets({"tokA": "secretA", "tokB": "secretB", "tokC": "secretA"})


def request(user: Optional[str] = None, password: str = "") -> DummyRequest:
    r = DummyRequest([b"import"])
    if user is not None:
        credentials = base64.b64encode(f"{user}:{password}".encode())
        r.requestHeaders.setRawHeaders(b"authorization", [b"Basic " + credentials])
    return r


def test_legacySecretAsUser() -> None:
    assert SECRETS.tokensFor(request("secretB"), {}) == {"tokB"}


def test_serviceAccount() -> None:
    assert SECRETS.tokensFor(request("account", "secretA"), {"project_id": "1"}) == {"tokA", "tokC"}


def test_apiKey() -> None:
    assert SECRETS.tokensFor(request(), {"api_key": "secretB"}) == {"tokB"}


@pytest.mark.parametrize(
    "user, password, params",
    [
        (None, "", {}),
        ("wrong", "", {}),
        ("account", "secretX", {}),
        (None, "", {"api_key": "secret"}),
    ],
)
def test_refused(user: Optional[str], password: str, params: Dict[str, str]) -> None:
    with pytest.raises(Unauthorized):
        SECRETS.tokensFor(request(user, password), params)


def test_malformedHeader() -> None:
    r = DummyRequest([b"import"])
    r.requestHeaders.setRawHeaders(b"authorization", [b"Basic !!!"])
    with pytest.raises(Unauthorized, match="malformed"):
        SECRETS.tokensFor(r, {})


def test_fromFile(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"tok": "s3cret"}))
    assert ImportSecrets.fromFile(str(path)).tokensFor(request("s3cret"), {}) == {"tok"}
    path.write_text("[]")
    with pytest.raises(ValueError, match="JSON object"):
        ImportSecrets.fromFile(str(path))
    path.write_text('{"tok": ""}')
    with pytest.raises(ValueError, match="non-empty"):
        ImportSecrets.fromFile(str(path))
