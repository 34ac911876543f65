"""The production :class:`~stream.store.StateStore`: Redis, one Lua script per checkpoint.

Every checkpoint of a partition is ONE ``EVALSHA`` (one round trip): the script checks the
fencing generation, writes the state, the next offsets, the outbox and the kill-switch
mirrors, and performs the batch's label-join operations, all atomically (a Lua script runs
to completion or not at all as seen by other clients; unlike ``MULTI/EXEC`` it can branch
on what it reads, which the join and the fencing check need).

Keys of one partition share a hash tag, so in Redis Cluster they live in one slot and the
script touches only declared keys::

    {prefix}:{<stage>:<partition>}:gen       fencing generation (INCR on claim)
    {prefix}:{<stage>:<partition>}:owner     who claimed it last
    {prefix}:{<stage>:<partition>}:state     stage state (versioned JSON bytes)
    {prefix}:{<stage>:<partition>}:offsets   next offset per topic (JSON)
    {prefix}:{<stage>:<partition>}:outbox    hash: message id -> 16-digit sequence + packed
                                             message (claim returns them in commit order)
    {prefix}:{<stage>:<partition>}:outseq    outbox sequence counter
    {prefix}:{<stage>:<partition>}:last      token of the last applied commit (idempotent
                                             retry after a lost reply)
    {prefix}:{<stage>:<partition>}:inbox     last commit's join result (JSON)
    {prefix}:{<stage>:<partition>}:j:<model>:<request_id>
                                             join buffer entry, TTL = label horizon:
                                             "P"+prediction | "L"+early label | "J" (joined)
    {prefix}:ks:<model>                      kill-switch mirror (standalone Redis; see
                                             docs/architecture.md for Cluster)

Join records travel as opaque JSON strings: the script never parses numbers, so nothing
is rounded on the way (Lua's cjson would print 14 digits).

Outages: a Redis call that fails with a connection error or timeout is retried with
exponential backoff (0.05 s doubling to 5 s, forever unless ``retry_for_s`` is set), so a
Redis restart stalls the worker instead of crash-looping it. A commit is retried with the
same *commit token*: if the first attempt was applied and only its reply was lost, the
script sees the token, applies nothing again and returns the stored inbox (re-applying
the join ops would turn a ``joined`` pair into ``duplicate`` and lose it). Writes refused
because Redis is full (``OOM`` under ``maxmemory-policy noeviction``) or cannot persist
(``MISCONF``) are retried the same way, logged at ERROR and counted in ``retries`` and
``write_refusals``: the worker pauses until memory is freed or ``maxmemory`` raised.

Round trips: :attr:`RedisStore.round_trips` counts requests sent (one per claim, commit or
ack in the steady state). The scripts are loaded in the claim's transaction, so the first
commit after a claim does not pay a ``NOSCRIPT`` miss; after a server restart that lost
the script cache, one commit costs three requests (EVALSHA, SCRIPT LOAD, EVALSHA).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream.store import (
    Claim,
    Fenced,
    JoinedPair,
    JoinOp,
    JoinOutcome,
    JoinResult,
    OutMessage,
)

STAGES = ("ingest", "detect")
log = logging.getLogger("driftline.redis")
_T = TypeVar("_T")

_COMMIT_LUA = """
-- KEYS: gen, state, offsets, outbox, inbox, outseq, last, then K kill-switch keys,
--       then J join keys
-- ARGV: generation, state, offsets, n_outbox, n_killswitch, n_join, token,
--       outbox (id, packed) * n_outbox, killswitch values * n_killswitch,
--       join ops * n_join (one argument each: 'p' or 'l', ttl ms, ':', record json),
--       inbox meta json
local gen = redis.call('GET', KEYS[1])
if gen ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. tostring(gen))
end
if redis.call('GET', KEYS[7]) == ARGV[7] then
  -- a retry of a commit that was applied (its reply was lost): change nothing
  return redis.call('GET', KEYS[5])
end
local n_out = tonumber(ARGV[4])
local n_ks = tonumber(ARGV[5])
local n_join = tonumber(ARGV[6])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[7], ARGV[7])
local a = 8
for i = 1, n_out do
  local old = redis.call('HGET', KEYS[4], ARGV[a])
  local seq
  if old then
    seq = string.sub(old, 1, 16)
  else
    seq = string.format('%016d', redis.call('INCR', KEYS[6]))
  end
  redis.call('HSET', KEYS[4], ARGV[a], seq .. ARGV[a + 1])
  a = a + 2
end
for i = 1, n_ks do
  redis.call('SET', KEYS[7 + i], ARGV[a])
  a = a + 1
end
local results = {}
for i = 1, n_join do
  local key = KEYS[7 + n_ks + i]
  local packed = ARGV[a]
  local sep = string.find(packed, ':', 2, true)
  local op = string.sub(packed, 1, 1)
  local ttl = tonumber(string.sub(packed, 2, sep - 1))
  local rec = string.sub(packed, sep + 1)
  a = a + 1
  local cur = redis.call('GET', key)
  if op == 'p' then
    if not cur then
      if ttl > 0 then redis.call('SET', key, 'P' .. rec, 'PX', ttl) end
      results[#results + 1] = {'parked', '', ''}
    elseif string.sub(cur, 1, 1) == 'L' then
      results[#results + 1] = {'joined', rec, string.sub(cur, 2)}
      redis.call('SET', key, 'J', 'PX', math.max(ttl, 1))
    else
      results[#results + 1] = {'duplicate_request', '', ''}
    end
  else
    if not cur then
      if ttl > 0 then redis.call('SET', key, 'L' .. rec, 'PX', ttl) end
      results[#results + 1] = {'early', '', ''}
    elseif string.sub(cur, 1, 1) == 'P' then
      results[#results + 1] = {'joined', string.sub(cur, 2), rec}
      redis.call('SET', key, 'J', 'PX', math.max(ttl, 1))
    else
      results[#results + 1] = {'duplicate', '', ''}
    end
  end
end
local encoded = '[]'
if n_join > 0 then encoded = cjson.encode(results) end
local inbox = '{"meta":' .. ARGV[a] .. ',"results":' .. encoded .. '}'
redis.call('SET', KEYS[5], inbox)
return inbox
"""

_ACK_LUA = """
local gen = redis.call('GET', KEYS[1])
if gen ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. tostring(gen))
end
for i = 2, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
return #ARGV - 1
"""


def _pack(m: OutMessage) -> bytes:
    topic = m.topic.encode()
    return struct.pack(">HI", len(topic), len(m.key)) + topic + m.key + m.value


_SEQ_LEN = 16  # the script prefixes every outbox entry with a 16-digit sequence number


def _unpack(msg_id: str, blob: bytes) -> OutMessage:
    tlen, klen = struct.unpack_from(">HI", blob)
    off = struct.calcsize(">HI")
    topic = blob[off : off + tlen].decode()
    key = blob[off + tlen : off + tlen + klen]
    return OutMessage(msg_id, topic, key, blob[off + tlen + klen :])


def _decode_inbox(raw: bytes | str | None) -> JoinResult:
    """Turn the script's inbox document back into a :class:`JoinResult`."""
    if not raw:
        return JoinResult()
    doc = orjson.loads(raw)
    pairs: list[JoinedPair] = []
    outcomes: list[JoinOutcome] = []
    for (model, request_id, tick), (outcome, pred, label) in zip(
        doc["meta"], doc["results"], strict=True
    ):
        if outcome == "parked":
            continue
        outcomes.append(JoinOutcome(model, tick, outcome))
        if outcome == "joined":
            p = orjson.loads(pred)
            lab = orjson.loads(label)
            pairs.append(
                JoinedPair(
                    model,
                    request_id,
                    tick,
                    str(p["v"]),
                    tuple(p["s"]),
                    p["sc"],
                    str(p["p"]),
                    str(lab["y"]),
                    float(p["ts"]),
                    float(lab["ts"]),
                )
            )
    return JoinResult(tuple(pairs), tuple(outcomes))


class RedisStore:
    """:class:`~stream.store.StateStore` on Redis (standalone, Sentinel or Cluster-safe keys).

    ``prefix`` namespaces every key (``dl`` by default; tests pass a unique one, and an ACL
    user can be limited to ``~{prefix}:*``). The client is created from ``url`` (``rediss://``
    for TLS) unless one is passed in. ``retry_for_s`` bounds how long a call retries through
    connection errors (None = forever, the worker's setting: a Redis outage stalls it).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "dl",
        client: aioredis.Redis | None = None,
        retry_for_s: float | None = None,
        backoff_s: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("url: a Redis URL (redis:// or rediss://) or a client is needed")
            client = aioredis.Redis.from_url(url)
        self.redis = client
        self.prefix = prefix
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self._commit_sha = _sha1(_COMMIT_LUA)
        self._ack_sha = _sha1(_ACK_LUA)
        self._nonce = uuid.uuid4().hex[:12]
        self._commits = 0
        self.round_trips = 0
        self.retries = 0
        self.write_refusals = 0  # retries caused by OOM / MISCONF (also in ``retries``)

    def _key(self, stage: str, partition: int, name: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"stage: {stage!r} is not valid; valid values: {', '.join(STAGES)}")
        return f"{self.prefix}:{{{stage}:{partition}}}:{name}"

    def _ks_key(self, model_id: str) -> str:
        return f"{self.prefix}:ks:{model_id}"

    async def close(self) -> None:
        """Close the client's connections."""
        await self.redis.aclose()

    async def ping(self) -> None:
        """Wait until Redis answers (retrying like every other call)."""
        client: Any = self.redis
        await self._call("ping", client.ping)

    # ----------------------------------------------------------------- plumbing

    async def _call(self, what: str, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` (one request), retrying connection errors with backoff."""
        delay, cap = self.backoff_s
        deadline = None if self.retry_for_s is None else time.monotonic() + self.retry_for_s
        while True:
            self.round_trips += 1
            try:
                return await fn()
            except (RedisConnectionError, RedisTimeoutError) as err:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                self.retries += 1
                log.warning("redis %s failed (%s); retrying in %.2f s", what, err, delay)
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
            except ResponseError as err:
                # Redis refuses writes but keeps its data: out of memory under
                # maxmemory-policy noeviction (OOM), or a failed RDB save with
                # stop-writes-on-bgsave-error (MISCONF). Nothing was applied (a script is
                # refused before it runs), so waiting and retrying the same request is safe;
                # raising would make the worker drop and re-claim the partition, which
                # fails the same way.
                if not _is_write_refusal(err):
                    raise
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                self.retries += 1
                self.write_refusals += 1
                log.error(
                    "redis %s REFUSED (%s: %s); the worker waits and retries in %.2f s — "
                    "raise maxmemory / free memory, or fix persistence (MISCONF); state keys "
                    "must never be evicted (maxmemory-policy noeviction)",
                    what,
                    type(err).__name__,
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)

    async def _evalsha(
        self, sha: str, script: str, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        try:
            return await self.redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            self.round_trips += 2
            await self.redis.script_load(script)
            return await self.redis.evalsha(sha, len(keys), *keys, *args)

    @staticmethod
    def _fenced(err: ResponseError, stage: str, partition: int, generation: int) -> Fenced | None:
        if str(err).startswith("FENCED"):
            return Fenced(
                f"{stage}/{partition}: generation {generation} is stale "
                f"(current {str(err).split()[-1]})"
            )
        return None

    # ----------------------------------------------------------------- StateStore

    async def claim(self, stage: str, partition: int, owner: str) -> Claim:
        """Take ownership (INCR the generation) and read everything back: one transaction."""

        def k(name: str) -> str:
            return self._key(stage, partition, name)

        async def run() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as tx:
                pipe: Any = tx  # redis-py's pipeline command methods are untyped
                pipe.script_load(_COMMIT_LUA)
                pipe.script_load(_ACK_LUA)
                pipe.incr(k("gen"))
                pipe.set(k("owner"), owner)
                pipe.get(k("state"))
                pipe.get(k("offsets"))
                pipe.hgetall(k("outbox"))
                pipe.get(k("inbox"))
                result: list[Any] = await pipe.execute()
                return result

        _, _, gen, _, state, offsets, outbox, inbox = await self._call("claim", run)
        entries = sorted((blob[:_SEQ_LEN], i, blob[_SEQ_LEN:]) for i, blob in outbox.items())
        messages = [_unpack(i.decode(), blob) for _, i, blob in entries]
        return Claim(
            int(gen),
            state,
            orjson.loads(offsets) if offsets else None,
            messages,
            _decode_inbox(inbox),
        )

    async def commit(
        self,
        stage: str,
        partition: int,
        generation: int,
        *,
        state: bytes,
        next_offset: Mapping[str, int],
        outbox: Sequence[OutMessage] = (),
        join_ops: Sequence[JoinOp] = (),
        killswitch: Mapping[str, bytes] | None = None,
    ) -> JoinResult:
        """One EVALSHA: fencing check, state, offsets, outbox, kill switches, join ops."""

        def k(name: str) -> str:
            return self._key(stage, partition, name)

        ks = dict(killswitch or {})
        self._commits += 1
        token = f"{self._nonce}:{generation}:{self._commits}"
        keys: list[str] = [
            k("gen"),
            k("state"),
            k("offsets"),
            k("outbox"),
            k("inbox"),
            k("outseq"),
            k("last"),
        ]
        keys += [self._ks_key(m) for m in ks]
        keys += [k(f"j:{op.model_id}:{op.request_id}") for op in join_ops]
        args: list[Any] = [
            generation,
            state,
            orjson.dumps(dict(next_offset)),
            len(outbox),
            len(ks),
            len(join_ops),
            token,
        ]
        for m in outbox:
            args += [m.id, _pack(m)]
        args += list(ks.values())
        for op in join_ops:
            # one argument per op (redis-py packs every argument in Python: fewer is faster)
            ttl = max(0, int(op.ttl_s * 1000))
            kind = b"p" if op.op == "park" else b"l"
            args.append(kind + str(ttl).encode() + b":" + orjson.dumps(op.record))
        args.append(orjson.dumps([[op.model_id, op.request_id, op.tick] for op in join_ops]))
        try:
            raw = await self._call(
                "commit", lambda: self._evalsha(self._commit_sha, _COMMIT_LUA, keys, args)
            )
        except ResponseError as err:
            fenced = self._fenced(err, stage, partition, generation)
            if fenced is not None:
                raise fenced from None
            raise
        return _decode_inbox(raw)

    async def ack_outbox(
        self, stage: str, partition: int, generation: int, ids: Sequence[str]
    ) -> None:
        """Drop published outbox entries (fenced like a commit)."""
        keys = [self._key(stage, partition, "gen"), self._key(stage, partition, "outbox")]
        try:
            await self._call(
                "ack", lambda: self._evalsha(self._ack_sha, _ACK_LUA, keys, [generation, *ids])
            )
        except ResponseError as err:
            fenced = self._fenced(err, stage, partition, generation)
            if fenced is not None:
                raise fenced from None
            raise

    async def get_killswitch(self, model_id: str) -> bytes | None:
        """The kill-switch mirror of ``model_id`` (JSON bytes) or None."""
        client: Any = self.redis
        value: bytes | None = await self._call(
            "get_killswitch", lambda: client.get(self._ks_key(model_id))
        )
        return value

    async def set_killswitch(self, model_id: str, state: bytes) -> None:
        """Overwrite the kill-switch mirror (operator tooling)."""
        await self._call("set_killswitch", lambda: self.redis.set(self._ks_key(model_id), state))


def _is_write_refusal(err: ResponseError) -> bool:
    """Whether Redis refused a write for a reason that passes (memory, disk), not a bug.

    ``OOM`` replies arrive as :class:`~redis.exceptions.OutOfMemoryError` (redis-py strips
    the prefix; in a MULTI, the claim, it names the queued command); ``MISCONF`` as a plain
    ResponseError. Nothing was applied: a transaction with a refused command is discarded,
    and a script is refused at its first write command, before it changed anything."""
    return isinstance(err, OutOfMemoryError) or str(err).startswith("MISCONF")


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
