"""Worker pieces that need no services: ordering, stale-record filter, manual requests, CLI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any, NamedTuple

import orjson
import pytest
from aiokafka import TopicPartition

from stream.config import ServiceSettings
from stream.events import RawMessage
from stream.worker import (
    MANUAL_PREFIX,
    StageRunner,
    WorkerOptions,
    WorkerStats,
    _arrival_order,
    add_worker_commands,
    kafka_client_kwargs,
    manual_request,
)


class Rec(NamedTuple):
    offset: int


def _runner() -> StageRunner:
    r = StageRunner.__new__(StageRunner)
    r.stats = WorkerStats()
    r.stage = "ingest"
    return r


def test_fresh_drops_applied_and_repeated_offsets_keeps_gaps() -> None:
    r = _runner()
    tp = TopicPartition("t", 0)
    # a seek between two getmany calls of one batch: 5..7 arrives twice
    recs = [Rec(o) for o in (3, 4, 5, 6, 7, 5, 6, 7, 8, 11)]
    kept = r._fresh(tp, recs, expected=5)
    assert [x.offset for x in kept] == [5, 6, 7, 8, 11]  # 9, 10: a compaction gap is fine
    assert r.stats.counters["ingest_stale_records_dropped"] == 5
    assert r._fresh(tp, [Rec(1), Rec(2)], expected=3) == []


def test_stop_gives_up_on_a_stage_loop_that_swallows_its_cancellation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A shutdown is bounded: a loop stuck in an await that catches CancelledError (as a
    publish retrying against an unreachable broker does) is abandoned after
    STAGE_STOP_TIMEOUT_S, so the pod exits inside its grace period."""
    import stream.worker as w

    monkeypatch.setattr(w, "STAGE_STOP_TIMEOUT_S", 0.3)

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # swallowed

    async def main() -> float:
        r = _runner()
        r.consumer = None
        r.task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await r.stop()
        took = time.monotonic() - t0
        assert not r.task.done()
        return took

    with caplog.at_level(logging.ERROR, logger="driftline.worker"):
        loop = asyncio.new_event_loop()
        try:
            took = loop.run_until_complete(main())
        finally:
            for t in asyncio.all_tasks(loop):
                t.cancel()
            loop.close()
    assert 0.25 < took < 5.0
    assert "did not stop within" in caplog.text


def test_arrival_order_merges_topics_by_timestamp_keeping_each_topics_order() -> None:
    def m(topic: str, off: int) -> RawMessage:
        return RawMessage(topic, 0, off, b"")

    preds = [(10, m("p", 0)), (30, m("p", 1)), (20, m("p", 2))]  # skewed producer clock
    labels = [(15, m("l", 0)), (25, m("l", 1))]
    out = [(x.topic, x.offset) for x in _arrival_order([preds, labels])]
    assert [o for t, o in out if t == "p"] == [0, 1, 2]
    assert [o for t, o in out if t == "l"] == [0, 1]
    assert out[:2] == [("p", 0), ("l", 0)]
    assert _arrival_order([labels]) == [x for _, x in labels]


def test_manual_request_is_recognised_and_valid_json() -> None:
    raw = manual_request("fraud", "release", reason="ops", issued_at=12.5)
    assert raw.startswith(MANUAL_PREFIX)
    doc = orjson.loads(raw)
    assert (doc["driftline_manual"], doc["model_id"], doc["action"], doc["issued_at"]) == (
        1, "fraud", "release", 12.5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="valid values: rollback, fallback, throttle, release"):
        manual_request("fraud", "explode")


def test_options_from_env() -> None:
    o = WorkerOptions.from_env({"POD_NAME": "pod-7", "DRIFTLINE_REDIS_PREFIX": "x"})
    assert (o.instance_id, o.redis_prefix, o.start_from) == ("pod-7", "x", "earliest")
    assert (
        WorkerOptions.from_env({"DRIFTLINE_INSTANCE_ID": "a", "POD_NAME": "b"}).instance_id == "a"
    )
    with pytest.raises(ValueError, match=r"DRIFTLINE_START_FROM.*valid values: earliest, latest"):
        WorkerOptions.from_env({"DRIFTLINE_START_FROM": "middle"})


def test_kafka_security_settings_pass_through() -> None:
    s = ServiceSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                        sasl_username="u", sasl_password="p")  # fmt: skip
    kw: dict[str, Any] = kafka_client_kwargs(s)
    assert kw["security_protocol"] == "SASL_PLAINTEXT"
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "u", "p",
    )  # fmt: skip
    assert "ssl_context" not in kw
    assert "ssl_context" in kafka_client_kwargs(ServiceSettings(security_protocol="SSL"))


def test_cli_registration() -> None:
    parser = argparse.ArgumentParser()
    add_worker_commands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["worker", "--config", "m.yaml", "--stages", "ingest"])
    assert (a.config, a.stages, callable(a.func)) == ("m.yaml", "ingest", True)
    k = parser.parse_args(["killswitch", "release", "--model", "fraud", "--wait", "0"])
    assert (k.op, k.model, k.wait) == ("release", "fraud", 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["killswitch", "explode", "--model", "fraud"])
