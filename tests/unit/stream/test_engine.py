"""The pure engine: determinism across batch sizes, joins, late events, crash recovery."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from typing import Any

import fastjsonschema
import orjson
import pytest

from stream.config import MonitorConfig
from stream.demo import demo_config
from stream.engine import Detect, Ingest, compile_plans
from stream.events import RawMessage, load_schema
from stream.profile import Profile
from stream.scenario import START, generate
from stream.store import MemoryStore

SUMMARY_SCHEMA = fastjsonschema.compile(load_schema("summary"))
ALERT_SCHEMA = fastjsonschema.compile(load_schema("alert"))
CONTROL_SCHEMA = fastjsonschema.compile(load_schema("control"))
PRED, LAB = "driftline.predictions", "driftline.labels"


@pytest.fixture(scope="module")
def setup() -> tuple[MonitorConfig, Profile]:
    return demo_config()


def to_messages(preds: list[dict[str, Any]], labels: list[dict[str, Any]]) -> list[RawMessage]:
    """Interleave predictions and labels by ts as one partition's arrival order."""
    evs = sorted(
        [(p["ts"], 0, p) for p in preds] + [(lab["ts"], 1, lab) for lab in labels],
        key=lambda x: (x[0], x[1]),
    )
    out: list[RawMessage] = []
    offs = {PRED: 0, LAB: 0}
    for _, kind, ev in evs:
        topic = PRED if kind == 0 else LAB
        out.append(RawMessage(topic, 0, offs[topic], orjson.dumps(ev)))
        offs[topic] += 1
    return out


def run_ingest(
    cfg: MonitorConfig,
    prof: Profile,
    msgs: list[RawMessage],
    batch: int,
    crash_at: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drive stage 1 like a worker (commit with join ops, absorb); optionally crash once
    between a commit and the absorb, then recover from the store's claim (state + inbox)."""
    plans = compile_plans(cfg, {"fraud": prof})

    async def body() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        crash = crash_at
        store = MemoryStore(clock=lambda: 0.0)
        ing = Ingest(cfg, plans, 0, tick_s=1.0, lateness_s=2.0, max_future_s=math.inf)
        gen = (await store.claim("ingest", 0, "w")).generation
        published: list[Any] = []
        i = 0
        while i < len(msgs):
            chunk = msgs[i : i + batch]
            i += len(chunk)
            out = ing.process_raw(chunk, now=START + 1e6)
            res = await store.commit(
                "ingest",
                0,
                gen,
                state=ing.snapshot(),
                next_offset=out.next_offset,
                outbox=out.messages,
                join_ops=out.join_ops,
            )
            if crash is not None and i >= crash:
                crash = None
                # crash: out.messages never published, res never absorbed
                claim = await store.claim("ingest", 0, "w2")
                gen = claim.generation
                ing = Ingest(cfg, plans, 0, tick_s=1.0, lateness_s=2.0, max_future_s=math.inf)
                ing.restore(claim.state, claim.inbox)
                published.extend(claim.outbox)
                i = sum(
                    (claim.next_offset or {}).values()
                )  # single partition: offsets add up to position
                continue
            ing.absorb(res)
            published.extend(out.messages)
        out = ing.flush(START + 1e6)
        published.extend(out.messages)
        seen: set[str] = set()
        summaries: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        for m in published:
            if m.id in seen:  # at-least-once publishing: consumers drop seen ids
                continue
            seen.add(m.id)
            (summaries if m.topic == "driftline.summaries" else dead).append(orjson.loads(m.value))
        return summaries, dead

    return asyncio.run(body())


def assert_same_summaries(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [s["summary_id"] for s in a] == [s["summary_id"] for s in b]
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-12) if False else _close(x, y), x["summary_id"]


def _close(x: Any, y: Any) -> bool:
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return (
            isinstance(y, list)
            and len(x) == len(y)
            and all(_close(p, q) for p, q in zip(x, y, strict=True))
        )
    if isinstance(x, float) or isinstance(y, float):
        return math.isclose(float(x), float(y), rel_tol=1e-12, abs_tol=1e-9)
    return bool(x == y)


@pytest.fixture(scope="module")
def scenario_msgs() -> list[RawMessage]:
    preds, labels = generate(rate=8.0, seed=21)
    return to_messages(preds, labels)


def test_same_input_any_batch_size_same_summaries(
    setup: Any, scenario_msgs: list[RawMessage]
) -> None:
    cfg, prof = setup
    ref, _ = run_ingest(cfg, prof, scenario_msgs, batch=100_000)
    assert len(ref) > 250
    for batch in (1, 17, 640):
        got, _ = run_ingest(
            cfg, prof, scenario_msgs[: len(scenario_msgs) // (4 if batch == 1 else 1)], batch
        )
        want = (
            ref
            if batch != 1
            else run_ingest(cfg, prof, scenario_msgs[: len(scenario_msgs) // 4], 5000)[0]
        )
        assert_same_summaries(got, want)
    joined = sum(g["joined"]["n"] for s in ref for g in s["groups"] if g["slice"] == "*")
    assert joined > 500  # the comparison covered joined pairs too


def test_summaries_match_the_schema_and_count_everything(
    setup: Any, scenario_msgs: list[RawMessage]
) -> None:
    cfg, prof = setup
    summaries, dead = run_ingest(cfg, prof, scenario_msgs, batch=500)
    for s in summaries:
        SUMMARY_SCHEMA(s)
    assert dead == []
    n_pred = sum(1 for m in scenario_msgs if m.topic == PRED)
    n_lab = sum(1 for m in scenario_msgs if m.topic == LAB)
    assert sum(g["n"] for s in summaries for g in s["groups"] if g["slice"] == "*") == n_pred
    assert sum(s["labels"]["n"] for s in summaries) == n_lab
    # every labelled request joins: its prediction came first (labels are 5-30 s later)
    outcomes: Counter[str] = Counter()
    for s in summaries:
        outcomes.update(s["labels"]["outcomes"])
    assert outcomes == {"joined": n_lab}
    # slice groups partition the traffic
    per_slice = sum(
        g["n"] for s in summaries for g in s["groups"] if g["slice"].startswith("region=")
    )
    assert per_slice == n_pred
    # the 0-1 -> 0-100 scale break is visible in the summaries: out-of-range counts
    oor = {
        s["tick"] - int(START): g["features"]["seller_quality_score"]["out_of_range"]
        for s in summaries
        for g in s["groups"]
        if g["slice"] == "*"
    }
    assert sum(v for t, v in oor.items() if 90 <= t < 120) > 100
    assert sum(v for t, v in oor.items() if not 90 <= t < 120) == 0


def test_crash_between_commit_and_absorb_loses_nothing(
    setup: Any, scenario_msgs: list[RawMessage]
) -> None:
    cfg, prof = setup
    msgs = scenario_msgs[:1500]
    ref, _ = run_ingest(cfg, prof, msgs, batch=50)
    for crash_at in (400, 1000):
        got, _ = run_ingest(cfg, prof, msgs, batch=50, crash_at=crash_at)
        assert_same_summaries(got, ref)


def ev(i: int, ts: float, **over: Any) -> dict[str, Any]:
    e = {
        "event_id": f"e{i}",
        "model_id": "fraud",
        "model_version": "v1",
        "request_id": f"r{i}",
        "ts": ts,
        "features": {
            "amount": 10.0,
            "merchant_risk": 0.2,
            "seller_quality_score": 0.7,
            "account_age_days": 5.0,
            "country": "DE",
            "channel": "web",
        },
        "prediction": 1,
        "score": 0.7,
        "slice": {"region": "eu"},
    }
    e.update(over)
    return e


def lab(i: int, ts: float, y: int = 1, req: str | None = None) -> dict[str, Any]:
    return {
        "event_id": f"l{i}",
        "model_id": "fraud",
        "request_id": req or f"r{i}",
        "ts": ts,
        "label": y,
    }


def test_late_events_go_to_the_open_tick_and_are_counted(setup: Any) -> None:
    cfg, prof = setup
    T = START
    msgs = to_messages([ev(0, T + 0.5), ev(1, T + 10.2)], [])
    msgs.append(RawMessage(PRED, 0, 2, orjson.dumps(ev(2, T + 1.5))))  # tick 1 closed at wm 10.2
    msgs.append(RawMessage(PRED, 0, 3, orjson.dumps(ev(3, T + 9.0))))  # tick 9 still open
    summaries, _ = run_ingest(cfg, prof, msgs, batch=1)
    by_tick = {s["tick"] - int(T): s for s in summaries}
    assert sorted(by_tick) == [0, 9, 10]
    assert by_tick[10]["late"] == 1 and by_tick[10]["groups"][0]["n"] == 2
    assert by_tick[9]["late"] == 0 and by_tick[0]["late"] == 0


def test_bad_inputs_dead_letter_and_processing_continues(setup: Any) -> None:
    cfg, prof = setup
    T = START
    good = [ev(0, T + 1), ev(1, T + 2)]
    msgs = to_messages(good, [])
    bad_values = [
        b"{not json",
        b"[1, 2]",
        orjson.dumps({"model_id": "fraud"}),
        orjson.dumps(ev(5, T + 3, model_id="spam")),
        b"x" * (2 << 20),
        json.dumps(ev(6, T + 3, score=float("nan"))).encode(),
        orjson.dumps(ev(7, T + 3)),
        orjson.dumps(ev(7, T + 3)),
    ]
    for j, raw in enumerate(bad_values):
        msgs.append(RawMessage(PRED, 0, 2 + j, raw))
    msgs.append(RawMessage(PRED, 0, 20, orjson.dumps(ev(8, T + 4))))
    plans = compile_plans(cfg, {"fraud": prof})
    ing = Ingest(cfg, plans, 0, max_future_s=math.inf)
    out = ing.process_raw(msgs, now=T + 100)
    assert out.rejected == Counter(
        {
            "not_json": 1,
            "not_object": 2,
            "schema:event_id": 1,
            "unknown_model": 1,
            "too_large": 1,
            "non_finite": 1,
            "duplicate_event_id": 1,
        }
    )
    assert out.accepted == 4  # e0, e1, e7 (first copy), e8
    dead = [orjson.loads(m.value) for m in out.messages if m.topic == "driftline.deadletter"]
    schema = fastjsonschema.compile(load_schema("deadletter"))
    for d in dead:
        schema(d)
    assert [d["offset"] for d in dead if d["reason"] == "not_object"] == [3, 3]
    assert out.next_offset == {PRED: 21}


def test_label_before_prediction_and_label_for_unknown_request(setup: Any) -> None:
    cfg, prof = setup
    T = START
    msgs = [
        RawMessage(LAB, 0, 0, orjson.dumps(lab(1, T + 1.0, y=0))),  # early label
        RawMessage(LAB, 0, 1, orjson.dumps(lab(9, T + 1.1, req="nobody"))),  # never predicted
        RawMessage(PRED, 0, 0, orjson.dumps(ev(1, T + 1.2))),  # joins the early one
        RawMessage(LAB, 0, 2, orjson.dumps(lab(1, T + 1.3, y=0) | {"event_id": "l1b"})),  # dup
    ]
    for batch in (1, 4):
        summaries, _ = run_ingest(cfg, prof, msgs, batch=batch)
        (s,) = summaries
        assert s["labels"]["outcomes"] == {"early": 2, "joined": 1, "duplicate": 1}
        g = next(g for g in s["groups"] if g["slice"] == "*")
        assert g["joined"]["n"] == 1 and g["joined"]["errors"] == 1  # predicted 1, label 0
        eu = next(g for g in s["groups"] if g["slice"] == "region=eu")
        assert eu["joined"]["n"] == 1


def run_detect(
    cfg: MonitorConfig, prof: Profile, summaries: list[dict[str, Any]], batch: int
) -> list[dict[str, Any]]:
    det = Detect(cfg, compile_plans(cfg, {"fraud": prof}), 0)
    alerts: list[dict[str, Any]] = []
    for i in range(0, len(summaries), batch):
        out = det.process(summaries[i : i + batch])
        alerts += out.alerts
        # restart from the snapshot every batch: state round-trips exactly
        fresh = Detect(cfg, compile_plans(cfg, {"fraud": prof}), 0)
        fresh.restore(det.snapshot())
        det = fresh
    return alerts


def test_stage2_same_alerts_for_any_batching_and_dedupes(
    setup: Any, scenario_msgs: list[RawMessage]
) -> None:
    cfg, prof = setup
    summaries, _ = run_ingest(cfg, prof, scenario_msgs, batch=300)
    a1 = run_detect(cfg, prof, summaries, batch=len(summaries))
    a2 = run_detect(cfg, prof, summaries, batch=7)
    assert [a["alert_id"] for a in a1] == [a["alert_id"] for a in a2]
    assert a1 == a2
    for a in a1:
        ALERT_SCHEMA(a)
    assert any(a["kind"] == "data_quality" for a in a1)
    # redelivered summaries (at-least-once) change nothing
    det = Detect(cfg, compile_plans(cfg, {"fraud": prof}), 0)
    first = det.process(summaries).alerts
    again = det.process(summaries[len(summaries) // 2 :])
    assert again.alerts == [] and again.duplicates == len(summaries) - len(summaries) // 2
    assert first == a1
    # alert ids are deterministic and unique
    assert len({a["alert_id"] for a in a1}) == len(a1)
    assert all(a["config_hash"] == cfg.config_hash and a["reference_id"] == prof.id for a in a1)


def test_type_break_and_missing_required_feature_alert_as_schema_at_once(setup: Any) -> None:
    cfg, prof = setup
    preds, _ = generate(rate=50.0, seed=5)
    preds = [p for p in preds if p["ts"] < START + 80]  # stationary part only
    for p in preds:
        if p["ts"] >= START + 40:
            p["features"]["merchant_risk"] = str(p["features"]["merchant_risk"])  # type break
        if p["ts"] >= START + 60:
            del p["features"]["amount"]  # a required feature disappears
    summaries, _ = run_ingest(cfg, prof, to_messages(preds, []), batch=200)
    det = Detect(cfg, compile_plans(cfg, {"fraud": prof}), 0)
    alerts = det.process(summaries).alerts
    first = {(a["detector"], a["feature"]): a for a in reversed(alerts)}
    wt = first[("quality.wrong_type", "merchant_risk")]
    assert wt["kind"] == "schema" and START + 40 < wt["detected_at"] <= START + 42
    miss = first[("quality.missing", "amount")]
    assert miss["kind"] == "schema" and START + 60 < miss["detected_at"] <= START + 62
    assert all(a["detected_at"] > START + 40 for a in alerts)  # nothing before the break


def test_new_upstream_field_is_counted_in_summaries(setup: Any) -> None:
    cfg, prof = setup
    preds, _ = generate(rate=50.0, seed=6)
    preds = [p for p in preds if p["ts"] < START + 60]
    added = 0
    for p in preds:
        if p["ts"] >= START + 30:
            p["features"]["seller_quality_score_v2"] = 55.0
            added += 1
    summaries, _ = run_ingest(cfg, prof, to_messages(preds, []), batch=200)
    for s in summaries:
        SUMMARY_SCHEMA(s)
    counted = {
        s["tick"] - int(START): g["unexpected_features"]
        for s in summaries
        for g in s["groups"]
        if g["slice"] == "*"
    }
    assert sum(counted.values()) == added > 0
    assert all(v == 0 for t, v in counted.items() if t < 30)


def test_message_from_an_unknown_topic_is_dead_lettered(setup: Any) -> None:
    cfg, prof = setup
    ing = Ingest(cfg, compile_plans(cfg, {"fraud": prof}), 0, max_future_s=math.inf)
    out = ing.process_raw([RawMessage("some.other.topic", 0, 5, b"{}")], now=START)
    assert out.rejected == Counter({"unknown_topic": 1}) and out.accepted == 0
    (dl,) = out.messages
    assert orjson.loads(dl.value)["reason"] == "unknown_topic"


# --------------------------------------------------------------------------- hot-path shortcuts

NUMERIC_CASES: list[list[Any]] = [
    [1.5, 2, 30_000.0, -4.0],  # ints, out of range
    [0.0, -0.0, 0.0, 0.25],  # signed zeros: min/max keep what min()/max() keep
    [-0.0, 0.0, -0.0, 0.0],
    [0.1, 0.2, 0.30000000000000004, 1e-300],
    [7, 7, 7, 7],
]


@pytest.mark.parametrize("values", NUMERIC_CASES)
def test_numeric_matrix_fold_is_bit_identical_to_the_per_feature_fold(
    setup: Any, values: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2-D numeric fold (all features at once) and the per-feature fold give the same
    summary bytes, twice in a row (accumulating onto existing moments)."""
    from stream import summary
    from stream.events import Prediction

    cfg, prof = setup
    plan = compile_plans(cfg, {"fraud": prof})["fraud"]
    names = [p.name for p in plan.numeric]
    evs = [
        Prediction(
            f"e{i}",
            "fraud",
            "v1",
            f"r{i}",
            START + i,
            {
                **{n: values[(i + j) % len(values)] for j, n in enumerate(names)},
                "channel": "web",
                "country": ["DE", "FR", 3][i % 3],
            },
            1,
            0.5,
        )
        for i in range(len(values) * 3)
    ]
    fast = summary.GroupAcc(plan, True)
    assert summary._numeric_matrix(plan, [e.features for e in evs]) is not None
    fast.add_predictions(evs, plan)
    fast.add_predictions(evs[::-1], plan)
    monkeypatch.setattr(summary, "_numeric_matrix", lambda plan, feats: None)
    slow = summary.GroupAcc(plan, True)
    slow.add_predictions(evs, plan)
    slow.add_predictions(evs[::-1], plan)
    assert orjson.dumps(fast.to_doc()) == orjson.dumps(slow.to_doc())


def test_numeric_matrix_declines_missing_wrong_typed_and_non_finite(setup: Any) -> None:
    from stream import summary

    cfg, prof = setup
    plan = compile_plans(cfg, {"fraud": prof})["fraud"]
    base = {p.name: 1.0 for p in plan.numeric} | {"channel": "web", "country": "DE"}
    assert summary._numeric_matrix(plan, [base]) is not None
    first = plan.numeric[0].name
    for bad in (None, True, "1", math.nan, math.inf):
        assert summary._numeric_matrix(plan, [base, {**base, first: bad}]) is None, bad
    missing = {k: v for k, v in base.items() if k != first}
    assert summary._numeric_matrix(plan, [base, missing]) is None


def test_json_rows_are_orjson_dumps_of_each_row() -> None:
    from stream.engine import _json_rows

    cols: list[list[Any]] = [
        ["a,b", '"q"', "é\u2028", "x\\y", "\n", "a,b"],
        [(), ("r=1", 'z,"'), ("a",), (), ("a",), ("é",)],
        [1e16, 5e-324, -0.0, None, 2**62, True],
        [1.5, 0.1, 1e-7, 123456789.123, math.nan, -3],
    ]
    assert _json_rows(cols) == [orjson.dumps(row) for row in zip(*cols, strict=True)]
    assert _json_rows([[], []]) == []


def test_norm_targets_match_norm_target() -> None:
    from stream.engine import _norm_targets
    from stream.profile import norm_target

    few = [1, 1.0, True, "1", 0, 0.0, False, -0.0, 2.5, "x", 10**20, 1e20] * 5
    many = [i / 7 for i in range(40)]
    for vals in (few, many):
        assert _norm_targets(vals) == [norm_target(v) for v in vals]
