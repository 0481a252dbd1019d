"""`RedisBuffer`: the replay buffer in Redis, one Lua script per operation (semantics: `services.buffer`).

Keys, all under `orchard:{namespace}:`:

| key | type | holds |
| --- | --- | --- |
| `groups` | hash | group id -> `Group.to_bytes()`, for every ready or pending group |
| `ready` | sorted set | ready group ids, scored by policy version (take: lowest first) |
| `pending` | hash | taken, unacknowledged id -> "policy version:milliseconds since the epoch when taken" |
| `seen` | set | every id ever stored: a later put of one is a duplicate (acknowledged ones included) |
| `corrupt` | hash | id -> bytes that did not decode, kept for inspection |
| `stats` | hash | counters put, taken, acked, stale, requeued, duplicates, corrupt |
| `take:{token}` | string | msgpack list of the ids one `take` moved, so a retried take returns the same groups |
| `prompt:{id}`, `distribution:{name}` | hash | count, pass_rate_sum, last_policy_version, distribution |
| `distributions` | set | distribution names seen |
| `state:{name}` | string | a named state blob (the curriculum's scheduler and value model) |

The bytes of a group are written once, at put, and deleted once, at ack or when found stale; take
and requeue move only ids. Each operation is one atomic script, one round trip whatever the number
of groups, and a handful of variadic commands per batch (each command called from Lua costs about a
microsecond on its own, so no script loops over groups calling Redis). Every call is retried on a
lost connection for up to `reconnect_seconds` (exponential backoff, 0.05 s doubling to 2 s), and
each script is safe to run twice. Needs Redis >= 6.2 (SMISMEMBER).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchard.records import Group, RecordError
from orchard.services.buffer import STAT_KEYS, PassRateStats, decode_group

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 2.0
#: How long the ids of one take are kept for a retry of that take (the next take deletes them sooner).
TAKE_ANSWER_TTL_SECONDS = 3600
#: Groups per put script call: bounds how long one call holds the Redis event loop.
PUT_CHUNK = 256
#: The oldest Redis with every command the scripts use (SMISMEMBER).
MIN_REDIS_VERSION = (6, 2)

# Every script gets the namespace's keys first, in this order; some get more after them.
# `chunked` calls a variadic command over a list, in parts below Lua's unpack limit, and returns
# the array replies concatenated and the integer replies summed.
LUA_PRELUDE = """
local GROUPS, READY, PENDING, SEEN, CORRUPT, STATS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local function chunked(command, key, list)
  local results, total = {}, 0
  for first = 1, #list, 4000 do
    local part = redis.call(command, key, unpack(list, first, math.min(first + 3999, #list)))
    if type(part) == 'table' then
      for _, value in ipairs(part) do results[#results + 1] = value end
    elseif type(part) == 'number' then
      total = total + part
    end
  end
  return results, total
end
"""

# ARGV: id, policy version, bytes, for each group. Returns how many were new.
PUT_SCRIPT = (
    LUA_PRELUDE
    + """
local ids = {}
for i = 1, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
local known = chunked('SMISMEMBER', SEEN, ids)
local fresh, fields, members = {}, {}, {}
for n, id in ipairs(ids) do
  if known[n] == 0 and not fresh[id] then
    fresh[id] = true
    fields[#fields + 1] = id
    fields[#fields + 1] = ARGV[3 * n]
    members[#members + 1] = ARGV[3 * n - 1]
    members[#members + 1] = id
  end
end
local added = #members / 2
if added > 0 then
  chunked('HSET', GROUPS, fields)
  chunked('ZADD', READY, members)
  local new_ids = {}
  for i = 2, #members, 2 do new_ids[#new_ids + 1] = members[i] end
  chunked('SADD', SEEN, new_ids)
  redis.call('HINCRBY', STATS, 'put', added)
end
if added < #ids then redis.call('HINCRBY', STATS, 'duplicates', #ids - added) end
return added
"""
)

# KEYS[7]: take:{token}; KEYS[8]: the previous take's key (deleted), or KEYS[7] when none.
# ARGV: count, min policy version, now (ms), answer ttl (s).
# Returns id1, bytes1, id2, bytes2, ... (bytes false when missing).
TAKE_SCRIPT = (
    LUA_PRELUDE
    + """
local function answer(ids)
  local out = {}
  if #ids == 0 then return out end
  local data = chunked('HMGET', GROUPS, ids)
  for n, id in ipairs(ids) do
    out[#out + 1] = id
    out[#out + 1] = data[n]
  end
  return out
end
local earlier = redis.call('GET', KEYS[7])
if earlier then  -- a retry: answer what the first call took, as far as it is still pending
  local ids = cmsgpack.unpack(earlier)
  local still = {}
  if #ids > 0 then
    local pending = chunked('HMGET', PENDING, ids)
    for n, id in ipairs(ids) do
      if pending[n] then still[#still + 1] = id end
    end
  end
  return answer(still)
end
if KEYS[8] ~= KEYS[7] then redis.call('DEL', KEYS[8]) end
local count, minimum = tonumber(ARGV[1]), tonumber(ARGV[2])
local function lowest()
  return redis.call('ZRANGE', READY, 0, math.max(count, 1) - 1, 'WITHSCORES')
end
local chosen = lowest()
if #chosen > 0 and tonumber(chosen[2]) < minimum then  -- the oldest ready group is stale
  local below = '(' .. ARGV[2]
  local stale = redis.call('ZRANGEBYSCORE', READY, '-inf', below)
  chunked('HDEL', GROUPS, stale)
  redis.call('ZREMRANGEBYSCORE', READY, '-inf', below)
  redis.call('HINCRBY', STATS, 'stale', #stale)
  chosen = lowest()
end
local ids, pending = {}, {}
if count > 0 then
  for i = 1, #chosen, 2 do
    ids[#ids + 1] = chosen[i]
    pending[#pending + 1] = chosen[i]
    pending[#pending + 1] = chosen[i + 1] .. ':' .. ARGV[3]
  end
end
if #ids > 0 then
  redis.call('ZREMRANGEBYRANK', READY, 0, #ids - 1)
  chunked('HSET', PENDING, pending)
  redis.call('HINCRBY', STATS, 'taken', #ids)
end
redis.call('SET', KEYS[7], cmsgpack.pack(ids), 'EX', ARGV[4])
return answer(ids)
"""
)

# ARGV: ids. Removes them from pending (or, failing that, from ready) and deletes their bytes.
ACK_SCRIPT = (
    LUA_PRELUDE
    + """
local _, removed = chunked('HDEL', PENDING, ARGV)
if removed < #ARGV then
  local _, from_ready = chunked('ZREM', READY, ARGV)
  removed = removed + from_ready
end
if removed > 0 then
  chunked('HDEL', GROUPS, ARGV)
  redis.call('HINCRBY', STATS, 'acked', removed)
end
return removed
"""
)

# ARGV: cutoff in ms ('' = requeue everything pending).
REQUEUE_SCRIPT = (
    LUA_PRELUDE
    + """
local cutoff = tonumber(ARGV[1])
local entries = redis.call('HGETALL', PENDING)
local ids, members = {}, {}
for i = 1, #entries, 2 do
  local version, since = string.match(entries[i + 1], '^(.*):(%d+)$')
  if cutoff == nil or tonumber(since) <= cutoff then
    ids[#ids + 1] = entries[i]
    members[#members + 1] = version
    members[#members + 1] = entries[i]
  end
end
if #ids == 0 then return 0 end
chunked('ZADD', READY, members)
chunked('HDEL', PENDING, ids)
redis.call('HINCRBY', STATS, 'requeued', #ids)
return #ids
"""
)

# ARGV: ids taken whose bytes do not decode. Moves each pending one's bytes to CORRUPT.
SET_ASIDE_SCRIPT = (
    LUA_PRELUDE
    + """
local moved = 0
for _, id in ipairs(ARGV) do
  if redis.call('HDEL', PENDING, id) == 1 then
    redis.call('HSET', CORRUPT, id, redis.call('HGET', GROUPS, id) or '')
    redis.call('HDEL', GROUPS, id)
    moved = moved + 1
  end
end
if moved > 0 then redis.call('HINCRBY', STATS, 'corrupt', moved) end
return moved
"""
)

# KEYS: prompt:{id}, distribution:{name}, distributions. ARGV: distribution, pass rate, policy version.
PROMPT_STATS_SCRIPT = """
local version = tonumber(ARGV[3])
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], 'count', 1)
  redis.call('HINCRBYFLOAT', KEYS[i], 'pass_rate_sum', ARGV[2])
  redis.call('HSET', KEYS[i], 'distribution', ARGV[1])
  local last = redis.call('HGET', KEYS[i], 'last_policy_version')
  if not last or tonumber(last) < version then
    redis.call('HSET', KEYS[i], 'last_policy_version', version)
  end
end
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""


class BufferUnavailable(RuntimeError):
    """Redis could not be reached for `reconnect_seconds`; the run cannot go on without its buffer."""


class RedisBuffer:
    """The replay buffer in Redis: survives the driver and the learner, and (with AOF) Redis restarts."""

    def __init__(self, url: str, namespace: str, *, reconnect_seconds: float = 30.0) -> None:
        self.url = url
        self._shown_url = _without_password(url)  # for messages and logs
        self.namespace = namespace
        self.reconnect_seconds = reconnect_seconds
        self.retries = 0  # calls repeated after a lost connection, for tests and diagnostics
        self._previous_take_key: str | None = None
        # redis-py's own retries are switched off: `_call` is the one retry policy, with one deadline.
        self._client = redis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=min(5.0, reconnect_seconds),
            socket_timeout=max(10.0, reconnect_seconds),
        )
        prefix = f"orchard:{namespace}:"
        self._prefix = prefix
        self._ready = prefix + "ready"
        self._pending = prefix + "pending"
        self._stats = prefix + "stats"
        self._distributions = prefix + "distributions"
        # The keys every group script receives first, in LUA_PRELUDE's order.
        self._keys = [prefix + name for name in ("groups", "ready", "pending", "seen", "corrupt", "stats")]
        self._put_script = self._client.register_script(PUT_SCRIPT)
        self._take_script = self._client.register_script(TAKE_SCRIPT)
        self._ack_script = self._client.register_script(ACK_SCRIPT)
        self._requeue_script = self._client.register_script(REQUEUE_SCRIPT)
        self._set_aside_script = self._client.register_script(SET_ASIDE_SCRIPT)
        self._prompt_stats_script = self._client.register_script(PROMPT_STATS_SCRIPT)
        try:
            self._call("connect", self._client.ping)
            self._check_version()
        except BaseException:
            self._client.close()
            raise

    # ----------------------------------------------------------------------------- groups
    def put(self, group: Group) -> None:
        self.put_many([group])

    def put_many(self, groups: Iterable[Group]) -> int:
        """Store groups, one script call per `PUT_CHUNK`; returns how many were new.

        A call retried after its answer was lost finds its groups stored and counts them as
        duplicates; the groups themselves are stored exactly once.
        """
        return self._put_encoded([(group.id, group.policy_version, group.to_bytes()) for group in groups])

    def take(self, count: int, *, min_policy_version: int, request_token: str | None = None) -> list[Group]:
        """Drop stale groups, then move up to `count` of the oldest acceptable ones to pending.

        One script call does both atomically and records the ids under `request_token` (random by
        default), so a retry after a lost answer, or a repeated call with the same token before this
        buffer's next take, returns the groups already taken (those still pending) instead of taking
        more. Corrupt groups are set aside, and the take continues until `count` groups are found or
        none are ready.
        """
        taken: list[Group] = []
        token = request_token
        while True:
            answer = self._take_encoded(count - len(taken), min_policy_version, token or uuid.uuid4().hex)
            corrupt: list[str] = []
            for group_id, data in answer:
                try:
                    taken.append(decode_group(group_id, data))
                except RecordError as error:
                    log.warning("buffer %s: group %s is corrupt and was set aside: %s", self.namespace, group_id, error)
                    corrupt.append(group_id)
            if corrupt:
                self._call("set aside corrupt groups", lambda corrupt=corrupt: self._set_aside(corrupt))
            # A caller's own token names one answer, never a second, different one.
            if not corrupt or len(taken) >= count or request_token is not None:
                break
        return taken

    def ack(self, group_ids: Sequence[str]) -> None:
        """Remove groups for good (normally pending ones; a ready one, e.g. requeued, goes too)."""
        if not group_ids:
            return
        ids = list(group_ids)
        self._call("ack", lambda: self._ack_script(keys=self._keys, args=ids))

    def requeue_pending(self, older_than_seconds: float | None = None) -> int:
        """Return pending groups (all, or those taken at least `older_than_seconds` ago) to ready."""
        cutoff = "" if older_than_seconds is None else str(int((time.time() - older_than_seconds) * 1000))
        return int(self._call("requeue", lambda: self._requeue_script(keys=self._keys, args=[cutoff])))

    def ready_count(self, *, min_policy_version: int = 0) -> int:
        return int(self._call("ready_count", lambda: self._client.zcount(self._ready, min_policy_version, "+inf")))

    def pending_count(self) -> int:
        return int(self._call("pending_count", lambda: self._client.hlen(self._pending)))

    def stats(self) -> dict[str, int]:
        def read() -> list:
            pipeline = self._client.pipeline(transaction=True)
            pipeline.hgetall(self._stats).zcard(self._ready).hlen(self._pending)
            return pipeline.execute()

        counters, ready, pending = self._call("stats", read)
        stats = dict.fromkeys(STAT_KEYS, 0)
        stats.update({key.decode(): int(value) for key, value in counters.items()})
        stats.update(ready=int(ready), pending=int(pending))
        return stats

    # ----------------------------------------------------------------------------- prompt statistics
    def record_prompt_stats(self, prompt_id: str, distribution: str, pass_rate: float, policy_version: int) -> None:
        """Add one observation (a retry after a lost answer may count it twice; these are statistics)."""
        keys = [
            self._prefix + f"prompt:{prompt_id}",
            self._prefix + f"distribution:{distribution}",
            self._distributions,
        ]
        args = [distribution, repr(float(pass_rate)), int(policy_version)]
        self._call("record_prompt_stats", lambda: self._prompt_stats_script(keys=keys, args=args))

    def prompt_stats(self, prompt_id: str) -> PassRateStats | None:
        fields = self._call("prompt_stats", lambda: self._client.hgetall(self._prefix + f"prompt:{prompt_id}"))
        return _pass_rate_stats(fields)

    def distribution_stats(self) -> dict[str, PassRateStats]:
        def read() -> dict[str, PassRateStats]:
            names = sorted(name.decode() for name in self._client.smembers(self._distributions))
            pipeline = self._client.pipeline(transaction=False)
            for name in names:
                pipeline.hgetall(self._prefix + f"distribution:{name}")
            rows = [_pass_rate_stats(fields) for fields in pipeline.execute()]
            return {name: row for name, row in zip(names, rows, strict=True) if row is not None}

        return self._call("distribution_stats", read)

    # ----------------------------------------------------------------------------- named state
    def save_state(self, name: str, payload: bytes) -> None:
        self._call("save_state", lambda: self._client.set(self._prefix + f"state:{name}", payload))

    def load_state(self, name: str) -> bytes | None:
        return self._call("load_state", lambda: self._client.get(self._prefix + f"state:{name}"))

    def close(self) -> None:
        self._client.close()

    # ----------------------------------------------------------------------------- internals
    def _put_encoded(self, entries: Sequence[tuple[str, int, bytes]]) -> int:
        """Store (group id, policy version, `Group.to_bytes()`) entries; returns how many were new."""
        added = 0
        for start in range(0, len(entries), PUT_CHUNK):
            arguments = [value for entry in entries[start : start + PUT_CHUNK] for value in entry]
            added += self._call("put", lambda arguments=arguments: self._put_script(keys=self._keys, args=arguments))
        return added

    def _take_encoded(self, count: int, min_policy_version: int, token: str) -> list[tuple[str, bytes | None]]:
        """The Redis half of `take`: (group id, stored bytes) of the groups moved to pending, undecoded."""
        take_key = self._prefix + f"take:{token}"
        keys = [*self._keys, take_key, self._previous_take_key or take_key]

        def run() -> list:
            args = [count, min_policy_version, int(time.time() * 1000), TAKE_ANSWER_TTL_SECONDS]
            return self._take_script(keys=keys, args=args)

        answer = self._call("take", run)
        # The answer arrived, so nobody retries that take any more: the next take deletes its ids.
        self._previous_take_key = take_key
        return [(answer[index].decode(), answer[index + 1]) for index in range(0, len(answer), 2)]

    def _check_version(self) -> None:
        version = str(self._call("connect", lambda: self._client.info("server"))["redis_version"])
        if tuple(int(part) for part in version.split(".")[:2]) < MIN_REDIS_VERSION:
            needed = ".".join(map(str, MIN_REDIS_VERSION))
            raise RuntimeError(
                f"Redis at {self._shown_url} is version {version}; the buffer needs Redis >= {needed}: "
                "upgrade it, or leave buffer.redis_url unset to use a private redis-server"
            )

    def _set_aside(self, group_ids: list[str]) -> int:
        return self._set_aside_script(keys=self._keys, args=group_ids)

    def _call(self, operation: str, function: Callable[[], T]) -> T:
        """Run `function`, retrying lost connections with exponential backoff for `reconnect_seconds`."""
        started = time.monotonic()
        delay = FIRST_BACKOFF_SECONDS
        while True:
            try:
                return function()
            except (redis.ConnectionError, redis.TimeoutError) as error:  # also BusyLoadingError (AOF replay)
                elapsed = time.monotonic() - started
                if elapsed >= self.reconnect_seconds:
                    raise BufferUnavailable(
                        f"Redis at {self._shown_url} unreachable for {elapsed:.1f} s ({operation}: {error}); check that "
                        "redis-server is running and reachable at that address, or raise buffer.reconnect_seconds "
                        f"(now {self.reconnect_seconds:g})"
                    ) from error
                if delay == FIRST_BACKOFF_SECONDS:  # once per call, not once per attempt
                    log.warning("buffer: Redis at %s unreachable (%s: %s); retrying", self._shown_url, operation, error)
                self.retries += 1
                time.sleep(min(delay, self.reconnect_seconds - elapsed))
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _pass_rate_stats(fields: dict[bytes, bytes]) -> PassRateStats | None:
    if not fields:
        return None
    return PassRateStats(
        distribution=fields[b"distribution"].decode(),
        count=int(fields[b"count"]),
        pass_rate_sum=float(fields[b"pass_rate_sum"]),
        last_policy_version=int(fields[b"last_policy_version"]),
    )
