"""RedisStore on the real Redis: the StateStore contract, round trips, outages, equivalence.

* the core contract (``tests/unit/stream/store_contract.py``) runs unchanged; TTL expiry is
  tested here with short real-time TTLs (Redis TTLs follow the server's clock);
* binary-safe keys and values, outbox order, fencing leaves every key untouched;
* exactly one round trip per commit, counted by ``RedisStore.round_trips`` and, independently,
  by the server's ``total_writes_processed`` (one reply write per request);
* a lost reply is retried without re-applying the join; a killed and restarted Redis stalls
  a commit instead of failing it;
* RedisStore and MemoryStore give identical results on random operation sequences.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from scripts.services import RedisService
from stream.redis_store import RedisStore
from stream.store import (
    Fenced,
    JoinOp,
    JoinOutcome,
    JoinResult,
    MemoryStore,
    OutMessage,
    StateStore,
)
from tests.unit.stream.store_contract import Factory, StoreContract, label, park

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class TestRedisStoreContract(StoreContract):
    """The shared contract, on the session's Redis (a fresh key prefix per store)."""

    real_time_ttl = True

    @pytest.fixture
    def make_store(self, redis_url: str) -> Factory:
        async def factory(clock: Callable[[], float]) -> StateStore:
            return RedisStore(redis_url, prefix=_prefix())

        return factory

    def test_ttl_expiry_turns_late_labels_into_early_labels(self, make_store: Factory) -> None:
        """The contract's fake-clock version cannot drive Redis TTLs: real time instead."""
        _ttl_expiry_real_time(make_store)


def _run(redis_url: str, body: Callable[[RedisStore], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        store = RedisStore(redis_url, prefix=_prefix(), **kw)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def _writes(client: redis.Redis) -> int:
    """Replies the server has written so far (this INFO's own reply comes after)."""
    return int(client.info("stats")["total_writes_processed"])


# --------------------------------------------------------------------------- TTL (real time)


def _ttl_expiry_real_time(make_store: Factory) -> None:
    async def body() -> None:
        store = await make_store(time.time)
        c = await store.claim("ingest", 0, "w")
        g = c.generation
        await store.commit(
            "ingest", 0, g, state=b"", next_offset={}, join_ops=[park("old", ttl=0.3)]
        )
        await asyncio.sleep(0.45)
        r = await store.commit(
            "ingest",
            0,
            g,
            state=b"",
            next_offset={},
            join_ops=[label("old", ttl=0.3), label("never-seen", ttl=0.3)],
        )
        assert r.pairs == ()
        assert [o.outcome for o in r.outcomes] == ["early", "early"]
        await asyncio.sleep(0.45)  # the early labels expire too
        r = await store.commit(
            "ingest", 0, g, state=b"", next_offset={}, join_ops=[park("never-seen", ttl=0.3)]
        )
        assert r.pairs == () and r.outcomes == ()
        # a joined marker expires as well: the same request can be parked again afterwards
        await store.commit("ingest", 0, g, state=b"", next_offset={}, join_ops=[label("j")])
        r = await store.commit(
            "ingest", 0, g, state=b"", next_offset={}, join_ops=[park("j", ttl=0.3)]
        )
        assert [o.outcome for o in r.outcomes] == ["joined"]
        r = await store.commit(
            "ingest", 0, g, state=b"", next_offset={}, join_ops=[park("j", ttl=0.3)]
        )
        assert [o.outcome for o in r.outcomes] == ["duplicate_request"]
        await asyncio.sleep(0.45)
        r = await store.commit(
            "ingest", 0, g, state=b"", next_offset={}, join_ops=[park("j", ttl=0.3)]
        )
        assert r.outcomes == ()  # parked afresh
        if isinstance(store, RedisStore):
            await store.close()

    asyncio.run(body())


def test_join_buffer_entries_carry_the_label_horizon_as_expiry(redis_url: str) -> None:
    async def body(store: RedisStore) -> None:
        c = await store.claim("ingest", 2, "w")
        await store.commit(
            "ingest",
            2,
            c.generation,
            state=b"",
            next_offset={},
            join_ops=[park("a", ttl=3600.0), label("b", ttl=120.0), park("zero", ttl=0.0)],
        )
        sec, usec = await store.redis.time()
        now_ms = sec * 1000 + usec // 1000
        meta = await store.redis.hgetall(store._key("ingest", 2, "jmeta"))
        width = int(meta[b"w"])
        assert width == 3_600_000 and int(meta[b"maxttl"]) == 3_600_000
        assert int(meta.get(b"v1until", 0)) == 0  # a fresh partition: no format-1 keys
        hk = store._key("ingest", 2, f"j2:{now_ms // width}")
        entries = await store.redis.hgetall(hk)
        assert set(entries) == {b"m:a", b"m:b"}  # a TTL of 0 parks nothing
        exp_a, exp_b = int(entries[b"m:a"][:13]), int(entries[b"m:b"][:13])
        assert 3_500_000 < exp_a - now_ms <= 3_600_000
        assert 110_000 < exp_b - now_ms <= 120_000
        assert entries[b"m:a"][13:14] == b"P" and entries[b"m:b"][13:14] == b"L"
        # the generation hash outlives every entry in it, and then goes away by itself
        assert exp_a < now_ms + await store.redis.pttl(hk) <= now_ms + 2 * width + 1000

    _run(redis_url, body)


@pytest.mark.parametrize("skew_ms", [0, 400, -3_600_000, 3_600_000])
def test_join_expiry_uses_redis_clock_when_the_worker_clock_is_off(
    redis_url: str, skew_ms: int
) -> None:
    """Expiries come from the worker's clock within 1 s of Redis's, else from Redis's."""

    async def body(store: RedisStore) -> None:
        store._wall_ms = lambda: int(time.time() * 1000) + skew_ms  # type: ignore[method-assign]
        c = await store.claim("ingest", 0, "w")
        g = c.generation
        await store.commit("ingest", 0, g, state=b"", next_offset={},
                           join_ops=[park("a", ttl=60.0), label("b", ttl=60.0)])  # fmt: skip
        sec, usec = await store.redis.time()
        now_ms = sec * 1000 + usec // 1000
        width = int((await store.redis.hgetall(store._key("ingest", 0, "jmeta")))[b"w"])
        entries = await store.redis.hgetall(store._key("ingest", 0, f"j2:{now_ms // width}"))
        used = skew_ms if abs(skew_ms) <= 1000 else 0
        for f in (b"m:a", b"m:b"):
            assert abs(int(entries[f][:13]) - (now_ms + used + 60_000)) < 500
        r = await store.commit("ingest", 0, g, state=b"", next_offset={},
                               join_ops=[label("a"), park("b")])  # fmt: skip
        assert [o.outcome for o in r.outcomes] == ["joined", "joined"]

    _run(redis_url, body)


def test_a_successor_with_a_slower_clock_finds_entries_across_a_generation_boundary(
    redis_url: str,
) -> None:
    """Worker A (clock 0.9 s ahead) writes just after a generation boundary on its clock;
    worker B (clock 0.9 s behind, still before that boundary) takes over: B must see A's
    entries and its own writes must not hide behind them."""

    async def body(store: RedisStore) -> None:
        width = 5_000  # the first batch's largest TTL
        store._wall_ms = lambda: int(time.time() * 1000) + 900  # type: ignore[method-assign]
        c = await store.claim("ingest", 0, "A")
        while True:  # Redis time 4.4-4.6 s into a generation: A is past the boundary, B not
            sec, usec = await store.redis.time()
            phase = (sec * 1000 + usec // 1000) % width
            if 4_400 <= phase <= 4_600:
                break
            await asyncio.sleep(((4_500 - phase) % width) / 1000)
        await store.commit("ingest", 0, c.generation, state=b"", next_offset={},
                           join_ops=[park("x", ttl=5.0), label("y", ttl=5.0)])  # fmt: skip
        b = RedisStore(redis_url, prefix=store.prefix)
        b._wall_ms = lambda: int(time.time() * 1000) - 900  # type: ignore[method-assign]
        try:
            cb = await b.claim("ingest", 0, "B")
            r = await b.commit("ingest", 0, cb.generation, state=b"", next_offset={},
                               join_ops=[label("x", ttl=5.0), park("z", ttl=5.0)])  # fmt: skip
            assert [o.outcome for o in r.outcomes] == ["joined"]
            r = await b.commit("ingest", 0, cb.generation, state=b"", next_offset={},
                               join_ops=[label("x", ttl=5.0), park("y", ttl=5.0),
                                         label("z", ttl=5.0)])  # fmt: skip
            assert [o.outcome for o in r.outcomes] == ["duplicate", "joined", "joined"]
        finally:
            await b.close()

    _run(redis_url, body)


def test_format1_join_buffer_and_inbox_survive_an_upgrade(redis_url: str) -> None:
    """What a format-1 worker (one key per request, JSON-object records) left behind is read."""

    def pred(v: str) -> str:
        return '{"v":"' + v + '","s":["region=eu"],"sc":0.25,"p":"1","ts":10.5}'

    inbox1 = orjson.dumps(
        {
            "meta": [["m", "x", 3], ["m", "y", 4]],
            "results": [["joined", pred("v0"), '{"y":"0","ts":11.5}'], ["parked", "", ""]],
        }
    )

    async def body(store: RedisStore) -> None:
        j = store._key("ingest", 0, "j:m:")
        await store.redis.set(j + "old", "P" + pred("v9"), px=60_000)
        await store.redis.set(j + "early", 'L{"y":"1","ts":12.5}', px=60_000)
        await store.redis.set(j + "done", "J", px=60_000)
        await store.redis.set(store._key("ingest", 0, "inbox"), inbox1)
        c = await store.claim("ingest", 0, "upgraded")
        assert c.inbox.outcomes == (JoinOutcome("m", 3, "joined"),)
        (p0,) = c.inbox.pairs
        assert (p0.request_id, p0.tick, p0.version, p0.label, p0.score) == ("x", 3, "v0", "0", 0.25)
        ops = [label("old", tick=5), park("early", tick=6), label("done"), park("done"),
               park("new"), label("new", tick=9)]  # fmt: skip
        r = await store.commit("ingest", 0, c.generation, state=b"", next_offset={}, join_ops=ops)
        assert [o.outcome for o in r.outcomes] == [
            "joined", "joined", "duplicate", "duplicate_request", "joined"
        ]  # fmt: skip
        assert [(p.request_id, p.version, p.label, p.tick) for p in r.pairs] == [
            ("old", "v9", "1", 5), ("early", "v1", "1", 6), ("new", "v1", "1", 9)
        ]  # fmt: skip
        assert (await store.redis.hgetall(store._key("ingest", 0, "jmeta")))[b"v1until"]
        r = await store.commit(
            "ingest", 0, c.generation, state=b"", next_offset={}, join_ops=[label("old")]
        )
        assert [o.outcome for o in r.outcomes] == ["duplicate"]  # joined stays joined
        assert (await store.claim("ingest", 0, "again")).inbox == r

    _run(redis_url, body)


# --------------------------------------------------------------------------- binary safety


def test_binary_safe_keys_values_and_exact_numbers(redis_url: str) -> None:
    odd_ids = ["a b", "x:y:z", "{tag}", "ünï©ødé-😀", "nul\x00byte", "" + "r" * 300]
    state = bytes(range(256)) * 4
    msgs = [
        OutMessage("id-ü", "tópic.α", b"\x00\xff\x10key", b"\x00value\xff" * 100),
        OutMessage("id:2", "t", b"", b""),
    ]

    async def body(store: RedisStore) -> None:
        c = await store.claim("ingest", 7, "wörker")
        g = c.generation
        ops = [park(r, ts=1_700_000_000.123456789, sc=0.1 + 0.2, p="ja✓") for r in odd_ids]
        await store.commit(
            "ingest", 7, g, state=state, next_offset={"prédictions": 2**53}, join_ops=ops,
            outbox=msgs,
        )  # fmt: skip
        r = await store.commit(
            "ingest", 7, g, state=state, next_offset={"prédictions": 2**53 + 1},
            join_ops=[label(rid, y="ÿes") for rid in odd_ids],
        )  # fmt: skip
        assert [p.request_id for p in r.pairs] == odd_ids
        for p in r.pairs:
            assert p.pred_ts == 1_700_000_000.123456789  # never rounded through Lua
            assert p.score == 0.1 + 0.2
            assert (p.prediction, p.label) == ("ja✓", "ÿes")
        c2 = await store.claim("ingest", 7, "other")
        assert c2.state == state
        assert c2.next_offset == {"prédictions": 2**53 + 1}
        assert c2.outbox == msgs
        assert c2.inbox == r
        await store.set_killswitch("m", b"\x00\xff")
        assert await store.get_killswitch("m") == b"\x00\xff"

    _run(redis_url, body)


def test_outbox_keeps_commit_order_beyond_lexicographic(redis_url: str) -> None:
    async def body(store: RedisStore) -> None:
        c = await store.claim("detect", 0, "w")
        ids = [f"s:0:{i}" for i in range(1, 25)]  # "s:0:10" < "s:0:9" as strings
        for chunk in (ids[:9], ids[9:]):
            await store.commit(
                "detect", 0, c.generation, state=b"", next_offset={},
                outbox=[OutMessage(i, "sum", b"k", i.encode()) for i in chunk],
            )  # fmt: skip
        # re-committing a pending id keeps its place (and takes the new value)
        await store.commit(
            "detect", 0, c.generation, state=b"", next_offset={},
            outbox=[OutMessage("s:0:3", "sum", b"k", b"again")],
        )  # fmt: skip
        c2 = await store.claim("detect", 0, "w2")
        assert [m.id for m in c2.outbox] == ids
        assert c2.outbox[2].value == b"again"
        mem = MemoryStore()
        mc = await mem.claim("detect", 0, "w")
        for chunk in (ids[:9], ids[9:], ["s:0:3"]):
            await mem.commit(
                "detect", 0, mc.generation, state=b"", next_offset={},
                outbox=[OutMessage(i, "sum", b"k", b"again" if i == "s:0:3" and chunk == ["s:0:3"]
                                   else i.encode()) for i in chunk],
            )  # fmt: skip
        assert (await mem.claim("detect", 0, "w2")).outbox == c2.outbox

    _run(redis_url, body)


# --------------------------------------------------------------------------- fencing


def test_fenced_commit_and_ack_change_no_key(redis_url: str) -> None:
    async def body(store: RedisStore) -> None:
        old = await store.claim("ingest", 1, "zombie")
        await store.commit(
            "ingest", 1, old.generation, state=b"S0", next_offset={"p": 3},
            outbox=[OutMessage("o1", "t", b"k", b"v")], join_ops=[park("x")],
            killswitch={"m": b"K0"},
        )  # fmt: skip
        new = await store.claim("ingest", 1, "owner")

        async def dump() -> dict[bytes, Any]:
            out: dict[bytes, Any] = {}
            async for key in store.redis.scan_iter(match=f"{store.prefix}:*"):
                kind = await store.redis.type(key)
                if kind == b"hash":
                    out[key] = await store.redis.hgetall(key)
                else:
                    out[key] = (await store.redis.get(key), await store.redis.pttl(key) > 0)
            return out

        before = await dump()
        with pytest.raises(Fenced, match="generation 1 is stale") as stale:
            await store.commit(
                "ingest", 1, old.generation, state=b"EVIL", next_offset={"p": 99},
                outbox=[OutMessage("o2", "t", b"k", b"v")],
                join_ops=[label("x"), park("y")], killswitch={"m": b"EVIL"},
            )  # fmt: skip
        assert not stale.value.state_lost  # another owner, not a lost partition
        with pytest.raises(Fenced) as stale:
            await store.ack_outbox("ingest", 1, old.generation, ["o1"])
        assert not stale.value.state_lost
        assert await dump() == before
        with pytest.raises(Fenced) as lost:  # never claimed: generation 0 is not valid either
            await store.commit("ingest", 9, 0, state=b"", next_offset={})
        assert lost.value.state_lost  # no generation at all: the store does not know it
        r = await store.commit(
            "ingest", 1, new.generation, state=b"S1", next_offset={}, join_ops=[label("x")]
        )
        assert [o.outcome for o in r.outcomes] == ["joined"]
        # the partition's keys deleted under its owner (FLUSHDB, DEL): commit and ack say
        # the state was lost rather than that someone else owns it
        await store.redis.delete(store._key("ingest", 1, "gen"))
        with pytest.raises(Fenced, match="no generation") as lost:
            await store.commit("ingest", 1, new.generation, state=b"S2", next_offset={})
        assert lost.value.state_lost
        with pytest.raises(Fenced) as lost:
            await store.ack_outbox("ingest", 1, new.generation, ["o1"])
        assert lost.value.state_lost

    _run(redis_url, body)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("n_join", "n_out"), [(0, 0), (1, 1), (3000, 40)])
def test_exactly_one_round_trip_per_commit(redis_url: str, n_join: int, n_out: int) -> None:
    info = redis.Redis.from_url(redis_url)

    async def body(store: RedisStore) -> None:
        c = await store.claim("ingest", 0, "w")
        # claim: one transaction
        rt0 = store.round_trips
        for batch in range(3):
            ops = [(park if i % 2 == 0 else label)(f"r{batch}-{i // 2}") for i in range(n_join)]
            outbox = [OutMessage(f"s{batch}-{i}", "sum", b"m", b"x" * 500) for i in range(n_out)]
            w0 = _writes(info)
            rt = store.round_trips
            r = await store.commit(
                "ingest", 0, c.generation, state=b"s" * 20_000, next_offset={"p": batch},
                outbox=outbox, join_ops=ops, killswitch={"m": b"{}"},
            )  # fmt: skip
            w1 = _writes(info)
            assert store.round_trips - rt == 1
            assert w1 - w0 - 1 == 1, f"server wrote {w1 - w0 - 1} replies for one commit"
            assert len(r.pairs) == n_join // 2
        w0 = _writes(info)
        await store.ack_outbox("ingest", 0, c.generation, [f"s0-{i}" for i in range(n_out)])
        assert _writes(info) - w0 - 1 == 1  # an ack is one request (fenced even when empty)
        assert store.round_trips - rt0 == 4

    try:
        _run(redis_url, body)
    finally:
        info.close()


def test_claim_is_one_round_trip_and_loads_the_scripts(redis_url: str) -> None:
    info = redis.Redis.from_url(redis_url)

    async def body(store: RedisStore) -> None:
        await store.redis.script_flush()
        w0 = _writes(info)
        c = await store.claim("detect", 4, "w")
        assert _writes(info) - w0 - 1 == 1 and store.round_trips == 1
        w0 = _writes(info)
        await store.commit("detect", 4, c.generation, state=b"", next_offset={})
        assert _writes(info) - w0 - 1 == 1  # no NOSCRIPT miss after a claim
        await store.redis.script_flush()  # what a restarted server looks like
        w0 = _writes(info)
        rt = store.round_trips
        await store.commit("detect", 4, c.generation, state=b"", next_offset={})
        assert _writes(info) - w0 - 1 == 3 == store.round_trips - rt  # miss, load, retry

    try:
        _run(redis_url, body)
    finally:
        info.close()


# --------------------------------------------------------------------------- failures


def test_lost_reply_is_retried_without_reapplying_the_join(redis_url: str) -> None:
    async def body(store: RedisStore) -> None:
        c = await store.claim("ingest", 0, "w")
        await store.commit("ingest", 0, c.generation, state=b"A", next_offset={},
                           join_ops=[park("q")])  # fmt: skip
        real = store._evalsha
        calls: list[int] = []

        async def lose_first_reply(*a: Any) -> Any:
            result = await real(*a)  # applied on the server ...
            calls.append(1)
            if len(calls) == 1:
                raise RedisConnectionError("reply lost")  # ... but the reply never arrives
            return result

        store._evalsha = lose_first_reply  # type: ignore[method-assign,assignment]
        r = await store.commit("ingest", 0, c.generation, state=b"B", next_offset={"p": 1},
                               join_ops=[label("q")])  # fmt: skip
        store._evalsha = real  # type: ignore[method-assign]
        assert len(calls) == 2 and store.retries == 1
        assert [o.outcome for o in r.outcomes] == ["joined"] and len(r.pairs) == 1
        c2 = await store.claim("ingest", 0, "w2")
        assert c2.inbox == r and c2.state == b"B"
        # and a genuinely new commit is applied normally afterwards
        r2 = await store.commit("ingest", 0, c2.generation, state=b"C", next_offset={},
                                join_ops=[label("q")])  # fmt: skip
        assert [o.outcome for o in r2.outcomes] == ["duplicate"]

    _run(redis_url, body, backoff_s=(0.01, 0.05))


def test_redis_outage_stalls_then_commits(redis_url: str) -> None:
    """A private Redis is SIGKILLed and restarted while a commit is being retried."""
    with RedisService() as service:

        async def body() -> None:
            store = RedisStore(service.url, prefix=_prefix(), backoff_s=(0.02, 0.2))
            try:
                c = await store.claim("ingest", 0, "w")
                await store.commit("ingest", 0, c.generation, state=b"before", next_offset={},
                                   join_ops=[park("k", ttl=3600.0)])  # fmt: skip
                await asyncio.sleep(1.2)  # past appendfsync everysec
                service.kill()
                task = asyncio.create_task(
                    store.commit("ingest", 0, c.generation, state=b"after",
                                 next_offset={"p": 5}, join_ops=[label("k", ttl=3600.0)])
                )  # fmt: skip
                await asyncio.sleep(1.0)
                assert not task.done(), "the commit should wait for Redis, not fail"
                assert store.retries >= 2
                service.start()  # main thread: PDEATHSIG follows the forking thread
                r = await asyncio.wait_for(task, 30)
                assert [o.outcome for o in r.outcomes] == ["joined"]
                c2 = await store.claim("ingest", 0, "w2")
                assert c2.state == b"after" and c2.next_offset == {"p": 5}
            finally:
                await store.close()

        asyncio.run(body())


def test_bounded_retry_raises(redis_url: str) -> None:
    async def body() -> None:
        store = RedisStore("redis://127.0.0.1:1/0", retry_for_s=0.3, backoff_s=(0.05, 0.1))
        t0 = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await store.claim("ingest", 0, "w")
        assert 0.2 < time.monotonic() - t0 < 5
        await store.close()

    asyncio.run(body())


# --------------------------------------------------------------------------- equivalence

_REQS = ("r0", "r1", "r2", "r3")
_op = st.tuples(
    st.sampled_from(["park", "label"]),
    st.sampled_from(["m1", "m2"]),
    st.sampled_from(_REQS),
    st.integers(0, 5),
    st.sampled_from([0.0, 600.0, 3600.0]),
    st.sampled_from(["0", "1"]),
)
_action = st.one_of(
    st.tuples(st.just("claim"), st.sampled_from(["ingest", "detect"]), st.integers(0, 1)),
    st.tuples(
        st.just("commit"),
        st.sampled_from(["ingest", "detect"]),
        st.integers(0, 1),
        st.booleans(),  # stale generation?
        st.lists(st.sampled_from([f"o{i}" for i in range(12)]), max_size=4),
        st.lists(_op, max_size=8),
        st.one_of(st.none(), st.dictionaries(st.sampled_from(["m1", "m2"]), st.binary(max_size=4))),
        st.binary(max_size=16),
    ),
    st.tuples(
        st.just("ack"),
        st.sampled_from(["ingest", "detect"]),
        st.integers(0, 1),
        st.booleans(),
        st.lists(st.sampled_from([f"o{i}" for i in range(12)]), max_size=4),
    ),
)


async def _apply(store: StateStore, actions: Sequence[tuple[Any, ...]]) -> list[Any]:
    gens: dict[tuple[str, int], int] = {}
    trace: list[Any] = []
    for a in actions:
        kind, stage, part = a[0], a[1], a[2]
        if kind == "claim":
            c = await store.claim(stage, part, "w")
            gens[(stage, part)] = c.generation
            trace.append(("claim", c))
            continue
        if (stage, part) not in gens:
            continue  # MemoryStore accepts generation 0 before any claim; Redis fences it
        gen = gens[(stage, part)] - (1 if a[3] else 0)
        try:
            if kind == "commit":
                _, _, _, _, out_ids, ops, ks, state = a
                outbox = [OutMessage(i, "t", b"k", state + i.encode()) for i in out_ids]
                jops = [
                    JoinOp(o, m, r, tick, ttl,
                           {"v": "v1", "s": ["a=b"], "sc": 0.5, "p": "1", "ts": 1.5}
                           if o == "park" else {"y": y, "ts": 2.5})
                    for o, m, r, tick, ttl, y in ops
                ]  # fmt: skip
                res: JoinResult = await store.commit(
                    stage, part, gen, state=state, next_offset={"t": len(trace)},
                    outbox=outbox, join_ops=jops if stage == "ingest" else (), killswitch=ks,
                )  # fmt: skip
                trace.append(("commit", res))
            else:
                await store.ack_outbox(stage, part, gen, a[4])
                trace.append(("ack", None))
        except Fenced:
            trace.append((kind, "fenced"))
    for m in ("m1", "m2"):
        trace.append(("ks", await store.get_killswitch(m)))
    return trace


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(actions=st.lists(_action, min_size=1, max_size=25))
def test_redis_and_memory_store_agree(redis_url: str, actions: list[tuple[Any, ...]]) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        mem = await _apply(MemoryStore(clock=lambda: 1000.0), actions)
        store = RedisStore(redis_url, prefix=_prefix())
        try:
            red = await _apply(store, actions)
        finally:
            await store.redis.delete(*[k async for k in store.redis.scan_iter(f"{store.prefix}:*")]
                                     or ["-"])  # fmt: skip
            await store.close()
        return mem, red

    mem, red = asyncio.run(main())
    assert red == mem
