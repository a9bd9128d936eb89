"""The membership store: leases in Redis, renewed and read in one script.

Why Redis and not Postgres (both are already there):

* A lease is what Redis does natively: a sorted set scored by expiry, judged
  by the store's own clock (``TIME`` inside the script), so members need no
  agreement on time and a dead member needs no sweeper.
* Heartbeats from every instance several times a second are small writes
  that Postgres would turn into WAL, vacuum and connection slots, on the
  server that is the fleet's bottleneck already (COPY of readings; see the
  README's capacity section) and the first one to be split when the fleet
  outgrows it. Redis answers them in microseconds.
* A Postgres session advisory lock (the instance lock) says whether a
  *connection* lives, not whether the process acts: a SIGSTOPped process
  keeps its connection and its lock. A lease with an expiry covers that.
* Redis being down already leaves polling and storage running (live state
  is rewritten when it returns); membership degrades the same way: every
  instance keeps its last view and polls on, and there is no failover until
  the store answers again (see :mod:`poller.cluster.lease`).

One round trip per heartbeat: the script drops expired leases, renews (or,
leaving, removes) this member's, and returns the store's time, whether the
member was still there (a rejoin if not), and every live member with its
status document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from poller import keys

_FORGET_MS = 86_400_000
"""A member not seen for a day is no longer reported missing."""

_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members, info, seen = KEYS[1], KEYS[2], KEYS[3]
local me, lease_ms, doc, leaving = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local forget_ms = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
local was = redis.call('ZSCORE', members, me)
if leaving == '1' then
  redis.call('ZREM', members, me)
  redis.call('HDEL', info, me)
  redis.call('HDEL', seen, me)
else
  redis.call('ZADD', members, now + lease_ms, me)
  redis.call('HSET', info, me, doc)
  redis.call('HSET', seen, me, now)
end
for _, name in ipairs(redis.call('HKEYS', info)) do
  if not redis.call('ZSCORE', members, name) then redis.call('HDEL', info, name) end
end
local missing = {}
local seen_all = redis.call('HGETALL', seen)
for i = 1, #seen_all, 2 do
  local name, at = seen_all[i], tonumber(seen_all[i + 1])
  if now - at > forget_ms then
    redis.call('HDEL', seen, name)
  elseif not redis.call('ZSCORE', members, name) then
    missing[#missing + 1] = name
    missing[#missing + 1] = seen_all[i + 1]
  end
end
local live = redis.call('ZRANGE', members, 0, -1)
local docs = {}
for i = 1, #live do docs[i] = redis.call('HGET', info, live[i]) or '{}' end
for _, key in ipairs({members, info, seen}) do redis.call('PEXPIRE', key, forget_ms) end
return {now, was and 1 or 0, live, docs, missing}
"""


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat learnt."""

    store_now_ms: int
    was_member: bool
    """False: this member's lease had ended (or it never joined): a (re)join."""
    members: dict[str, dict[str, Any]]
    """Live member id -> its status document."""
    missing: dict[str, int]
    """Member id -> last heartbeat (store ms) of members seen but not live."""


class MembershipStore:
    """One cluster's leases in one Redis database."""

    def __init__(self, redis_url: str, cluster_name: str, timeout_s: float) -> None:
        self._client = aioredis.from_url(redis_url, socket_timeout=timeout_s,
                                         socket_connect_timeout=timeout_s)
        self._script = self._client.register_script(_BEAT)
        self._keys = [keys.cluster(cluster_name, p) for p in ("members", "info", "seen")]

    async def beat(self, member: str, lease_s: float, doc: dict[str, Any], *,
                   leaving: bool = False) -> Beat:
        """Renew ``member``'s lease (remove it, ``leaving``) and read the view.
        Raises RedisError or OSError when the store does not answer."""
        now, was, live, docs, missing = await self._script(
            keys=self._keys,
            args=[member, round(lease_s * 1000), orjson.dumps(doc), "1" if leaving else "0",
                  _FORGET_MS])
        members = {}
        for name, raw in zip(live, docs, strict=True):
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:  # written by something else: still a member
                parsed = {}
            members[name.decode()] = parsed if isinstance(parsed, dict) else {}
        gone = {missing[i].decode(): int(missing[i + 1]) for i in range(0, len(missing), 2)}
        return Beat(int(now), bool(was), members, gone)

    async def close(self) -> None:
        await self._client.aclose()
