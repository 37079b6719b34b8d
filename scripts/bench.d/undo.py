"""
Run C{twistd} with some of the hot-path optimisations taken back, so that
C{scripts/bench --ablation} measures what each one buys in the same run:

    MIXINGEST_BENCH_UNDO=klein,freeze python scripts/bench.d/undo.py [twistd args]

  - C{klein}: Klein's own resource (a reference cycle per request) instead
    of L{mixingest._klein.AcyclicKleinResource};
  - C{freeze}: no C{gc.freeze()} after startup;
  - C{postform}: Twisted parses every form body into C{request.args} again;
  - C{request}: Twisted's C{requestReceived} and C{process} (query parsed
    into C{request.args}, Date header formatted per request);
  - C{cleaning}: the cleaner's walk calls a method per property value, and
    looks for nested values in a second pass.
"""

from __future__ import annotations

import os
from typing import Any, Dict


def _klein() -> None:
    import mixingest.api as api

    api.IngestAPI.resource = lambda self: self.app.resource()  # type: ignore[method-assign]


def _freeze() -> None:
    import mixingest.tap as tap

    tap.FrozenHeap.frozen = True


def _postform() -> None:
    import mixingest.httpsite as httpsite

    init = httpsite.HardenedSite.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._parsePOSTFormSubmission = True

    httpsite.HardenedSite.__init__ = __init__  # type: ignore[method-assign]


def _request() -> None:
    import mixingest.httpsite as httpsite

    del httpsite.IngestRequest.requestReceived
    del httpsite.IngestRequest.process


def _cleaning() -> None:
    import mixingest.cleaning as cleaning
    from mixingest import codec
    from mixingest.cleaning import MAX_NAME, MAX_PROPERTIES, InvalidEvent, _within

    def mapping(self: Any, value: Dict[str, Any], depth: int, limit: int) -> Dict[str, Any]:
        if len(value) > limit:
            raise InvalidEvent("", f"more than {limit} keys")
        renamed = None
        for key, element in value.items():
            try:
                cleaned = self.value(element, depth)
            except InvalidEvent as e:
                raise _within(key, e) from None
            if cleaned is not element:
                value[key] = cleaned
            if len(key) > MAX_NAME:
                renamed = (renamed or []) + [key]
        for key in renamed or ():
            self.truncated += 1
            value[key[:MAX_NAME]] = value.pop(key)
        return value

    def properties(self: Any, props: Dict[str, Any], where: str) -> None:
        try:
            self.mapping(props, 0, MAX_PROPERTIES)
        except InvalidEvent as e:
            raise _within(where, e) from None
        for element in props.values():
            if type(element) in (list, dict):
                codec.dumps(element)

    cleaning._Walk.mapping = mapping  # type: ignore[method-assign]
    cleaning._Walk.properties = properties  # type: ignore[method-assign]


UNDO = {
    "klein": _klein,
    "freeze": _freeze,
    "postform": _postform,
    "request": _request,
    "cleaning": _cleaning,
}


def main() -> None:
    for name in filter(None, os.environ.get("MIXINGEST_BENCH_UNDO", "").split(",")):
        UNDO[name]()
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    import sys

    sys.argv[0] = "twistd"
    main()
