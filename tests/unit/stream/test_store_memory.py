"""MemoryStore passes the StateStore contract."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from stream.store import (
    JoinBatch,
    JoinOp,
    JoinResult,
    MemoryStore,
    StateStore,
    decode_record,
    encode_record,
    make_pair,
)
from tests.unit.stream.store_contract import Factory, StoreContract, label, park


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def make_store(self) -> Factory:
        async def factory(clock: Callable[[], float]) -> StateStore:
            return MemoryStore(clock=clock)

        return factory


def test_unknown_stage_is_rejected_with_valid_values() -> None:
    with pytest.raises(ValueError, match="valid values: ingest, detect"):
        asyncio.run(MemoryStore().claim("bogus", 0, "w"))


# --------------------------------------------------------------------------- JoinBatch


def _ops() -> list[JoinOp]:
    return [
        park("a", tick=1, s=["r=eu", "t=1"], sc=None, p="ja✓", ts=1_700_000_000.123456789),
        label("a", "0", tick=2),
        label("b", "1", tick=3, model="m2"),
        park("b", tick=4, model="m2", sc=0.1 + 0.2),
        park("a", tick=5),
        label("c", tick=6, ttl=0.0),
    ]


def test_join_batch_holds_the_ops_as_columns_and_gives_them_back() -> None:
    ops = _ops()
    b = JoinBatch.from_ops(ops)
    assert JoinBatch.from_ops(b) is b
    assert len(b) == len(ops) and list(b) == ops and b[-1] == ops[-1]
    assert b.parks == [o.op == "park" for o in ops]
    assert (b.model_ids, b.request_ids) == ([o.model_id for o in ops], [o.request_id for o in ops])
    assert (b.ticks, b.ttl_s) == ([o.tick for o in ops], [o.ttl_s for o in ops])
    assert b.records[1] == b'["0",20.0]'
    assert list(b[1:3]) == ops[1:3]
    assert b.op_counts() == {("m", "park"): 2, ("m", "label"): 2, ("m2", "label"): 1,
                             ("m2", "park"): 1}  # fmt: skip
    with pytest.raises(IndexError):
        b[len(ops)]


def test_join_batch_rejects_bad_ops_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"join_ops\[0\]\.op: 'drop' is not valid; valid values"):
        JoinBatch.from_ops([JoinOp("drop", "m", "r", 1, 1.0, {})])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="park records need the fields v, s, sc, p, ts; missing"):
        JoinBatch.from_ops([JoinOp("park", "m", "r", 1, 1.0, {"v": "1"})])
    with pytest.raises(ValueError, match="equal lengths"):
        JoinBatch(parks=[True], model_ids=[], request_ids=[], ticks=[], ttl_s=[], records=[])


def test_records_old_and_compact_forms_decode_alike() -> None:
    rec = {"v": "v1", "s": ["r=eu"], "sc": 0.5, "p": "1", "ts": 2.5}
    assert decode_record("park", encode_record("park", rec)) == rec
    assert decode_record("park", orjson.dumps(rec)) == rec  # format 1 (JSON object)
    lab = {"y": "0", "ts": 3.0}
    compact = make_pair("m", "r", 7, orjson.loads(encode_record("park", rec)), [lab["y"], 3.0])
    assert compact == make_pair("m", "r", 7, rec, lab)
    assert compact.slices == ("r=eu",) and compact.label_ts == 3.0


def test_memory_store_gives_the_same_result_for_ops_and_their_batch() -> None:
    async def body(ops: list[JoinOp] | JoinBatch) -> list[JoinResult]:
        store = MemoryStore(clock=lambda: 1000.0)
        c = await store.claim("ingest", 0, "w")
        out = []
        for chunk in (ops[:3], ops[3:]):
            out.append(
                await store.commit(
                    "ingest", 0, c.generation, state=b"", next_offset={}, join_ops=chunk
                )
            )
        out.append((await store.claim("ingest", 0, "w2")).inbox)
        return out

    ops = _ops()
    plain = asyncio.run(body(ops))
    assert plain == asyncio.run(body(JoinBatch.from_ops(ops)))
    assert [(p.request_id, p.tick, p.prediction, p.label) for p in plain[1].pairs] == [
        ("b", 4, "1", "1")
    ]
    assert plain[0].pairs[0].pred_ts == 1_700_000_000.123456789
    assert plain[0].pairs[0].score is None and plain[0].pairs[0].slices == ("r=eu", "t=1")
    assert plain[2] == plain[1]
