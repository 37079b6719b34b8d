# -*- test-case-name: tests.test_tokens -*-
"""
Reading the small JSON files an operator points the daemon at (C{--tokens},
C{--import-secrets}, C{--routes-file}, C{--limits-file}), at start and
again on SIGHUP.
"""

from __future__ import annotations

import json
from typing import Any

from mixingest.secretfiles import warnIfExposed

__all__ = ["readJSONFile"]


def readJSONFile(path: str, what: str, private: bool = True) -> Any:
    """
    Read and parse a whole JSON file; if C{private}, warn when users other
    than its owner may read it: it may hold secrets, and a tokens file says
    which projects exist.

    This blocks, which is fine for a file of a few KB read at start or on
    SIGHUP, and nowhere else.

    @param what: the option that names the file (C{"--tokens"}), for the
        messages.
    @raise ValueError: it cannot be read or is not JSON, with a message that
        says which file and why.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
        if private:
            warnIfExposed(path, what)
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path!r}: {e.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
