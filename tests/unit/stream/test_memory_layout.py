"""Compact in-memory layouts of stages 1 and 2 (issue 6): same outputs, exact state round trips.

* stage 2 count windows (PSI, data quality, latency) are one ring buffer per window
  (:class:`stream.detect.CountWindow`) with :class:`stream.detect.TickWindow`'s contract; its
  state is the ring's arrays (serialised without a Python object per count), and it still
  loads the older ``[[tick, row], ...]`` layout;
* a summaries batch is decoded one summary at a time;
* findings carry a compact :class:`stream.policy.Detail`; PSI engines are shared by models
  with the same spec; the signal policy's state round-trips to the same bytes;
* stage-1 group accumulators keep all features in four arrays per group.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from load_tests.bench_stage1 import raw_batches
from load_tests.generator import GenConfig, generate, messages, monitor_config
from stream.config import MonitorConfig, Topics
from stream.detect import CountWindow, Detect, TickWindow
from stream.engine import Ingest, compile_plans
from stream.policy import Detail, Finding, SignalPolicy
from stream.store import MemoryStore
from stream.summary import GroupAcc, ModelPlan

TOPICS = Topics()

# --------------------------------------------------------------------------- CountWindow

adds = st.lists(
    st.tuples(st.integers(-70, 70), st.lists(st.integers(0, 10**6), min_size=3, max_size=3)),
    max_size=60,
)


def _saved(w: CountWindow) -> Any:
    """``w``'s state through JSON, as a checkpoint would store it."""
    return orjson.loads(orjson.dumps(w.to_state(), option=orjson.OPT_SERIALIZE_NUMPY))


def _pairs(w: CountWindow) -> list[list[Any]]:
    """The live ``[tick, row as floats]`` pairs in tick order (TickWindow's state content)."""
    if w.newest is None:
        return []
    ticks = w.slot_ticks.tolist()
    live = sorted((t, s) for s, t in enumerate(ticks) if t > w.newest - w.window)
    return [[t, w.rows[s].astype(np.float64).tolist()] for t, s in live]


@settings(max_examples=300)
@given(window=st.integers(1, 64), steps=adds, start=st.integers(0, 2**40))
def test_count_window_matches_tick_window(
    window: int, steps: list[tuple[int, list[int]]], start: int
) -> None:
    old, new = TickWindow(3, window), CountWindow(3, window)
    tick = start
    for k, (delta, vec) in enumerate(steps):
        tick = max(0, tick + delta)
        assert new.add(tick, vec) == old.add(tick, vec)
        assert new.newest == old.newest
        assert new.start_tick == old.start_tick
        assert new.total().dtype == np.int64
        assert new.total().tolist() == np.rint(old.total()).astype(np.int64).tolist()
        assert _pairs(new) == old.to_state()[3]
        if k % 7 == 3:  # restore from the old layout mid-stream and go on from there
            new = CountWindow.from_state(old.to_state())
            old = TickWindow.from_state([3, window, new.newest, _pairs(new)])
        elif k % 7 == 5:  # ... or from its own saved state, which it saves again unchanged
            saved = _saved(new)
            new = CountWindow.from_state(saved)
            assert _saved(new) == saved
    assert new.rows.shape[0] <= window


def test_count_window_widens_to_int64_before_a_count_overflows_int32() -> None:
    old, new = TickWindow(2, 5), CountWindow(2, 5)
    big = 2**31 - 10
    for t, vec in [(1, [big, 1]), (2, [5, 5]), (1, [20, 0]), (3, [big, big]), (9, [1, 2])]:
        assert new.add(t, vec) == old.add(t, vec)
        assert new.total().tolist() == np.rint(old.total()).astype(np.int64).tolist()
        assert _pairs(new) == old.to_state()[3]
        back = CountWindow.from_state(_saved(new))  # int64 again while a big count is live
        assert back.total().tolist() == new.total().tolist()
        assert _pairs(back) == _pairs(new)
    assert new.rows.dtype == np.int64
    assert back.rows.dtype == np.int32  # the big counts left the window before the last save
    assert CountWindow(2, 5).rows.dtype == np.int32  # counts of a tick fit int32 normally
    back = CountWindow.from_state([2, 5, 3, [[1, [float(2**40), 1.0]]]])
    assert back.rows.dtype == np.int64 and back.total().tolist() == [2**40, 1]


def test_count_window_grows_only_when_ticks_collide() -> None:
    w = CountWindow(2, 60)
    for t in range(1000, 1004):
        w.add(t, [1, 2])
    assert w.rows.shape == (4, 2)  # four consecutive ticks fit the initial ring
    w.add(1004, [1, 0])
    assert w.rows.shape == (8, 2)
    for t in range(1005, 1200):
        w.add(t, [1, 0])
    assert w.rows.shape == (60, 2)  # a full window: one row per tick, never more
    assert w.total().tolist() == [60, 0] and w.start_tick == 1140
    assert not w.add(1139, [5, 5]) and w.total().tolist() == [60, 0]


def test_count_window_empty_state_round_trip() -> None:
    w = CountWindow(4, 10)
    assert TickWindow(4, 10).to_state() == [4, 10, None, []]
    for state in (_saved(w), [4, 10, None, []]):
        back = CountWindow.from_state(state)
        assert back.total().tolist() == [0, 0, 0, 0] and back.newest is None
        assert back.add(5, [1, 2, 3, 4]) and back.total().tolist() == [1, 2, 3, 4]


def test_count_window_saved_state_drops_expired_slots_and_keeps_the_ring() -> None:
    w = CountWindow(2, 6)
    for t in (1, 2, 3, 4, 9):  # a ring of 4 slots; 9 reuses tick 1's slot, 2 and 3 expire
        w.add(t, [t, 1])
    saved = _saved(w)
    assert len(saved) == 5 and saved[:3] == [2, 6, 9]
    assert sorted(saved[3]) == [-(2**63), -(2**63), 4, 9]  # ticks 2 and 3 cleared
    assert sorted(saved[4]) == [[0, 0], [0, 0], [4, 1], [9, 1]]
    back = CountWindow.from_state(saved)
    assert back.total().tolist() == w.total().tolist() == [13, 2]
    assert back.rows.shape == w.rows.shape == (4, 2) and back.rows.dtype == np.int32
    assert [back.add(t, [1, 1]) for t in (3, 5)] == [False, True]
    assert back.total().tolist() == [14, 3]


# --------------------------------------------------------------------------- Detail / policy


def test_detail_is_a_read_only_mapping_equal_to_its_dict() -> None:
    d = Detail(("rate", "violations"), (0.5, 7))
    assert dict(d) == {"rate": 0.5, "violations": 7} and d == {"rate": 0.5, "violations": 7}
    assert d == {"rate": 0.5, "violations": 7} and d != {"rate": 0.5}
    assert list(d.items()) == [("rate", 0.5), ("violations", 7)] and len(d) == 2
    assert d.get("nope") is None and "rate" in d and repr(d) == repr(dict(d))
    with pytest.raises(KeyError):
        d["nope"]
    with pytest.raises(ValueError, match="values: expected 2"):
        Detail(("a", "b"), (1,))
    f = Finding(
        "data_quality", "quality.missing", "v1", "x", None, "ok", 0.0, 0.1, 0, 1, 9, False, 1, d
    )
    g = Finding(
        "data_quality",
        "quality.missing",
        "v1",
        "x",
        None,
        "ok",
        0.0,
        0.1,
        0,
        1,
        9,
        False,
        1,
        {"rate": 0.5, "violations": 7},
    )
    assert f == g and repr(f) == repr(g)
    assert not hasattr(f, "__dict__")  # slotted


def test_policy_state_round_trips_to_the_same_bytes() -> None:
    cfg, _ = _workload_config()
    model = next(iter(cfg.models.values()))
    pol = SignalPolicy(model)
    for i, sev in enumerate(["warn", "warn", "warn", "ok", "critical", "ok", "ok"]):
        f = Finding("covariate_drift", "psi", "v1", "x", None, sev, 0.3, 0.1, i, i + 1, 500)
        pol.evaluate(f, float(i))
    pol.evaluate(Finding("schema", "quality.missing", "v1", "y", None, "ok", 0, 0.1, 0, 1, 9), 9.0)
    saved = orjson.dumps(pol.to_state())
    again = SignalPolicy(model)
    again.load(orjson.loads(saved))
    assert orjson.dumps(again.to_state()) == saved
    # a state written by a restore of the previous code (counters as floats) loads as ints
    floats = {k: [None if v is None else float(v) for v in st] for k, st in pol.to_state().items()}
    again.load(floats)
    assert orjson.dumps(again.to_state()) == saved


# --------------------------------------------------------------------------- stage 1 + 2


def _workload_config(
    models: int = 3, scenario: str = "covariate_shift", n: int = 24_000
) -> tuple[MonitorConfig, list[Any]]:
    g = GenConfig(
        n_events=n,
        seed=5,
        models=models,
        versions=2,
        n_features=8,
        rate=n / 90.0,  # 90 one-second ticks: windows fill and wrap
        label_fraction=0.5,
        label_delay_s=(1.0, 5.0),
        scenario=scenario,
    )
    cfg, profiles = monitor_config(g, label_horizon="1h")
    return cfg, [g, profiles]


@pytest.fixture(scope="module")
def pipeline() -> dict[str, Any]:
    cfg, (g, profiles) = _workload_config()
    plans = compile_plans(cfg, profiles)
    batches = raw_batches(messages(generate(g), events_per_message=50), 1_000)

    async def stage1() -> tuple[list[bytes], list[bytes]]:
        ing = Ingest(cfg, plans, 0, lateness_s=2.0, max_future_s=float("inf"))
        store = MemoryStore()
        claim = await store.claim("ingest", 0, "t")
        summaries, states = [], []
        for b in batches:
            out = ing.process_raw(b, g.start + 36_000)
            state = ing.snapshot()
            res = await store.commit(
                "ingest",
                0,
                claim.generation,
                state=state,
                next_offset=out.next_offset,
                outbox=out.messages,
                join_ops=out.join_ops,
            )
            ing.absorb(res)
            states.append(ing.snapshot())
            summaries += [m.value for m in out.messages if m.topic == TOPICS.summaries]
        out = ing.flush(g.start + 40_000)
        summaries += [m.value for m in out.messages if m.topic == TOPICS.summaries]
        return summaries, states

    summaries, states = asyncio.run(stage1())
    return {"cfg": cfg, "plans": plans, "summaries": summaries, "ingest_states": states}


def test_ingest_state_round_trips_exactly(pipeline: dict[str, Any]) -> None:
    cfg, plans = pipeline["cfg"], pipeline["plans"]
    for state in pipeline["ingest_states"][::5]:
        ing = Ingest(cfg, plans, 0)
        ing.restore(state)
        assert ing.snapshot() == state
    assert any(
        b'"calib_n":[0,' in s and b'"calib_score":[0.0,' in s for s in pipeline["ingest_states"]
    )


def test_snapshots_built_piecewise_are_the_whole_documents_json(pipeline: dict[str, Any]) -> None:
    """Both stages encode their state one tick / one model at a time and join the pieces
    (memory, issue 6); the bytes must be exactly one ``orjson.dumps`` of the document, or a
    restore would read a different state than was written."""
    cfg, plans = pipeline["cfg"], pipeline["plans"]
    states = pipeline["ingest_states"]
    held = [s for s in states if b'"pending":[[' in s and b'"open":[[' in s]
    assert held, "the workload must leave ticks both open and pending at some checkpoint"
    for state in [*held[:3], *states[-2:]]:
        assert orjson.dumps(orjson.loads(state)) == state
    assert orjson.loads(Ingest(cfg, plans, 3).snapshot())["open"] == []  # an empty engine
    det = Detect(cfg, plans, 0)
    det.process_raw(list(enumerate(pipeline["summaries"])))
    snap = det.snapshot()
    assert len(orjson.loads(snap)["models"]) > 1
    assert orjson.dumps(orjson.loads(snap)) == snap
    assert orjson.loads(Detect(cfg, plans, 1).snapshot())["models"] == {}


def _detect_outputs(det: Detect, values: Any) -> tuple[Any, ...]:
    out = det.process_raw(values)
    return (
        [tuple(m) for m in out.messages],
        out.alerts,
        out.commands,
        [(m, repr(f)) for m, f in out.findings],
        out.next_offset,
        out.applied,
        out.duplicates,
        out.invalid,
    )


def test_stage2_any_batching_and_restores_give_the_same_bytes(pipeline: dict[str, Any]) -> None:
    cfg, plans, summaries = pipeline["cfg"], pipeline["plans"], pipeline["summaries"]
    vals = list(enumerate([*summaries[:5], b"{not json", *summaries[5:], *summaries[40:60]]))
    one = Detect(cfg, plans, 0)
    whole = _detect_outputs(one, vals)
    assert whole[7] == 1 and whole[6] == 20  # the junk value and the replayed summaries
    assert whole[1], "the covariate shift must alert"
    for chunk in (1, 17):
        det = Detect(cfg, plans, 0)
        parts = []
        for k, i in enumerate(range(0, len(vals), chunk)):
            if k == 5:  # a restart: restore from the snapshot and go on
                state = det.snapshot()
                det = Detect(cfg, plans, 0)
                det.restore(state)
                assert det.snapshot() == state
            part = vals[i : i + chunk]
            parts.append(_detect_outputs(det, iter(part) if k % 2 else part))
        for j in (0, 1, 2, 3):
            assert [x for p in parts for x in p[j]] == whole[j]
        assert det.snapshot() == one.snapshot()
    # decoded summaries through process() give the same as raw bytes through process_raw()
    det = Detect(cfg, plans, 0)
    docs = [orjson.loads(v) for _, v in vals if v != b"{not json"]
    out = det.process(docs)
    assert [tuple(m) for m in out.messages] == whole[0]
    assert det.snapshot().replace(b"", b"") != b"" and out.applied == whole[5]


def _as_schema_1(state: bytes) -> bytes:
    """A stage-2 snapshot as a schema-1 worker wrote it: count windows as [[tick, row]]."""
    doc = orjson.loads(state)
    doc["schema"] = 1
    for mon in doc["models"].values():
        for vm in [*mon["versions"].values(), mon["model_level"]]:
            for key, ws in vm["windows"].items():
                if len(ws) == 5:
                    w = CountWindow.from_state(ws)
                    vm["windows"][key] = [ws[0], ws[1], ws[2], _pairs(w)]
    return orjson.dumps(doc)


def test_stage2_loads_schema_1_state_and_goes_on_the_same(pipeline: dict[str, Any]) -> None:
    cfg, plans, summaries = pipeline["cfg"], pipeline["plans"], pipeline["summaries"]
    vals = list(enumerate(summaries))
    half = len(vals) // 2
    ref = Detect(cfg, plans, 0)
    _detect_outputs(ref, vals[:half])
    state = ref.snapshot()
    old = _as_schema_1(state)
    assert b'"schema":1' in old and old != state
    det = Detect(cfg, plans, 0)
    det.restore(old)
    assert det.snapshot() == state  # migrated on load: the next checkpoint is schema 2
    assert _detect_outputs(det, vals[half:]) == _detect_outputs(ref, vals[half:])
    assert det.snapshot() == ref.snapshot()
    with pytest.raises(ValueError, match=r"expected detect schema \[1, 2\], got 'detect' schema 3"):
        Detect(cfg, plans, 0).restore(state.replace(b'"schema":2', b'"schema":3', 1))


def test_windows_load_as_the_right_class_and_psi_engines_are_shared(
    pipeline: dict[str, Any],
) -> None:
    cfg, plans = pipeline["cfg"], pipeline["plans"]
    det = Detect(cfg, plans, 0)
    det.process_raw(list(enumerate(pipeline["summaries"])))
    det2 = Detect(cfg, plans, 0)
    det2.restore(det.snapshot())
    kinds: dict[str, set[str]] = {}
    for mon in det2.models.values():
        for vm in [*mon.versions.values(), mon.model_level]:
            for key, w in vm.windows.items():
                kinds.setdefault(key.split(":")[0], set()).add(type(w).__name__)
    assert kinds["psi"] == {"CountWindow"} and kinds["quality"] == {"CountWindow"}
    assert kinds["calib"] == {"TickWindow"}
    # every model has the same generated profile: one PSI engine per feature, shared
    mons = list(det.models.values())
    assert len(mons) == 3
    assert all(m.psi[k] is mons[0].psi[k] for m in mons for k in mons[0].psi)


# --------------------------------------------------------------------------- GroupAcc


def test_group_acc_keeps_unknown_features_of_a_restored_document(
    pipeline: dict[str, Any],
) -> None:
    plan: ModelPlan = next(iter(pipeline["plans"].values()))
    acc = GroupAcc(plan, True)
    doc = acc.to_doc()
    num0 = plan.numeric[0].name
    cat0 = plan.categorical[0].name
    assert doc["features"][cat0]["missing"] == 0 and type(doc["features"][cat0]["missing"]) is int
    assert doc["joined"]["calib_n"] == [0] * 10 and doc["joined"]["calib_score"] == [0.0] * 10
    feats = dict(doc["features"])
    feats["gone"] = {**feats[num0], "counts": [1, 2], "n": 3, "min": 1.0, "max": 2.5}
    feats["gone_cat"] = {**feats[cat0], "counts": [1, 2], "missing": 3}
    feats[num0] = {**feats[num0], "counts": [7, 8, 9], "n": 24, "min": 0.5, "max": 9.0}
    feats[cat0] = {**feats[cat0], "missing": 4, "counts": [1] * len(feats[cat0]["counts"])}
    doc2 = {**doc, "features": feats}
    back = GroupAcc.from_doc(doc2, plan).to_doc()
    assert back["features"] == feats  # every feature kept with its values
    # order as before the compact layout: plan numerics, unknown numerics, plan categoricals...
    names = [p.name for p in plan.numeric] + ["gone"] + [c.name for c in plan.categorical]
    assert list(back["features"]) == [*names, "gone_cat"]
    assert GroupAcc.from_doc(back, plan).to_doc() == back
    slice_acc = GroupAcc(plan, False)
    assert GroupAcc.from_doc(slice_acc.to_doc(), plan).to_doc() == slice_acc.to_doc()
