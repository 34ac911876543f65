"""The producer SDK and the kill-switch watcher against the real broker."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from stream.partitioner import murmur2_partition
from stream.sdk import DriftlineProducer, KillSwitchState, KillSwitchWatcher
from tests.fixtures.services import TopicFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _read_all(bootstrap: str, topic: str, expected_events: int, timeout: float = 60.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    got: list[Any] = []
    n = 0
    deadline = time.monotonic() + timeout
    try:
        while n < expected_events and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is None:
                    got.append(msg)
                    n += len(orjson.loads(msg.value() or b"[]"))
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(str(err))
    finally:
        consumer.close()
    return got


def test_batches_land_where_keyed_messages_would(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    preds, labels = topic_factory(3), topic_factory(3)
    n = 3000
    with DriftlineProducer(kafka_bootstrap, predictions_topic=preds, labels_topic=labels,
                           batch_events=100, linger_s=0.02) as sdk:  # fmt: skip
        for i in range(n):
            assert sdk.log_prediction(model_id="fraud", model_version="v1", request_id=f"req-{i}",
                                      features={"amount": i * 1.5, "nan": float("nan")},
                                      prediction=i % 2, score=0.25, ts=1e9 + i)  # fmt: skip
            if i % 3 == 0:
                assert sdk.log_label(model_id="fraud", request_id=f"req-{i}", label=1)
        assert sdk.flush(30) == 0
        assert (sdk.sent_events, sdk.dropped, sdk.delivery_errors) == (n + n // 3, 0, 0)
        assert sdk.sent_messages < (n + n // 3) / 50  # several events per Kafka message

    # what a plain keyed producer with Kafka's Java partitioner does with the same keys
    keyed = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    java_partition: dict[str, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None
        java_partition[msg.key().decode()] = msg.partition()

    probe = topic_factory(3)
    for i in range(0, n, 7):
        keyed.produce(probe, key=f"req-{i}".encode(), value=b"{}", on_delivery=delivered)
    assert keyed.flush(30) == 0

    seen: dict[str, int] = {}
    for topic, expected in ((preds, n), (labels, n // 3)):
        msgs = _read_all(kafka_bootstrap, topic, expected)
        events = [(m.partition(), e) for m in msgs for e in orjson.loads(m.value())]
        assert len(events) == expected
        for part, ev in events:
            assert part == murmur2_partition(ev["request_id"].encode(), 3)
            if topic == preds:
                seen[ev["request_id"]] = part
                assert ev["features"]["nan"] is None  # NaN travels as null (missing)
            else:
                assert seen[ev["request_id"]] == part  # the label meets its prediction
    assert all(seen[k] == p for k, p in java_partition.items())


def test_killswitch_watcher_reads_history_then_follows(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    control = topic_factory(2, config={"cleanup.policy": "compact"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(model: str, action: str, cid: str, target: str | None = None) -> None:
        cmd = {"command_id": cid, "model_id": model, "action": action, "target_version": target,
               "mode": "manual", "issued_at": time.time()}  # fmt: skip
        producer.produce(control, key=model.encode(), value=orjson.dumps(cmd))
        assert producer.flush(10) == 0

    send("fraud", "rollback", "c1", "v1")
    send("spam", "fallback", "c2")
    send("fraud", "release", "c3")
    changes: list[KillSwitchState] = []
    changed = threading.Event()

    def on_change(st: KillSwitchState) -> None:
        changes.append(st)
        changed.set()

    watcher = KillSwitchWatcher(kafka_bootstrap, topic=control, on_change=on_change).start()
    try:
        assert watcher.wait_ready(30)
        assert watcher.state("fraud").active is False
        assert watcher.state("fraud").command_id == "c3"
        assert watcher.state("spam") == KillSwitchState(
            "spam", True, "fallback", None, "c2", watcher.state("spam").issued_at, "manual"
        )
        changed.clear()
        send("fraud", "throttle", "c4")
        assert changed.wait(15)
        assert watcher.state("fraud").active and watcher.state("fraud").action == "throttle"
        assert [c.command_id for c in changes if c.model_id == "fraud"][-1] == "c4"
    finally:
        watcher.close()
