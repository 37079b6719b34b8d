"""
Damage for the journal tests: what bit rot, a bad sector or a stray write
does to a segment.
"""

from __future__ import annotations


def flip(path: str, offset: int) -> None:
    """
    Change one bit of the byte at C{offset} of the file at C{path}.
    """
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))
