"""The StateStore contract as reusable tests, parametrised over a store factory.

Use from any store's test module (the Redis store's integration tests run the same)::

    from tests.unit.stream.store_contract import StoreContract

    class TestRedisStore(StoreContract):
        @pytest.fixture
        def make_store(self, redis_url):
            async def factory(clock):          # clock: () -> float, the TTL time base
                return RedisStore(redis_url, clock=clock, namespace=uuid4().hex)
            return factory

A factory takes a ``clock`` callable (seconds) and returns a fresh, empty store. Stores
whose TTLs follow the server's wall clock may ignore ``clock``; the TTL tests then advance
time by sleeping only if ``real_time_ttl`` is set to True on the subclass (they are
otherwise driven by the fake clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from stream.store import Fenced, JoinOp, JoinResult, OutMessage, StateStore

Factory = Callable[[Callable[[], float]], Awaitable[StateStore]]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def park(req: str, tick: int = 1, ttl: float = 60.0, model: str = "m", **rec: Any) -> JoinOp:
    record = {"v": "v1", "s": ["region=eu"], "sc": 0.8, "p": "1", "ts": 10.0, **rec}
    return JoinOp("park", model, req, tick, ttl, record)


def label(req: str, y: str = "1", tick: int = 2, ttl: float = 60.0, model: str = "m") -> JoinOp:
    return JoinOp("label", model, req, tick, ttl, {"y": y, "ts": 20.0})


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


class StoreContract:
    """Subclass and provide a ``make_store`` fixture returning a :data:`Factory`."""

    real_time_ttl = False

    @pytest.fixture
    def make_store(self) -> Factory:  # pragma: no cover - overridden
        raise NotImplementedError

    # ----------------------------------------------------------------- claim / fencing

    def test_claim_increments_generation_and_starts_empty(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c1 = await store.claim("ingest", 0, "a")
            c2 = await store.claim("ingest", 0, "b")
            assert c2.generation == c1.generation + 1
            assert (c1.state, c1.next_offset, c1.outbox) == (None, None, [])
            assert c1.inbox == JoinResult()
            other = await store.claim("ingest", 1, "a")
            assert other.state is None  # partitions are independent

        run(body())

    def test_stale_generation_is_fenced(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            old = await store.claim("detect", 3, "zombie")
            new = await store.claim("detect", 3, "owner")
            with pytest.raises(Fenced):
                await store.commit("detect", 3, old.generation, state=b"x", next_offset={"t": 1})
            with pytest.raises(Fenced):
                await store.ack_outbox("detect", 3, old.generation, ["a"])
            await store.commit("detect", 3, new.generation, state=b"ok", next_offset={"t": 2})
            again = await store.claim("detect", 3, "owner")
            assert again.state == b"ok"  # the zombie's write never landed

        run(body())

    def test_unclaimed_partition_is_fenced(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            for gen in (0, 1):  # 0: what a worker holds before its first claim
                with pytest.raises(Fenced):
                    await store.commit(
                        "ingest", 5, gen, state=b"x", next_offset={"t": 1}, join_ops=[park("u")]
                    )
                with pytest.raises(Fenced):
                    await store.ack_outbox("ingest", 5, gen, ["a"])
            c = await store.claim("ingest", 5, "owner")
            assert (c.state, c.next_offset) == (None, None)  # nothing landed
            r = await store.commit(
                "ingest", 5, c.generation, state=b"", next_offset={}, join_ops=[label("u")]
            )
            assert r.outcomes[0].outcome == "early"  # the fenced park was not applied

        run(body())

    # ----------------------------------------------------------------- commit / outbox

    def test_commit_persists_state_offsets_and_outbox_together(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c = await store.claim("ingest", 0, "w")
            msgs = [
                OutMessage("s:0:1", "sum", b"m", b"{}"),
                OutMessage("s:0:2", "sum", b"m", b"[]"),
            ]
            await store.commit(
                "ingest",
                0,
                c.generation,
                state=b"S1",
                next_offset={"preds": 10, "labels": 4},
                outbox=msgs,
            )
            c2 = await store.claim("ingest", 0, "w2")
            assert c2.state == b"S1"
            assert c2.next_offset == {"preds": 10, "labels": 4}
            assert c2.outbox == msgs  # unpublished messages come back, in order
            await store.ack_outbox("ingest", 0, c2.generation, ["s:0:1"])
            more = [OutMessage("s:0:3", "sum", b"m", b"1")]
            await store.commit(
                "ingest",
                0,
                c2.generation,
                state=b"S2",
                next_offset={"preds": 11, "labels": 4},
                outbox=more,
            )
            c3 = await store.claim("ingest", 0, "w3")
            assert [m.id for m in c3.outbox] == ["s:0:2", "s:0:3"]
            assert c3.state == b"S2"

        run(body())

    def test_killswitch_state_roundtrip_and_commit(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            assert await store.get_killswitch("fraud") is None
            await store.set_killswitch("fraud", b'{"active":true}')
            assert await store.get_killswitch("fraud") == b'{"active":true}'
            c = await store.claim("detect", 0, "w")
            await store.commit(
                "detect",
                0,
                c.generation,
                state=b"",
                next_offset={},
                killswitch={"fraud": b'{"active":false}'},
            )
            assert await store.get_killswitch("fraud") == b'{"active":false}'

        run(body())

    # ----------------------------------------------------------------- join

    def test_join_prediction_then_label(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c = await store.claim("ingest", 0, "w")
            r1 = await store.commit(
                "ingest",
                0,
                c.generation,
                state=b"",
                next_offset={},
                join_ops=[park("r1"), park("r2")],
            )
            assert r1.pairs == ()
            r2 = await store.commit(
                "ingest",
                0,
                c.generation,
                state=b"",
                next_offset={},
                join_ops=[label("r1", "0", tick=7)],
            )
            (pair,) = r2.pairs
            assert (pair.request_id, pair.version, pair.prediction, pair.label) == (
                "r1",
                "v1",
                "1",
                "0",
            )
            assert pair.slices == ("region=eu",) and pair.score == 0.8
            assert pair.tick == 7  # the completing op's tick
            assert [o.outcome for o in r2.outcomes] == ["joined"]

        run(body())

    def test_label_before_prediction_is_early_then_joins(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c = await store.claim("ingest", 0, "w")
            r1 = await store.commit(
                "ingest", 0, c.generation, state=b"", next_offset={}, join_ops=[label("r9", tick=3)]
            )
            assert r1.pairs == () and [o.outcome for o in r1.outcomes] == ["early"]
            r2 = await store.commit(
                "ingest", 0, c.generation, state=b"", next_offset={}, join_ops=[park("r9", tick=5)]
            )
            assert [p.request_id for p in r2.pairs] == ["r9"] and r2.pairs[0].tick == 5
            assert [o.outcome for o in r2.outcomes] == ["joined"]

        run(body())

    def test_duplicates_and_ops_applied_in_order(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c = await store.claim("ingest", 0, "w")
            ops = [
                label("a", tick=1),
                park("a", tick=2),
                label("a", tick=3),
                park("a", tick=4),
                park("b", tick=4),
                park("b", tick=5),
            ]
            r = await store.commit(
                "ingest", 0, c.generation, state=b"", next_offset={}, join_ops=ops
            )
            assert [(o.outcome, o.tick) for o in r.outcomes] == [
                ("early", 1),
                ("joined", 2),
                ("duplicate", 3),
                ("duplicate_request", 4),
                ("duplicate_request", 5),
            ]
            assert [(p.request_id, p.tick) for p in r.pairs] == [("a", 2)]

        run(body())

    def test_join_is_scoped_by_model_and_partition(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c0 = await store.claim("ingest", 0, "w")
            c1 = await store.claim("ingest", 1, "w")
            await store.commit(
                "ingest",
                0,
                c0.generation,
                state=b"",
                next_offset={},
                join_ops=[park("r", model="m1")],
            )
            r = await store.commit(
                "ingest",
                0,
                c0.generation,
                state=b"",
                next_offset={},
                join_ops=[label("r", model="m2")],
            )
            assert r.pairs == () and r.outcomes[0].outcome == "early"
            r = await store.commit(
                "ingest",
                1,
                c1.generation,
                state=b"",
                next_offset={},
                join_ops=[label("r", model="m1")],
            )
            assert r.pairs == ()  # another partition never sees partition 0's parked prediction

        run(body())

    def test_ttl_expiry_turns_late_labels_into_early_labels(self, make_store: Factory) -> None:
        if self.real_time_ttl:
            pytest.skip("store TTLs follow the server clock; covered by the integration suite")

        async def body() -> None:
            clock = FakeClock()
            store = await make_store(clock)
            c = await store.claim("ingest", 0, "w")
            await store.commit(
                "ingest",
                0,
                c.generation,
                state=b"",
                next_offset={},
                join_ops=[park("old", ttl=30.0)],
            )
            clock.t += 31.0
            ops = [label("old", ttl=30.0), label("never-seen", ttl=30.0)]
            r = await store.commit(
                "ingest", 0, c.generation, state=b"", next_offset={}, join_ops=ops
            )
            assert r.pairs == ()
            assert [o.outcome for o in r.outcomes] == ["early", "early"]
            clock.t += 31.0  # the early labels expire too: a late prediction finds nothing
            r = await store.commit(
                "ingest",
                0,
                c.generation,
                state=b"",
                next_offset={},
                join_ops=[park("never-seen", ttl=30.0)],
            )
            assert r.pairs == () and r.outcomes == ()

        run(body())

    def test_inbox_returns_last_commit_pairs_at_claim(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            c = await store.claim("ingest", 0, "w")
            await store.commit(
                "ingest", 0, c.generation, state=b"A", next_offset={}, join_ops=[park("x")]
            )
            r = await store.commit(
                "ingest", 0, c.generation, state=b"B", next_offset={}, join_ops=[label("x")]
            )
            # crash here: the worker never folded r.pairs into its state
            c2 = await store.claim("ingest", 0, "w2")
            assert c2.state == b"B" and c2.inbox == r and len(c2.inbox.pairs) == 1
            await store.commit("ingest", 0, c2.generation, state=b"C", next_offset={})
            c3 = await store.claim("ingest", 0, "w3")
            assert c3.inbox == JoinResult()  # replaced by the next commit

        run(body())

    def test_fenced_commit_applies_no_join_ops(self, make_store: Factory) -> None:
        async def body() -> None:
            store = await make_store(FakeClock())
            old = await store.claim("ingest", 0, "zombie")
            new = await store.claim("ingest", 0, "owner")
            with pytest.raises(Fenced):
                await store.commit(
                    "ingest", 0, old.generation, state=b"", next_offset={}, join_ops=[park("z")]
                )
            r = await store.commit(
                "ingest", 0, new.generation, state=b"", next_offset={}, join_ops=[label("z")]
            )
            assert r.pairs == () and r.outcomes[0].outcome == "early"

        run(body())
