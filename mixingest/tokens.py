# -*- test-case-name: tests.test_tokens -*-
"""
C{--tokens FILE}: the project tokens this daemon accepts events and updates
for.  Without it, any token is accepted, as Mixpanel's own endpoints do (a
token is public: it is in every web page that tracks); with it, a record for
another token is refused alone, like any invalid record, and never stored.
"""

from __future__ import annotations

from typing import FrozenSet, Iterable, Optional

from mixingest.settingsfile import readJSONFile

__all__ = ["TokenList"]


class TokenList:
    """
    A set of accepted project tokens, read from a JSON array of strings.

    @ivar path: the file it was read from, which L{reload} reads again.
    """

    def __init__(self, tokens: Iterable[str], path: Optional[str] = None) -> None:
        self.tokens: FrozenSet[str] = frozenset(tokens)
        self.path = path

    @classmethod
    def fromFile(cls, path: str) -> TokenList:
        """
        Read a JSON array of project token strings.

        @raise ValueError: the file cannot be read or is not such an array.
        """
        tokens = readJSONFile(path, "--tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(token, str) and token for token in tokens
        ):
            raise ValueError(f"{path} must hold a JSON array of project token strings")
        return cls(tokens, path)

    def reload(self) -> None:
        """
        Read L{path} again and take its tokens, all at once (SIGHUP).

        @raise ValueError: the file is not a valid tokens file; the tokens in
            use stay.
        """
        if self.path is None:
            raise ValueError("these tokens were not read from a file")
        self.tokens = TokenList.fromFile(self.path).tokens

    def __contains__(self, token: object) -> bool:
        return token in self.tokens

    def __len__(self) -> int:
        return len(self.tokens)
