"""Atomic rate limiting on Django's cache: the GCRA, one decision per call.

The generic cell-rate algorithm (ATM cell-rate policing, also behind redis-cell) keeps a single
number per key, its "theoretical arrival time" (TAT): a rate of N per period P lets N requests
through at once, then one every P/N, and a refused request is told exactly when the next passes.

Where the read-decide-write is atomic:

- Redis cache (`django.core.cache.backends.redis.RedisCache`, CACHE_URL=redis://...): one Lua script
  run by the server, so every thread of every process on every host that shares the Redis decides
  on the same state, one at a time. The script uses the Redis server's clock (`TIME`), so web hosts
  with skewed clocks still agree; the `now` a caller passes is ignored there.
- Any other cache (local memory, the default): a lock in this process around the cache's get and
  set. Local memory is per process anyway, so each process counts alone (N per process): configure
  a Redis cache for a limit shared by all processes. A database, file or memcached cache would
  also be atomic only within one process.

`take` spends one unit of the budget if the budget allows; `peek` tells whether it would, without
spending.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass

from django.core.cache.backends.base import BaseCache

# TAT as a string (Lua numbers become integers on their way back to Python). KEYS[1] the state,
# ARGV[1] the interval P/N, ARGV[2] the period P, ARGV[3] 1 to spend, 0 to peek.
# Returns {allowed (0|1), wait seconds as a string}.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
local passes_from = tat + interval - period
if now < passes_from then
  return {0, string.format('%.6f', passes_from - now)}
end
if ARGV[3] == '1' then
  local new_tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
end
return {1, '0'}
"""

_local_lock = threading.Lock()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    wait: float  # seconds until the next unit passes (0.0 when allowed)


def take(cache: BaseCache, key: str, limit: int, period: float, *, now: float | None = None) -> Decision:
    """Spend one of `limit` units per `period` seconds under `key`, atomically; refused: nothing spent."""
    return _decide(cache, key, limit, period, now=now, spend=True)


def peek(cache: BaseCache, key: str, limit: int, period: float, *, now: float | None = None) -> Decision:
    """Whether `take` would pass now (and if not, how long until it would); spends nothing."""
    return _decide(cache, key, limit, period, now=now, spend=False)


def is_redis(cache: BaseCache) -> bool:
    from django.core.cache.backends.redis import RedisCache

    return isinstance(_resolved(cache), RedisCache)


def _resolved(cache: BaseCache) -> BaseCache:
    """The backend behind `django.core.cache.cache` (a proxy that isinstance does not see through)."""
    from django.utils.connection import ConnectionProxy

    if isinstance(cache, ConnectionProxy):
        return cache._connections[cache._alias]
    return cache


def _decide(
    cache: BaseCache, key: str, limit: int, period: float, *, now: float | None, spend: bool
) -> Decision:
    if limit <= 0:  # "0/min": nothing passes
        return Decision(False, float(period))
    interval = period / limit
    cache = _resolved(cache)
    if is_redis(cache):
        return _decide_redis(cache, key, interval, period, spend)
    now = time.time() if now is None else now
    with _local_lock:
        arrival = max(cache.get(key, now), now)
        passes_from = arrival + interval - period
        if now < passes_from:
            return Decision(False, passes_from - now)
        if spend:
            cache.set(key, arrival + interval, math.ceil(period))
    return Decision(True, 0.0)


def _decide_redis(cache: BaseCache, key: str, interval: float, period: float, spend: bool) -> Decision:
    full_key = cache.make_and_validate_key(key)
    client = cache._cache.get_client(full_key, write=True)
    allowed, wait = _gcra_script()(
        keys=[full_key], args=[repr(interval), repr(float(period)), "1" if spend else "0"], client=client
    )
    return Decision(bool(int(allowed)), float(wait))


@functools.cache
def _gcra_script():
    """One script object: EVALSHA, and redis-py loads the script again where a server lacks it."""
    from redis.commands.core import Script

    return Script(None, _GCRA_LUA.encode())
