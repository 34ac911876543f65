"""Hostile-input details that need no services: dead-letter size per rejected event of an
array message, and the stage-2 state that remembers applied manual kill-switch requests."""

from __future__ import annotations

import base64
import json

import fastjsonschema
import orjson

from stream.demo import demo_config
from stream.detect import Detect
from stream.engine import compile_plans
from stream.events import DEADLETTER_RAW_LIMIT, Decoder, RawMessage, deadletter_record, load_schema
from stream.worker import _manual_ids_of, _with_manual_ids

NOW = 1_800_000_000.0


def _event(i: int, model: str) -> dict[str, object]:
    return {"event_id": f"e{i}", "model_id": model, "model_version": "v1",
            "request_id": f"r{i}", "ts": NOW - 10, "features": {"amount": 1.0 * i},
            "prediction": 1}  # fmt: skip


def test_each_rejected_event_of_an_array_keeps_its_own_bytes_not_the_message_head() -> None:
    events = [_event(i, f"flood-{i}") for i in range(2000)]
    raw = orjson.dumps(events)
    ok, bad = Decoder("prediction", frozenset({"fraud"})).decode(raw, NOW)
    assert ok == [] and len(bad) == len(events)
    validate = fastjsonschema.compile(load_schema("deadletter"))
    msg = RawMessage("driftline.predictions", 1, 5, raw)
    records = [deadletter_record(r, msg) for r in bad]
    for i, rec in enumerate(records):
        validate(rec)
        assert rec["reason"] == "unknown_model" and rec["index"] == i
        assert orjson.loads(base64.b64decode(rec["raw_b64"])) == events[i]
        assert rec["size"] == len(raw) and rec["raw_truncated"] is False
    total = sum(len(orjson.dumps(r)) for r in records)
    # the message's 4 KiB head once per event would be > 2000 * 5.4 KB
    assert total < len(events) * 600 < len(events) * DEADLETTER_RAW_LIMIT, total


def test_a_rejected_event_of_a_lenient_message_keeps_its_nan_token() -> None:
    bad_ev = {**_event(1, "fraud"), "score": float("nan")}
    raw = json.dumps([_event(0, "fraud"), bad_ev]).encode()
    ok, bad = Decoder("prediction", frozenset({"fraud"})).decode(raw, NOW)
    assert len(ok) == 1 and [r.reason for r in bad] == ["non_finite"]
    rec = deadletter_record(bad[0], RawMessage("t", 0, 0, raw))
    assert b'"score":NaN' in base64.b64decode(rec["raw_b64"])


def test_a_whole_message_reject_still_keeps_the_exact_head() -> None:
    raw = b"\xff not json" + b"z" * 10_000
    _, bad = Decoder("prediction").decode(raw, NOW)
    rec = deadletter_record(bad[0], RawMessage("t", 0, 0, raw))
    assert base64.b64decode(rec["raw_b64"]) == raw[:DEADLETTER_RAW_LIMIT]
    assert rec["raw_truncated"] is True


def test_manual_request_ids_ride_along_the_detect_state() -> None:
    cfg, profile = demo_config()
    plans = compile_plans(cfg, {"fraud": profile})
    det = Detect(cfg, plans, 0)
    det.manual("fraud", "rollback", NOW, target_version="v1")
    snap = det.snapshot()
    assert _with_manual_ids(snap, {}) == snap and _manual_ids_of(snap) == {}
    ids = dict.fromkeys(["a", "b", "c"])
    state = _with_manual_ids(snap, ids)
    assert list(_manual_ids_of(state)) == ["a", "b", "c"]
    again = Detect(cfg, plans, 0)
    again.restore(state)  # the extra key does not disturb the engine's own state
    assert again.snapshot() == snap
