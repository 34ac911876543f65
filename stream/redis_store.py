"""The production :class:`~stream.store.StateStore`: Redis, one Lua script per checkpoint.

Every checkpoint of a partition is ONE ``EVALSHA`` (one round trip): the script checks the
fencing generation, writes the state, the next offsets, the outbox and the kill-switch
mirrors, and performs the batch's label-join operations, all atomically (a Lua script runs
to completion or not at all as seen by other clients; unlike ``MULTI/EXEC`` it can branch
on what it reads, which the join and the fencing check need).

Keys of one partition share a hash tag, so in Redis Cluster they live in one slot (the
script declares all of them in ``KEYS`` except the join buffer's generation hashes, see
below)::

    {prefix}:{<stage>:<partition>}:gen       fencing generation (INCR on claim)
    {prefix}:{<stage>:<partition>}:owner     who claimed it last
    {prefix}:{<stage>:<partition>}:state     stage state (versioned JSON bytes)
    {prefix}:{<stage>:<partition>}:offsets   next offset per topic (JSON)
    {prefix}:{<stage>:<partition>}:outbox    hash: message id -> 16-digit sequence + packed
                                             message (claim returns them in commit order)
    {prefix}:{<stage>:<partition>}:outseq    outbox sequence counter
    {prefix}:{<stage>:<partition>}:last      token of the last applied commit (idempotent
                                             retry after a lost reply)
    {prefix}:{<stage>:<partition>}:inbox     last commit's join result (format "i2", below)
    {prefix}:{<stage>:<partition>}:jmeta     join buffer settings (hash: w = generation
                                             width ms, maxttl = largest TTL written ms,
                                             g = last generation written, v1until = until
                                             when format-1 keys may exist)
    {prefix}:{<stage>:<partition>}:j2:<g>    join buffer, generation g = floor(now / w):
                                             hash '<model>:<request_id>' -> 13-digit expiry
                                             (ms) + "P"+prediction | "L"+early
                                             label | "J" (joined); the hash expires once
                                             every entry in it has
    {prefix}:{<stage>:<partition>}:j:<model>:<request_id>
                                             format-1 join entry (one key per request, Redis
                                             TTL); read, never written, until v1until
    {prefix}:ks:<model>                      kill-switch mirror (standalone Redis; see
                                             docs/architecture.md for Cluster)

Label join, cost per op (issue 6): the batch's ops travel in four arguments (a JSON header
of lengths and TTL indices, the fields and the values concatenated, and a meta document the
script only stores), the script looks fields up with ``HMGET`` in chunks of 1,000 (newest
generation first; the first generation holding a field decides and an expired value counts
as absent, so TTLs are exact as in MemoryStore), applies the ops in order in Lua tables and
writes the changed fields with ``HSET`` in chunks: a few Redis commands per batch instead of
two per op. The generation hashes are built inside the script from the partition's prefix:
they are not declared in ``KEYS`` but carry the partition's hash tag, so in Redis Cluster
they hash to the slot of the declared keys. The reply is one string: a letter per op
(P parked, J joined, E early, D duplicate, R duplicate_request) followed by the joined ops'
counterpart records; the inbox adds the meta and the joined ops' own records.

Clock: the client writes each value whole (expiry on the worker's clock, kind, record), so
the script stores it without building a string. The script compares the worker's clock
with Redis's (``TIME``): within 1 s, expiries and "now" are the worker's (TTLs exact as in
MemoryStore; two workers' clocks may differ by up to 2 s); further off, the script rewrites
the expiries and judges them with Redis's clock. The generation a commit writes to never
goes back (``jmeta`` keeps the last one), and lookups reach 2 s further back, so a worker
whose clock is behind its predecessor's still finds every entry.

Records are compact JSON arrays built by the client (park ``[v, s, sc, p, ts]``, label
``[y, ts]``) and opaque to the script, so no number is rounded on the way (Lua's cjson would
print 14 digits); format-1 records (JSON objects) are still read.

Upgrade: the first commit with join ops on a partition whose inbox was written by a
format-1 worker sets ``v1until = now + largest TTL``; until then fields not found in the
generation hashes are also looked up as format-1 keys (``GET``), so a worker upgraded
mid-stream keeps the parked predictions and early labels. Format-1 inboxes are decoded too.
A downgrade is not supported (a format-1 worker does not read the generation hashes).
The generation width is fixed by the partition's first join batch (its largest TTL, at
least 1 s); raising the label horizon later makes every lookup read
``ceil(maxttl / w) + 1`` generations instead of 2.

Memory: an entry takes ~161 B in a generation hash (a format-1 key took ~250 B) but stays
until its hash expires, up to ``w + maxttl`` after it was written (1.5 horizons on average),
so the buffer's size stays about the same. ACL: the script runs ``HMGET``, ``HSET``,
``PEXPIREAT`` and ``TIME`` besides the string commands.

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
from itertools import chain
from operator import add
from typing import Any, Final, TypeVar

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream.store import (
    Claim,
    Fenced,
    JoinBatch,
    JoinedPair,
    JoinOp,
    JoinOutcome,
    JoinResult,
    OutMessage,
    make_pair,
)

STAGES = ("ingest", "detect")
log = logging.getLogger("driftline.redis")
_T = TypeVar("_T")

_COMMIT_LUA = """
-- KEYS: gen, state, offsets, outbox, inbox, outseq, last, join meta, then K kill-switch keys
-- ARGV: generation, state, offsets, n_outbox, n_killswitch, n_join, token,
--       outbox (id, packed) * n_outbox, killswitch values * n_killswitch,
--       then, if n_join > 0: the join buffer's hash prefix, the old (format 1) key prefix,
--       header json [field lengths, value lengths, ttl index per op, ttls in ms],
--       the fields '<model>:<request_id>' concatenated, the values concatenated
--       ('P' or 'L' + record json), meta (opaque; kept in the inbox for a restart).
-- Join buffer: hashes '<hash prefix><g>' per generation g = floor(now / W) (W, the
-- generation width, is fixed at the partition's first join; KEYS[8] holds W, the largest
-- TTL written and whether format-1 keys may still exist). A value is a 13-digit expiry
-- (ms) + 'P'/'L' + record, or + 'J'. A lookup reads the newest generation first; the first
-- one holding the field decides, and an expired value counts as absent (exact TTLs). The
-- generation hashes are not declared in KEYS: they carry the partition's hash tag, so they
-- live in the same slot as KEYS[1..8] (Redis Cluster runs the script on that slot's node).
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
  redis.call('SET', KEYS[8 + i], ARGV[a])
  a = a + 1
end
if n_join == 0 then
  redis.call('SET', KEYS[5], '')
  return ''
end
local sub, byte, call, unpack = string.sub, string.byte, redis.call, unpack
local pre2, pre1 = ARGV[a], ARGV[a + 1]
local hdr, fb, vb, meta = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
local h = cjson.decode(hdr)
local fl, vl, ti, T, wnow = h[1], h[2], h[3], h[4], h[5]
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- the values carry expiries on the worker's clock (wnow): used as they are when that clock
-- is within 1 s of Redis's, else rewritten with Redis's clock
local trusted = math.abs(wnow - now) <= 1000
if trusted then now = wnow end
local nows = string.format('%013d', now)
local batch_max = 0
for j = 1, #T do if T[j] > batch_max then batch_max = T[j] end end
local jm = call('HMGET', KEYS[8], 'w', 'maxttl', 'v1until', 'g')
local W, maxttl, v1until = tonumber(jm[1]), tonumber(jm[2]) or 0, tonumber(jm[3]) or 0
local lastg = tonumber(jm[4])
if not W then
  W = math.max(batch_max, 1000)
  local ib = call('GET', KEYS[5])
  if ib and byte(ib, 1) == 123 then -- '{': a format-1 worker wrote here before
    v1until = -1 -- decided below, once the largest TTL is known
  end
  call('HSET', KEYS[8], 'w', W)
end
local lookback = maxttl -- entries already written have TTLs <= maxttl
if batch_max > maxttl then
  maxttl = batch_max
  call('HSET', KEYS[8], 'maxttl', maxttl)
end
if v1until == -1 then
  v1until = now + maxttl
  call('HSET', KEYS[8], 'v1until', v1until)
end
-- writes never go to an older generation than an earlier commit's (workers' clocks may
-- differ by up to 2 s), so the newest generation holding a field has its latest value
local g = math.floor(now / W)
if lastg and lastg > g then g = lastg end
if g ~= lastg then call('HSET', KEYS[8], 'g', g) end
local EXP = {}
for j = 1, #T do EXP[j] = string.format('%013d', now + T[j]) end
-- the fields and values ('<13-digit expiry>P|L<record>') of the ops
local fields, vals = {}, {}
local fp, vp = 1, 1
for i = 1, n_join do
  local fe, ve = fp + fl[i], vp + vl[i] + 14
  fields[i] = sub(fb, fp, fe - 1)
  vals[i] = sub(vb, vp, ve - 1)
  fp, vp = fe, ve
end
-- the current value of each field: the newest generation holding it decides
local cur_of = {}
local todo = fields
local CH = 1000
local back = math.ceil((lookback + 2000) / W) -- + the clocks' spread
for gi = 0, back do
  if #todo == 0 then break end
  local hk = pre2 .. (g - gi)
  local left = {}
  for s = 1, #todo, CH do
    local e = math.min(s + CH - 1, #todo)
    local got = call('HMGET', hk, unpack(todo, s, e))
    for j = 1, e - s + 1 do
      local v = got[j]
      if v then cur_of[todo[s + j - 1]] = v else left[#left + 1] = todo[s + j - 1] end
    end
  end
  todo = left
end
if now < v1until then
  -- format-1 keys '<old prefix><field>' (Redis TTLs) written before this worker's upgrade
  for j = 1, #todo do
    local v = call('GET', pre1 .. todo[j])
    if v then cur_of[todo[j]] = '9999999999999' .. v end
  end
end
-- the ops, in order; cur_of carries each op's effect to the next op on the same field
local JV = {}
for j = 1, #T do JV[j] = EXP[j] .. 'J' end
local out, others, owns = {}, {}, {}
local wr, nw = {}, 0 -- HSET arguments: (field, value)*, a later value of a field wins
for i = 1, n_join do
  local f, val, tx = fields[i], vals[i], ti[i]
  local cur = cur_of[f]
  if cur and sub(cur, 1, 13) <= nows then cur = nil end -- expired
  local park = byte(val, 14) == 80 -- 'P'
  local v = nil
  if not cur then
    if T[tx] > 0 then
      if trusted then v = val else v = EXP[tx] .. sub(val, 14) end
    end
    if park then out[i] = 'P' else out[i] = 'E' end -- parked / early
  else
    local c = byte(cur, 14)
    if (park and c == 76) or (not park and c == 80) then -- the counterpart waits
      out[i] = 'J'
      others[#others + 1] = sub(cur, 15)
      owns[#owns + 1] = sub(val, 15)
      v = JV[tx]
    elseif park then
      out[i] = 'R' -- duplicate_request
    else
      out[i] = 'D' -- duplicate
    end
  end
  if v then
    cur_of[f] = v
    wr[nw + 1] = f
    wr[nw + 2] = v
    nw = nw + 2
  end
end
if nw > 0 then
  local hk = pre2 .. g
  for s = 1, nw, 2 * CH do
    call('HSET', hk, unpack(wr, s, math.min(s + 2 * CH - 1, nw)))
  end
  call('PEXPIREAT', hk, (g + 1) * W + maxttl + 1000)
end
-- reply: outcome letters + the joined ops' counterpart records; the inbox adds the meta
-- and the joined ops' own records (what a restarted worker needs to rebuild the result)
local res = table.concat(out) .. table.concat(others, ',')
local own = table.concat(owns, ',')
redis.call('SET', KEYS[5], 'i2 ' .. n_join .. ' ' .. #meta .. ' ' .. #own .. '\\n' .. meta
  .. own .. res)
return 'r' .. res
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


_OUTCOME_OF: Final = {
    ord("J"): "joined",
    ord("E"): "early",
    ord("D"): "duplicate",
    ord("R"): "duplicate_request",
}
_PARKED: Final = ord("P")


_KIND: Final = {True: b"P", False: b"L"}


def _join_args(batch: JoinBatch, now_ms: int) -> list[bytes]:
    """Header, fields, values and meta: all of a batch's join ops in four script arguments
    (C-level passes over the columns; no Python code runs per op). A value is the expiry on
    this worker's clock (13 digits, ms), ``P`` or ``L``, and the record."""
    mids = batch.model_ids
    colon = {m: m + ":" for m in set(mids)}
    fstr = list(map(add, map(colon.__getitem__, mids), batch.request_ids))
    flen = list(map(len, fstr))
    fb = "".join(fstr).encode()
    if len(fb) != sum(flen):  # non-ASCII: lengths in bytes
        enc = list(map(str.encode, fstr))
        flen = list(map(len, enc))
        fb = b"".join(enc)
    ttl_index: dict[float, int] = {}
    ttls: list[int] = []
    head: dict[tuple[float, bool], bytes] = {}
    for t in set(batch.ttl_s):
        ms = max(0, int(t * 1000))
        ttl_index[t] = len(ttls) + 1  # Lua tables are 1-based
        ttls.append(ms)
        exp = b"%013d" % (now_ms + ms)
        head[(t, True)] = exp + b"P"
        head[(t, False)] = exp + b"L"
    heads = map(head.__getitem__, zip(batch.ttl_s, batch.parks, strict=True))
    vb = b"".join(chain.from_iterable(zip(heads, batch.records, strict=True)))
    header = orjson.dumps(
        [
            flen,
            list(map(len, batch.records)),  # each value is 14 bytes longer
            list(map(ttl_index.__getitem__, batch.ttl_s)),
            ttls,
            now_ms,
        ]
    )
    meta = orjson.dumps([mids, batch.request_ids, batch.ticks])
    return [header, fb, vb, meta]


def _join_result(
    outcomes_raw: bytes,
    others_raw: bytes,
    own_records: bytes | Sequence[bytes],
    *,
    model_ids: Sequence[str],
    request_ids: Sequence[str],
    ticks: Sequence[int],
) -> JoinResult:
    """Outcome letters (one per op), the joined ops' stored counterpart records and their
    own records (all ops' records, or only the joined ones' as ``,``-joined bytes) -> result.
    """
    codes = np.frombuffer(outcomes_raw, np.uint8)
    idx: list[int] = np.flatnonzero(codes != _PARKED).tolist()
    if not idx:
        return JoinResult()
    of = _OUTCOME_OF
    outcomes = tuple([JoinOutcome(model_ids[i], ticks[i], of[outcomes_raw[i]]) for i in idx])
    joined = [i for i in idx if outcomes_raw[i] == 74]  # 'J'
    if not joined:
        return JoinResult((), outcomes)
    if not isinstance(own_records, bytes):
        own_records = b",".join([own_records[i] for i in joined])
    others = orjson.loads(b"[" + others_raw + b"]")
    owns = orjson.loads(b"[" + own_records + b"]")
    pairs = tuple(
        [
            # own records are compact: a prediction has 5 fields, a label 2
            make_pair(model_ids[i], request_ids[i], ticks[i], own, other)
            if len(own) == 5
            else make_pair(model_ids[i], request_ids[i], ticks[i], other, own)
            for i, own, other in zip(joined, owns, others, strict=True)
        ]
    )
    return JoinResult(pairs, outcomes)


def _decode_reply(raw: bytes | None, batch: JoinBatch) -> JoinResult:
    """The commit script's reply: ``r`` + outcome letters + counterpart records, or (a retry
    of an applied commit) the stored inbox."""
    if not raw:
        return JoinResult()
    if raw[:1] != b"r":
        return _decode_inbox(raw)
    n = len(batch)
    return _join_result(
        raw[1 : 1 + n],
        raw[1 + n :],
        batch.records,
        model_ids=batch.model_ids,
        request_ids=batch.request_ids,
        ticks=batch.ticks,
    )


def _decode_inbox(raw: bytes | str | None) -> JoinResult:
    """Turn a stored inbox back into a :class:`JoinResult` (current and previous format)."""
    if not raw:
        return JoinResult()
    if isinstance(raw, str):
        raw = raw.encode()
    if raw[:3] == b"i2 ":
        eol = raw.index(b"\n")
        n, mlen, olen = map(int, raw[3:eol].split())
        pos = eol + 1
        model_ids, request_ids, ticks = orjson.loads(raw[pos : pos + mlen])
        pos += mlen
        owns = raw[pos : pos + olen]
        pos += olen
        return _join_result(
            raw[pos : pos + n],
            raw[pos + n :],
            owns,
            model_ids=model_ids,
            request_ids=request_ids,
            ticks=ticks,
        )
    # format 1 (before the packed join arguments): {"meta": [[model, request, tick]..],
    # "results": [[outcome, pred json, label json]..]}
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
            pairs.append(
                make_pair(model, request_id, tick, orjson.loads(pred), orjson.loads(label))
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
        # monotonic time of the first failure of the request being retried now; None while
        # Redis answers (the worker reports not-ready meanwhile)
        self.failing_since: float | None = None

    @staticmethod
    def _wall_ms() -> int:
        """This worker's clock (ms): the join values' expiries (see the commit script)."""
        return int(time.time() * 1000)

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
                result = await fn()
            except (RedisConnectionError, RedisTimeoutError) as err:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
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
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
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
            else:
                self.failing_since = None
                return result

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
            current = str(err).split()[-1]  # 'false': the generation key is gone
            if current == "false":
                return Fenced(
                    f"{stage}/{partition}: Redis holds no generation for the partition any "
                    f"more (ours is {generation}): its keys were deleted",
                    state_lost=True,
                )
            return Fenced(
                f"{stage}/{partition}: generation {generation} is stale (current {current})"
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
        batch = JoinBatch.from_ops(join_ops)
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
        keys.append(k("jmeta"))
        keys += [self._ks_key(m) for m in ks]
        args: list[Any] = [
            generation,
            state,
            orjson.dumps(dict(next_offset)),
            len(outbox),
            len(ks),
            len(batch),
            token,
        ]
        for m in outbox:
            args += [m.id, _pack(m)]
        args += list(ks.values())
        if len(batch):
            # all join ops in four arguments (redis-py packs every argument in Python)
            args += [k("j2:"), k("j:"), *_join_args(batch, self._wall_ms())]
        try:
            raw = await self._call(
                "commit", lambda: self._evalsha(self._commit_sha, _COMMIT_LUA, keys, args)
            )
        except ResponseError as err:
            fenced = self._fenced(err, stage, partition, generation)
            if fenced is not None:
                raise fenced from None
            raise
        return _decode_reply(raw, batch)

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
