"""Producer SDK without a broker: partitioning, batching, back-pressure, kill-switch state."""

from __future__ import annotations

import random
import threading

import confluent_kafka
import orjson
import pytest

from stream.embedded import partition_for
from stream.partitioner import murmur2_partition
from stream.sdk import (
    DriftlineProducer,
    KillSwitchState,
    KillSwitchWatcher,
    _conf,
    batch_value,
    killswitch_from_mirror,
)

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: the producer never connects


def test_partitioner_matches_the_embedded_bus_and_kafkas_java_client() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        key = "".join(rng.choice("abcdefghij-0123456789é") for _ in range(rng.randint(0, 40)))
        n = rng.randint(1, 64)
        assert murmur2_partition(key.encode(), n) == partition_for(key.encode(), n)
        # librdkafka's Java-compatible murmur2: an implementation independent of ours
        assert murmur2_partition(key.encode(), n) == confluent_kafka.murmur2(key.encode(), n)


def test_batch_value_is_a_json_array_the_decoder_accepts() -> None:
    events = [{"event_id": f"e{i}", "x": i / 3} for i in range(5)]
    raw = batch_value(events)
    assert orjson.loads(raw) == events
    assert batch_value([orjson.dumps(e) for e in events]) == raw


def test_kafka_conf_passes_through_with_dotted_names() -> None:
    conf = _conf(
        "b:9092",
        {"ssl.ca.location": "/ca.pem"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
         "sasl_username": "u", "sasl_password": "p"},
    )  # fmt: skip
    assert conf == {
        "bootstrap.servers": "b:9092",
        "ssl.ca.location": "/ca.pem",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
    }


def test_full_queue_drops_and_counts_instead_of_blocking() -> None:
    sdk = DriftlineProducer(UNREACHABLE, max_queue=5, autostart=False)
    results = [
        sdk.log_prediction(model_id="m", model_version="v1", request_id=f"r{i}",
                           features={"a": 1.0}, prediction=1)
        for i in range(8)
    ]  # fmt: skip
    assert results == [True] * 5 + [False] * 3
    assert sdk.dropped == 3
    assert sdk.log_label(model_id="m", request_id="r0", label=1) is False
    assert sdk.dropped == 4
    assert sdk.close(0.1) == 5  # never started: the queued events are reported as left
    assert sdk.log_label(model_id="m", request_id="r0", label=1) is False  # closed


def test_events_carry_ids_timestamps_and_only_given_optionals() -> None:
    sdk = DriftlineProducer(UNREACHABLE, autostart=False)
    sdk.log_prediction(model_id="m", model_version="v1", request_id="r", features={"a": 1},
                       prediction="yes", score=0.5, slice={"region": "eu"}, ts=10.0)  # fmt: skip
    sdk.log_label(model_id="m", request_id="r", label="no")
    first, second = sdk._queue.get_nowait(), sdk._queue.get_nowait()
    assert first is not None and second is not None
    (k1, r1, pred), (k2, _, lab) = first, second
    assert (k1, r1, k2) == ("prediction", "r", "label")
    assert set(pred) == {"event_id", "model_id", "model_version", "request_id", "ts",
                         "features", "prediction", "score", "slice"}  # fmt: skip
    assert pred["ts"] == 10.0 and len(pred["event_id"]) == 32
    assert lab["ts"] > 1.6e9 and lab["label"] == "no"
    with pytest.raises(ValueError, match="valid values: prediction, label"):
        sdk.log_event("alert", {})
    sdk.close(0.1)


def test_invalid_sizes_name_the_field() -> None:
    with pytest.raises(ValueError, match="batch_events"):
        DriftlineProducer(UNREACHABLE, batch_events=0, autostart=False)
    with pytest.raises(ValueError, match="max_queue"):
        DriftlineProducer(UNREACHABLE, max_queue=0, autostart=False)


def _watcher() -> KillSwitchWatcher:
    w = KillSwitchWatcher.__new__(KillSwitchWatcher)
    w._states = {}
    w._lock = threading.Lock()
    w.on_change = None
    return w


def test_watcher_follows_trip_release_and_ignores_garbage() -> None:
    w = _watcher()
    seen: list[KillSwitchState] = []
    w.on_change = seen.append
    trip = {"command_id": "c1", "model_id": "fraud", "action": "rollback",
            "target_version": "v1", "mode": "automatic", "issued_at": 5.0}  # fmt: skip
    w.apply(orjson.dumps(trip))
    w.apply(orjson.dumps(trip))  # same state again: no second callback
    assert w.state("fraud") == KillSwitchState("fraud", True, "rollback", "v1", "c1", 5.0,
                                               "automatic")  # fmt: skip
    w.apply(b"not json")
    w.apply(None)
    w.apply(b'{"model_id": "fraud"}')
    assert w.state("fraud").active
    w.apply(orjson.dumps({"command_id": "c2", "model_id": "fraud", "action": "release",
                          "target_version": None, "mode": "manual", "issued_at": 9.0}))  # fmt: skip
    assert w.state("fraud") == KillSwitchState("fraud", False, None, None, "c2", 9.0, "manual")
    assert [s.active for s in seen] == [True, False]
    assert w.state("unknown") == KillSwitchState("unknown")


def test_mirror_reading_matches_the_engine_state_document() -> None:
    from stream.config import load_config_text
    from stream.policy import KillSwitch

    cfg = load_config_text(
        "models: {fraud: {features: {a: {type: numeric}}, kill_switch: [{name: r, when: "
        "{kind: concept_drift}, action: rollback, target_version: v1}]}}"
    )
    ks = KillSwitch(cfg.models["fraud"])
    ks.manual("fallback", 100.0, reason="test")
    st = killswitch_from_mirror(orjson.dumps(ks.to_state()), "fraud")
    assert (st.active, st.action, st.issued_at) == (True, "fallback", 100.0)
    ks.manual("release", 200.0)
    st = killswitch_from_mirror(orjson.dumps(ks.to_state()), "fraud")
    assert (st.active, st.action, st.target_version) == (False, None, None)
