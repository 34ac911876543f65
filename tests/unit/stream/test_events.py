"""Decoder: every bad input is rejected with the right reason and decoding continues."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import fastjsonschema
import orjson
import pytest

from stream.events import (
    REASONS,
    Decoder,
    Label,
    Prediction,
    RawMessage,
    deadletter_record,
    load_schema,
)

NOW = 1_700_000_000.0


def pred(i: int = 0, **over: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event_id": f"e{i}",
        "model_id": "fraud",
        "model_version": "v1",
        "request_id": f"r{i}",
        "ts": NOW - 10,
        "features": {"amount": 12.5, "country": "DE"},
        "prediction": 1,
        "score": 0.7,
    }
    ev.update(over)
    return ev


def dec(kind: str = "prediction") -> Decoder:
    return Decoder(kind, frozenset({"fraud", "churn"}))  # type: ignore[arg-type]


def one_reject(raw: bytes, kind: str = "prediction") -> tuple[str, str]:
    ok, bad = dec(kind).decode(raw, NOW)
    assert ok == [] and len(bad) == 1, (ok, bad)
    return bad[0].reason, bad[0].message


def test_valid_prediction_and_label_decode_to_typed_records() -> None:
    ok, bad = dec().decode(orjson.dumps(pred(latency_ms=3, slice={"region": "eu"})), NOW)
    assert bad == []
    (p,) = ok
    assert isinstance(p, Prediction)
    assert (p.model_id, p.model_version, p.request_id, p.score, p.latency_ms) == (
        "fraud",
        "v1",
        "r0",
        0.7,
        3.0,
    )
    assert p.slice == {"region": "eu"}
    ok, bad = dec("label").decode(
        orjson.dumps(
            {"event_id": "l1", "model_id": "fraud", "request_id": "r0", "ts": 5, "label": 1}
        ),
        NOW,
    )
    assert bad == [] and isinstance(ok[0], Label) and ok[0].label == 1


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"{not json", "not_json", "message"),
        (b"\xff\xfe garbage", "not_json", "message"),
        (b'"a string"', "not_object", "event"),
        (b"42", "not_object", "event"),
        (
            orjson.dumps({k: v for k, v in pred().items() if k != "model_id"}),
            "missing_model_id",
            "model_id",
        ),
        (orjson.dumps(pred(model_id="spam")), "unknown_model", "model_id"),
        (orjson.dumps(pred(model_id="bad id{x}")), "schema:model_id", "model_id"),
        (orjson.dumps(pred(ts="yesterday")), "schema:ts", "ts"),
        (orjson.dumps(pred(ts=NOW + 365 * 86400)), "future_timestamp", "ts"),
        (orjson.dumps(pred(features=[1, 2])), "schema:features", "features"),
        (orjson.dumps(pred(features={"amount": {"nested": 1}})), "schema:features", "amount"),
        (orjson.dumps(pred(score="high")), "schema:score", "score"),
        (orjson.dumps(pred(latency_ms=-1)), "schema:latency_ms", "latency_ms"),
        (orjson.dumps(pred(cost_usd=True)), "schema:cost_usd", "cost_usd"),
        (orjson.dumps(pred(llm={"input_tokens": 1.5})), "schema:llm", "input_tokens"),
        (orjson.dumps(pred(colour="red")), "schema:unexpected_field", "colour"),
        (
            orjson.dumps({k: v for k, v in pred().items() if k != "request_id"}),
            "schema:request_id",
            "request_id",
        ),
        (json.dumps(pred(score=float("nan"))).encode(), "non_finite", "score"),
        (json.dumps(pred(ts=float("inf"))).encode(), "non_finite", "ts"),
        (json.dumps(pred(prediction=float("-inf"))).encode(), "non_finite", "prediction"),
        (
            b'{"event_id":"e","model_id":"fraud","model_version":"v","request_id":"r","ts":1e999,'
            b'"features":{},"prediction":1}',
            "non_finite",
            "ts",
        ),
    ],
)
def test_bad_prediction_rejected_with_reason_naming_field(
    raw: bytes, reason: str, field: str
) -> None:
    got_reason, message = one_reject(raw)
    assert got_reason == reason
    assert got_reason in REASONS
    assert field in message


def test_nan_inside_features_is_data_not_a_reject() -> None:
    ok, bad = dec().decode(json.dumps(pred(features={"amount": float("nan")})).encode(), NOW)
    (p,) = ok
    assert bad == [] and isinstance(p, Prediction) and math.isnan(p.features["amount"])


def test_too_large_message_rejected_before_parsing() -> None:
    big = orjson.dumps(pred(features={"blob": "x" * (5 * 1024 * 1024)}))
    reason, message = one_reject(big)
    assert reason == "too_large" and str(len(big)) in message


def test_array_message_rejects_bad_elements_and_keeps_good_ones() -> None:
    raw = orjson.dumps([pred(1), "nope", pred(2, model_id="spam"), pred(3), {"model_id": "fraud"}])
    ok, bad = dec().decode(raw, NOW)
    assert [p.event_id for p in ok] == ["e1", "e3"]
    assert [(r.position, r.reason) for r in bad] == [
        (1, "not_object"),
        (2, "unknown_model"),
        (4, "schema:event_id"),
    ]


def test_duplicate_event_ids_within_and_across_messages() -> None:
    d = dec()
    ok, bad = d.decode(orjson.dumps([pred(1), pred(1), pred(2)]), NOW)
    assert len(ok) == 2 and [r.reason for r in bad] == ["duplicate_event_id"]
    ok, bad = d.decode(orjson.dumps(pred(2)), NOW)
    assert ok == [] and bad[0].reason == "duplicate_event_id" and "e2" in bad[0].message
    # same event id for another model is not a duplicate
    ok, bad = d.decode(orjson.dumps(pred(2, model_id="churn")), NOW)
    assert len(ok) == 1 and bad == []


def test_decoding_continues_after_every_kind_of_bad_input() -> None:
    d = dec()
    stream = [
        b"{oops",
        b"[1,2",
        orjson.dumps(pred(100, model_id="spam")),
        b"x" * (2 << 20),
        json.dumps(pred(101, score=float("nan"))).encode(),
        orjson.dumps(pred(102, ts=NOW + 400 * 86400)),
        orjson.dumps(pred(103)),
        orjson.dumps(pred(103)),
        orjson.dumps(pred(104)),
    ]
    accepted: list[str] = []
    reasons: list[str] = []
    for raw in stream:
        ok, bad = d.decode(raw, NOW)
        accepted += [p.event_id for p in ok]
        reasons += [r.reason for r in bad]
    assert accepted == ["e103", "e104"]
    assert reasons == [
        "not_json",
        "not_json",
        "unknown_model",
        "too_large",
        "non_finite",
        "future_timestamp",
        "duplicate_event_id",
    ]


def test_label_rejects() -> None:
    good = {"event_id": "l1", "model_id": "fraud", "request_id": "r", "ts": 1, "label": 0}
    assert one_reject(orjson.dumps({**good, "label": None}), "label")[0] == "schema:label"
    assert one_reject(orjson.dumps({**good, "model_id": "x"}), "label")[0] == "unknown_model"
    assert one_reject(orjson.dumps({**good, "model_version": "v1"}), "label")[0] == (
        "schema:unexpected_field"
    )


def test_deadletter_record_matches_schema_and_keeps_exact_bytes() -> None:
    validate = fastjsonschema.compile(load_schema("deadletter"))
    raw = b"\xff\x00 not json" + b"z" * 10_000
    _, bad = dec().decode(raw, NOW)
    rec = deadletter_record(bad[0], RawMessage("driftline.predictions", 3, 77, raw), raw_limit=64)
    validate(rec)
    assert base64.b64decode(rec["raw_b64"]) == raw[:64]
    assert rec["raw_truncated"] is True and rec["size"] == len(raw)
    assert rec["deadletter_id"] == "driftline.predictions:3:77:-1"


def _label(i: int, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": f"l{i}",
        "model_id": "fraud" if i % 2 else "churn",
        "request_id": f"r{i}",
        "ts": NOW - 10 + i / 8,
        "label": [0, 1, "1", True, 0.0][i % 5],
    }
    doc.update(over)
    return doc


LABEL_MUTATIONS: list[dict[str, Any]] = [
    {},
    {"ts": 5},
    {"ts": -1},
    {"ts": True},
    {"ts": NOW + 10_000},
    {"label": None},
    {"label": [1]},
    {"model_id": "nope"},
    {"model_id": 7},
    {"event_id": ""},
    {"request_id": 3},
    {"extra": 1},
    {"event_id": "l0"},  # a duplicate of the first label
]


@pytest.mark.parametrize("mutation", LABEL_MUTATIONS)
def test_label_fast_path_gives_the_per_event_result(
    mutation: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole-message label validation is only a shortcut: events, rejects and the dedupe
    window come out as the per-event validator leaves them (or it declines)."""
    docs = [_label(i) for i in range(6)]
    docs[3] = {**docs[3], **mutation}
    raws = [orjson.dumps(docs), orjson.dumps(docs[:2]), orjson.dumps(_label(9))]
    fast = dec("label")
    got = [fast.decode(r, NOW) for r in raws]
    monkeypatch.setattr(Decoder, "_fast_labels", lambda self, docs, now: None)
    slow = dec("label")
    want = [slow.decode(r, NOW) for r in raws]
    assert got == want
    assert all(type(e) is Label for ok, _ in got for e in ok)
    assert fast._dedupe.cur == slow._dedupe.cur


def test_label_fast_path_takes_clean_messages_and_declines_bad_ones() -> None:
    d = dec("label")
    docs = [_label(i) for i in range(4)]
    ok = d._fast_labels(docs, NOW)
    assert ok is not None and [e.event_id for e in ok] == ["l0", "l1", "l2", "l3"]
    assert ok[0] == Label("l0", "churn", "r0", NOW - 10, 0)
    assert d._fast_labels(docs, NOW) is None  # now all duplicates
    assert d._fast_labels([_label(7, label=None)], NOW) is None
    assert d._fast_labels([{k: v for k, v in _label(8).items() if k != "ts"}], NOW) is None


# --------------------------------------------------------------------------- prediction fast path


def _dumps(obj: Any) -> bytes:
    """JSON bytes; unlike orjson, ints of any size."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _rich(i: int) -> dict[str, Any]:
    """A prediction with every optional field, varying by ``i``."""
    return pred(
        i,
        model_id="fraud" if i % 2 else "churn",
        ts=NOW - 10 + (i % 50) / 8,
        features={
            "amount": [12.5, 3, 0.0][i % 3],
            "country": ["DE", None, 7][i % 3],
            "flag": [True, False, 1.5][i % 3],
        },
        prediction=[1, 0.25, "yes", False][i % 4],
        score=[0.7, None][i % 2],
        latency_ms=[3.5, 0.0][i % 2],
        cost_usd=0.001,
        slice={"region": ["eu", "us"][i % 2]},
    )


def _without(key: str) -> dict[str, Any]:
    return {"__drop__": key}


PREDICTION_MUTATIONS: list[dict[str, Any]] = [
    {},
    {"ts": 5},  # int
    {"ts": 2**60},  # int beyond a float's exact range (and in the future)
    {"ts": -1.0},
    {"ts": True},
    {"ts": "1"},
    {"ts": NOW + 10_000},
    {"score": 1},  # int score
    {"score": True},
    {"score": "0.5"},
    {"latency_ms": None},  # an explicit null where only absence is allowed
    {"latency_ms": 4},
    {"latency_ms": -0.5},
    {"cost_usd": None},
    {"cost_usd": -1.0},
    {"slice": None},
    {"slice": {}},
    {"slice": {"region": 1}},
    {"slice": {"r" * 129: "eu"}},
    {"slice": {"region": "e" * 129}},
    {"slice": {f"k{j}": "v" for j in range(17)}},
    {"features": {}},
    {"features": {"amount": [1]}},
    {"features": {"amount": {"a": 1}}},
    {"features": {"x" * 129: 1.0}},
    {"features": {"x" * 128: 1.0}},
    {"features": {f"f{j}": 1.0 for j in range(513)}},
    {"features": {"amount": 2**70}},  # an int beyond 64 bits
    {"features": None},
    {"prediction": None},
    {"prediction": [1]},
    {"model_id": "nope"},
    {"model_id": 7},
    {"model_version": ""},
    {"model_version": "v" * 65},
    {"event_id": ""},
    {"event_id": "é" * 200},  # 200 characters, 400 bytes
    {"event_id": "😀" * 201},
    {"event_id": "e0"},  # a duplicate of the first event
    {"request_id": 3},
    {"extra": 1},
    {"llm": {"input_tokens": 3}},
    _without("score"),
    _without("latency_ms"),
    _without("slice"),
    _without("ts"),
    _without("features"),
]


def _mutated(docs: list[dict[str, Any]], at: int, mutation: dict[str, Any]) -> None:
    if "__drop__" in mutation:
        docs[at] = {k: v for k, v in docs[at].items() if k != mutation["__drop__"]}
    else:
        docs[at] = {**docs[at], **mutation}


def _decode_all(raws: list[bytes], monkeypatch: pytest.MonkeyPatch, off: tuple[str, ...]) -> Any:
    with monkeypatch.context() as m:
        for name in off:
            m.setattr(Decoder, name, lambda self, *a: None)
        d = dec()
        return [d.decode(r, NOW) for r in raws], d._dedupe.cur


@pytest.mark.parametrize("mutation", PREDICTION_MUTATIONS, ids=repr)
def test_prediction_fast_paths_give_the_per_event_result(
    mutation: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole-message column path is only a shortcut: events (types and values, ints
    kept ints), rejects and the dedupe window come out as the per-event validator leaves
    them — it either agrees or declines."""
    docs = [_rich(i) for i in range(6)]
    _mutated(docs, 3, mutation)
    raws = [
        _dumps(docs),
        _dumps(docs[:2]),
        _dumps(docs[3]),
        b" " + _dumps(docs[3:5]),
        _dumps([docs[3]]).replace(b'"event_id"', b'"event_id":"dup","event_id"', 1),
    ]
    fast = _decode_all(raws, monkeypatch, ())
    per_event = _decode_all(raws, monkeypatch, ("_fast_predictions",))
    assert fast == per_event
    for ok, _ in fast[0]:
        for got, want in zip(ok, per_event[0][0][0], strict=False):
            assert type(got) is Prediction
            assert [type(v) for v in got] == [type(v) for v in want]


def test_prediction_fast_paths_under_random_mutations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several mutations at once on random events of 200 random messages: both paths agree
    message by message (the dedupe window carried along)."""
    import random

    rng = random.Random(7)
    raws = []
    for k in range(200):
        docs = [_rich(100 * k + i) for i in range(rng.randint(1, 8))]
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            _mutated(docs, rng.randrange(len(docs)), rng.choice(PREDICTION_MUTATIONS))
        raws.append(_dumps(docs))
    fast = _decode_all(raws, monkeypatch, ())
    assert fast == _decode_all(raws, monkeypatch, ("_fast_predictions",))
    assert sum(len(ok) for ok, _ in fast[0]) > 300 and sum(len(b) for _, b in fast[0]) > 50


def test_prediction_fast_path_takes_clean_messages_and_declines_bad_ones() -> None:
    d = dec()
    docs = [_rich(i) for i in range(4)]
    ok = d._fast_predictions(docs, NOW)
    assert ok is not None and [e.event_id for e in ok] == ["e0", "e1", "e2", "e3"]
    assert ok[1] == Prediction("e1", "fraud", "v1", "r1", NOW - 10 + 1 / 8,
                               {"amount": 3, "country": None, "flag": False}, 0.25, None, 0.0,
                               0.001, {"region": "us"}, None)  # fmt: skip
    assert type(ok[1].features["amount"]) is int
    assert d._fast_predictions(docs, NOW) is None  # now all duplicates
    assert d._fast_predictions([_rich(9) | {"latency_ms": None}], NOW) is None
    assert d._fast_predictions([_rich(10) | {"score": 1}], NOW) is None
