"""Consumer batching: ``StageRunner._take`` closes a batch at ``batch_size`` records or after
``batch_within_s``; the consumer fetches ``fetch_partition_bytes`` per partition."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import pytest
from aiokafka import TopicPartition

import stream.worker as worker_mod
from stream.config import ConfigError, ServiceSettings
from stream.worker import StageRunner, WorkerOptions, WorkerStats

TP = TopicPartition("t", 0)


class Rec(NamedTuple):
    offset: int
    value: bytes | None


class FakeConsumer:
    """Hands out pre-set ``getmany`` results in order, then nothing; records the calls."""

    def __init__(self, batches: list[list[Rec]]) -> None:
        self.batches = list(batches)
        self.calls: list[tuple[int, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        self.calls.append((timeout_ms, max_records))
        if not self.batches:
            await asyncio.sleep(0)
            return {}
        return {TP: self.batches.pop(0)[:max_records]}


def _runner(settings: ServiceSettings | None = None) -> StageRunner:
    r = StageRunner.__new__(StageRunner)
    r.stats = WorkerStats()
    r.stage = "ingest"
    r.opts = WorkerOptions(idle_check_s=0.01)
    r.settings = settings or ServiceSettings()
    return r


def _recs(start: int, n: int) -> list[Rec]:
    return [Rec(start + i, b"x" * 100) for i in range(n)]


def _take(batches: list[list[Rec]], size: int, within: float) -> Any:
    consumer = FakeConsumer(batches)
    got = asyncio.run(_runner()._take(consumer, size, within))
    return got, consumer


def test_record_limit_closes_the_batch_and_bounds_each_fetch() -> None:
    got, consumer = _take([_recs(0, 3), _recs(3, 3), _recs(6, 3)], size=5, within=30.0)
    assert [r.offset for r in got[TP]] == [0, 1, 2, 3, 4]
    assert [m for _, m in consumer.calls] == [5, 2]


def test_records_are_gathered_until_the_deadline() -> None:
    got, consumer = _take([_recs(0, 2), _recs(2, 2), _recs(4, 2)], size=10_000, within=0.05)
    assert [r.offset for r in got[TP]] == [0, 1, 2, 3, 4, 5]
    assert len(consumer.calls) >= 4  # kept asking until `within` ran out


def test_empty_first_fetch_returns_at_once() -> None:
    got, consumer = _take([], size=5, within=30.0)
    assert got == {} and len(consumer.calls) == 1


def test_fetch_partition_bytes_from_env_names_the_variable() -> None:
    s = ServiceSettings.from_env({"DRIFTLINE_FETCH_PARTITION_BYTES": "4194304"})
    assert s.fetch_partition_bytes == 4 << 20
    assert ServiceSettings.from_env({}).fetch_partition_bytes == 8 << 20
    with pytest.raises(ConfigError, match="DRIFTLINE_FETCH_PARTITION_BYTES"):
        ServiceSettings.from_env({"DRIFTLINE_FETCH_PARTITION_BYTES": "100"})
    with pytest.raises(ConfigError, match="DRIFTLINE_FETCH_PARTITION_BYTES"):
        ServiceSettings.from_env({"DRIFTLINE_FETCH_PARTITION_BYTES": "lots"})


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("fetch", "max_message", "expected"),
    [(8 << 20, 1 << 20, 8 << 20), (1 << 20, 4 << 20, (4 << 20) + 4096)],
)
def test_consumer_fetches_the_configured_bytes_per_partition(
    monkeypatch: pytest.MonkeyPatch, fetch: int, max_message: int, expected: int
) -> None:
    seen: dict[str, Any] = {}

    def fake_consumer(**kw: Any) -> Any:
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(worker_mod, "AIOKafkaConsumer", fake_consumer)
    r = _runner(ServiceSettings(fetch_partition_bytes=fetch))
    r.opts = WorkerOptions(max_message_bytes=max_message)
    r.group_id, r.owner = "g", "o"
    with pytest.raises(_Stop):
        asyncio.run(r.start())
    assert seen["max_partition_fetch_bytes"] == expected
    assert seen["fetch_max_bytes"] >= expected
