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

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from scripts.services import RedisService
from stream.redis_store import RedisStore
from stream.store import Fenced, JoinOp, JoinResult, MemoryStore, OutMessage, StateStore
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


def test_join_keys_carry_the_label_horizon_as_ttl(redis_url: str) -> None:
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
        ttl_a = await store.redis.pttl(store._key("ingest", 2, "j:m:a"))
        ttl_b = await store.redis.pttl(store._key("ingest", 2, "j:m:b"))
        assert 3_500_000 < ttl_a <= 3_600_000
        assert 110_000 < ttl_b <= 120_000
        assert await store.redis.exists(store._key("ingest", 2, "j:m:zero")) == 0

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
        with pytest.raises(Fenced, match="generation 1 is stale"):
            await store.commit(
                "ingest", 1, old.generation, state=b"EVIL", next_offset={"p": 99},
                outbox=[OutMessage("o2", "t", b"k", b"v")],
                join_ops=[label("x"), park("y")], killswitch={"m": b"EVIL"},
            )  # fmt: skip
        with pytest.raises(Fenced):
            await store.ack_outbox("ingest", 1, old.generation, ["o1"])
        assert await dump() == before
        with pytest.raises(Fenced):  # never claimed: generation 0 is not valid either
            await store.commit("ingest", 9, 0, state=b"", next_offset={})
        r = await store.commit(
            "ingest", 1, new.generation, state=b"S1", next_offset={}, join_ops=[label("x")]
        )
        assert [o.outcome for o in r.outcomes] == ["joined"]

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
    st.sampled_from([600.0, 3600.0]),
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
