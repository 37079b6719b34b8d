# -*- test-case-name: tests.test_redis_exactly_once -*-
"""
The Lua scripts that make a Redis write idempotent, and their arguments.

Every batch a producer sends to a list carries increasing sequence numbers.
Redis keeps, per (producer, list), the highest number stored so far: the
I{mark}.  The push script appends only the items numbered above the mark
and raises it, in one atomic step, so a batch that reaches Redis twice (a
command applied late after its timeout, a batch resent after a crash) is
stored once, and a resent batch that is longer than the first only adds its
new tail.

A write whose outcome is unknown (sent, then no answer) is settled by the
fence script: if the mark has reached the batch's last number the batch was
stored; otherwise the fence raises the mark to it, so that the late command
pushes nothing whenever it arrives, and records that it fenced that batch, so
that asking again gives the same answer.  The fence is acknowledged like a
push (C{WAIT}/C{WAITAOF} behind it on its connection): a batch found stored
in Redis's memory but not yet fsynced or replicated is not called stored,
since its journaled copy would then be skipped and a power cut lose it.

Keys, under the list prefix (C{--redis-prefix}):

  - C{PREFIX + queue}: the list itself;
  - C{PREFIX mixingest:hwm:PRODUCER:QUEUE}: the mark, a decimal string;
  - C{PREFIX mixingest:fenced:PRODUCER:QUEUE}: a set of the last numbers of
    the batches fenced off.

Both expire after a TTL that every write refreshes.  Numbers are compared as
Lua numbers (doubles): exact below 2**53.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

__all__ = [
    "FENCE",
    "FENCE_SHA",
    "PUSH",
    "PUSH_SHA",
    "fenceArgs",
    "fencedKey",
    "markKey",
    "pushArgs",
]

UNPACK_CHUNK = 4000
"""Items per C{RPUSH} inside the script: Lua's C{unpack} takes about 8000 values at most."""

PUSH = b"""
-- KEYS: the list, the producer's mark for it, the batches fenced off
-- ARGV: TTL seconds, the batch's last seq, then either the first seq and the
--   items (consecutive seqs) or '' then every item's seq then the items
local mark = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[2]) <= mark then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[1])
  return 0
end
local stop = #ARGV
local start
if ARGV[3] ~= '' then
  start = math.max(4, mark - tonumber(ARGV[3]) + 5)
else
  local n = (stop - 3) / 2
  for i = 1, n do
    if tonumber(ARGV[3 + i]) > mark then
      start = 3 + n + i
      break
    end
  end
end
for i = start, stop, %(chunk)d do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + %(chunk)d - 1, stop)))
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return stop - start + 1
""" % {b"chunk": UNPACK_CHUNK}

FENCE = b"""
-- KEYS: the producer's mark for a list, the batches fenced off
-- ARGV: TTL seconds, the in-doubt batch's last seq
-- Returns 1 if the batch was stored, 0 if it was not and never will be.
-- Every answer writes (at least a TTL refresh), so that a WAIT or WAITAOF
-- behind it covers what it answered about.
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  return 0
end
local mark = tonumber(redis.call('GET', KEYS[1]) or '-1')
if mark >= tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 0
"""

PUSH_SHA = hashlib.sha1(PUSH).hexdigest()
FENCE_SHA = hashlib.sha1(FENCE).hexdigest()


def markKey(prefix: str, producer: str, queue: str) -> str:
    return f"{prefix}mixingest:hwm:{producer}:{queue}"


def fencedKey(prefix: str, producer: str, queue: str) -> str:
    return f"{prefix}mixingest:fenced:{producer}:{queue}"


def pushArgs(
    prefix: str,
    queue: str,
    producer: str,
    ttl: int,
    items: Sequence[bytes],
    first: int | None = None,
    seqs: Sequence[int] | None = None,
) -> list[bytes | str | int]:
    """
    The keys and arguments of L{PUSH} (after the script and the key count,
    which is 3): C{items} numbered C{first, first + 1, ...} or C{seqs}.
    """
    head: list[bytes | str | int] = [
        prefix + queue,
        markKey(prefix, producer, queue),
        fencedKey(prefix, producer, queue),
        ttl,
    ]
    if seqs is None:
        assert first is not None
        return [*head, first + len(items) - 1, first, *items]
    return [*head, seqs[-1], "", *seqs, *items]


def fenceArgs(prefix: str, queue: str, producer: str, ttl: int, last: int) -> list[str | int]:
    """The keys and arguments of L{FENCE} (after the script and the key count, 2)."""
    return [markKey(prefix, producer, queue), fencedKey(prefix, producer, queue), ttl, last]
