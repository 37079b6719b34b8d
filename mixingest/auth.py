"""
Credentials for C{/import}: project secrets from C{--import-secrets}.

Mixpanel's import endpoint takes the project secret as the HTTP Basic user
name (legacy), as the password of C{user:secret} with C{project_id} (service
accounts), or as C{api_key} (the Python SDK sends it in the body).  Secrets
are looked up by their SHA-256 digest and confirmed with
L{hmac.compare_digest}, so the time an answer takes says nothing about how
much of a guessed secret was right; they are never logged.

With C{--import-token-auth}, the project token itself as the Basic user name
with an empty password (as Mixpanel accepts it, and the official Java SDK
imports) authorises that project, if C{--import-secrets} has it: anyone who
knows the token, which every web page using the SDK shows, may then import
(and so backdate) events into it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from twisted.web.iweb import IRequest

from mixingest.errors import Unauthorized
from mixingest.settingsfile import readJSONFile

__all__ = ["ImportSecrets"]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class ImportSecrets:
    """
    Which project tokens a presented secret may import into.
    """

    def __init__(self, secrets: Mapping[str, str], tokenAuth: bool = False) -> None:
        """
        @param tokenAuth: whether a project token alone (C{token:}) is
            credentials for its project (C{--import-token-auth}).
        """
        self.tokenAuth = tokenAuth
        byDigest: Dict[bytes, Tuple[str, List[str]]] = {}
        for token, secret in secrets.items():
            if not isinstance(token, str) or not isinstance(secret, str) or not secret:
                raise ValueError("import secrets must map token strings to non-empty secrets")
            byDigest.setdefault(_digest(secret), (secret, []))[1].append(token)
        self._byDigest = {
            digest: (secret, frozenset(tokens)) for digest, (secret, tokens) in byDigest.items()
        }
        self._tokens = frozenset(secrets)

    @classmethod
    def fromFile(cls, path: str, tokenAuth: bool = False) -> ImportSecrets:
        """
        Read a JSON object mapping project token to API secret, warning if
        the file is readable by others than its owner.

        @raise ValueError: the file cannot be read or is not such an object.
        """
        secrets = readJSONFile(path, "--import-secrets")
        if not isinstance(secrets, dict):
            raise ValueError(f"{path} must hold a JSON object of token to secret")
        loaded = cls(secrets, tokenAuth)
        loaded.path = path
        return loaded

    path: Optional[str] = None
    """The file read by L{fromFile}, which L{reload} reads again."""

    def reload(self) -> None:
        """
        Read L{path} again and take its secrets, all at once (SIGHUP).

        @raise ValueError: the file is not a valid secrets file; the
            secrets in use stay.
        """
        if self.path is None:
            raise ValueError("these import secrets were not read from a file")
        loaded = ImportSecrets.fromFile(self.path)
        self._byDigest, self._tokens = loaded._byDigest, loaded._tokens

    def tokensFor(self, request: IRequest, params: Mapping[str, str]) -> FrozenSet[str]:
        """
        The project tokens the request's credentials cover.

        @raise Unauthorized: no credentials, or none that match.
        """
        presented, token = _presented(request, params)
        if not presented:
            raise Unauthorized("missing credentials: send the project secret with HTTP Basic auth")
        for secret in presented:
            entry = self._byDigest.get(_digest(secret))
            if entry is not None and hmac.compare_digest(
                entry[0].encode("utf-8"), secret.encode("utf-8")
            ):
                return entry[1]
        if self.tokenAuth and token is not None and token in self._tokens:
            return frozenset((token,))
        raise Unauthorized("Invalid credentials")


def _presented(request: IRequest, params: Mapping[str, str]) -> Tuple[List[str], Optional[str]]:
    """
    The secrets presented, and the Basic user name if its password is empty
    (which is a project token with C{--import-token-auth}).
    """
    secrets = []
    token = None
    authorization = request.getHeader(b"authorization")
    if authorization:
        scheme, _, encoded = authorization.partition(b" ")
        if scheme.lower() == b"basic":
            try:
                user, _, password = (
                    base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                raise Unauthorized("malformed HTTP Basic credentials") from None
            secret: Optional[str] = password or user
            if secret:
                secrets.append(secret)
            if user and not password:
                token = user
    apiKey = params.get("api_key")
    if apiKey:
        secrets.append(apiKey)
    return secrets, token
