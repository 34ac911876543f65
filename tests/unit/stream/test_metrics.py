"""stream.metrics on a fresh registry: values after the seeded scenario, label bounding."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from stream.config import ACTIONS, MonitorConfig, load_config_text
from stream.demo import demo_config
from stream.detect import DetectOutput
from stream.embedded import EmbeddedRunner
from stream.engine import IngestOutput
from stream.events import REASONS, RawMessage
from stream.metrics import (
    FAMILIES,
    LATENCY_BUCKETS_S,
    OTHER,
    Metrics,
    _coarsen,
)
from stream.policy import Finding
from stream.scenario import END, START, generate
from stream.store import Fenced, JoinOutcome, JoinResult, OutMessage
from stream.summary import LATENCY_EDGES_MS
from tests.fixtures.embedded_feed import Feed

RATE = 40.0


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def samples(reg: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample name -> {sorted label items: value}."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in reg.collect():
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def series_count(reg: CollectorRegistry) -> int:
    return sum(len(f.samples) for f in reg.collect())


# --------------------------------------------------------------------------- scenario run


@dataclass
class Run:
    config: MonitorConfig
    registry: CollectorRegistry
    metrics: Metrics
    runner: EmbeddedRunner
    preds: list[dict[str, Any]]
    labels: list[dict[str, Any]]
    clock: FakeClock
    commits: Counter[str] = field(default_factory=Counter)
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    ks_after_trip: float | None = None
    release_cmd: Mapping[str, Any] | None = None


def instrument(runner: EmbeddedRunner, m: Metrics, run: Run) -> None:
    """Feed the metrics the way the worker will: one observe_* call per engine output.

    The embedded runner has no metrics hook yet, so its engine objects and store are
    wrapped.
    """

    def observe(out: IngestOutput) -> IngestOutput:
        m.observe_ingest(out)
        return out

    for ing in runner.ingest:
        orig, orig_flush = ing.process_raw, ing.flush

        def process_raw(msgs: Sequence[RawMessage], now: float, _orig: Any = orig) -> IngestOutput:
            return observe(_orig(msgs, now))

        def flush(now: float | None = None, _orig: Any = orig_flush) -> IngestOutput:
            return observe(_orig(now))

        setattr(ing, "process_raw", process_raw)  # noqa: B010
        setattr(ing, "flush", flush)  # noqa: B010

    for det in runner.detect:
        orig_d = det.process_raw

        def detect_raw(values: Any, _orig: Any = orig_d, _det: Any = det) -> DetectOutput:
            out: DetectOutput = _orig(values)
            m.observe_detect(out)
            m.observe_detector_state(_det, out.models)
            for model_id, f in out.findings:
                run.findings[_finding_key(model_id, f)] = f
            return out

        setattr(det, "process_raw", detect_raw)  # noqa: B010

        def manual(*a: Any, _orig: Any = det.manual, **kw: Any) -> DetectOutput:
            out: DetectOutput = _orig(*a, **kw)
            m.observe_detect(out)
            return out

        setattr(det, "manual", manual)  # noqa: B010

    orig_commit = runner.store.commit

    async def commit(stage: str, *a: Any, **kw: Any) -> JoinResult:
        with m.checkpoint(stage):
            res = await orig_commit(stage, *a, **kw)
        run.commits[stage] += 1
        m.observe_join(res)
        m.set_join_pending(runner.store.join_size())
        return res

    setattr(runner.store, "commit", commit)  # noqa: B010


def _finding_key(model: str, f: Finding) -> tuple[str, ...]:
    return (model, f.version, f.kind, f.detector, f.feature or "-", f.slice or "-")


async def _run_scenario() -> Run:
    cfg, profile = demo_config()
    preds, labels = generate(rate=RATE, seed=11)
    runner = EmbeddedRunner(
        cfg, {"fraud": profile}, partitions=2, lateness_s=2.0, max_future_s=float("inf")
    )
    reg = CollectorRegistry()
    clock = FakeClock()
    m = Metrics(cfg, reg, plans=runner.plans, topics=runner.topics, clock=clock)
    run = Run(cfg, reg, m, runner, preds, labels, clock)
    instrument(runner, m, run)
    await runner.start()
    feed = Feed(preds, labels)
    t = START
    while t < START + END:
        t += 5.0
        clock.t += 5.0
        feed.produce_before(runner, t)
        await runner.drain(now=t)
    await runner.finish(START + END + 10.0)
    run.ks_after_trip = value(reg, "driftline_killswitch_active", model="fraud", action="rollback")
    run.release_cmd = await runner.manual("fraud", "release", START + END + 20.0)
    state = await runner.store.get_killswitch("fraud")
    assert state is not None
    m.observe_killswitch_state("fraud", state)
    return run


@pytest.fixture(scope="module")
def run() -> Run:
    return asyncio.run(_run_scenario())


# --------------------------------------------------------------------------- families


def test_every_family_is_registered_with_its_labels() -> None:
    cfg = load_config_text("models: {m: {features: {x: {type: numeric}}}}")
    reg = CollectorRegistry()
    Metrics(cfg, reg)
    fams = {f.name: f for f in reg.collect()}
    assert set(fams) == set(FAMILIES)
    for name, (typ, labels, doc) in FAMILIES.items():
        assert name.startswith("driftline_")
        assert fams[name].type == typ, name
        assert fams[name].documentation == doc
        if typ == "counter":
            assert not name.endswith("_total")  # prometheus_client appends it
        if "seconds" in name or "timestamp" in name:
            assert name.endswith("_seconds"), name
        for s in fams[name].samples:
            assert set(s.labels) - {"le"} == set(labels), (name, s.labels)


def test_series_that_exist_from_the_start() -> None:
    cfg = load_config_text(
        "models: {a: {features: {x: {type: numeric}}}, b: {features: {x: {type: numeric}}}}"
    )
    reg = CollectorRegistry()
    Metrics(cfg, reg)
    assert value(reg, "driftline_up") == 1.0
    assert value(reg, "driftline_ready") == 0.0
    assert value(reg, "driftline_config_info", config_hash=cfg.config_hash) == 1.0
    active = samples(reg, "driftline_killswitch_active")
    assert len(active) == 2 * len(ACTIONS) and set(active.values()) == {0.0}
    for stage in ("ingest", "detect"):
        for err in ("fenced", "connection", "timeout", "other"):
            assert value(reg, "driftline_checkpoint_errors_total", stage=stage, error=err) == 0.0


# --------------------------------------------------------------------------- scenario values


def test_event_counts_match_the_scenario(run: Run) -> None:
    reg = run.registry
    assert value(reg, "driftline_events_accepted_total") == len(run.preds) + len(run.labels)
    assert run.runner.result.accepted == len(run.preds) + len(run.labels)
    by_version = Counter(p["model_version"] for p in run.preds)
    assert set(by_version) == {"v1", "v2"}
    for v, n in by_version.items():
        assert value(reg, "driftline_predictions_total", model="fraud", version=v) == n
    assert value(reg, "driftline_labels_total", model="fraud") == len(run.labels)
    rejected = samples(reg, "driftline_events_rejected_total")
    assert len(rejected) == len(REASONS) and set(rejected.values()) == {0.0}


def test_label_join_counts(run: Run) -> None:
    reg = run.registry
    assert value(reg, "driftline_label_join_ops_total", model="fraud", op="park") == len(run.preds)
    assert value(reg, "driftline_label_join_ops_total", model="fraud", op="label") == len(
        run.labels
    )
    # every label arrives 5-30 s after its prediction, well within the 1 h horizon
    assert value(reg, "driftline_label_join_total", model="fraud", outcome="joined") == len(
        run.labels
    )
    for outcome in ("early", "duplicate", "duplicate_request"):
        assert value(reg, "driftline_label_join_total", model="fraud", outcome=outcome) == 0
    pending = value(reg, "driftline_label_join_pending")
    assert pending == run.runner.store.join_size() and pending > 0


def test_score_histogram_matches_the_events(run: Run) -> None:
    reg = run.registry
    edges = [float(e) for e in run.runner.plans["fraud"].score_edges]
    for v in ("v1", "v2"):
        scores = np.array([p["score"] for p in run.preds if p["model_version"] == v])
        assert value(
            reg, "driftline_prediction_score_count", model="fraud", version=v
        ) == pytest.approx(scores.shape[0])
        assert value(reg, "driftline_prediction_score_sum", model="fraud", version=v) == (
            pytest.approx(float(scores.sum()), rel=1e-9)
        )
        for e in edges:
            got = value(
                reg, "driftline_prediction_score_bucket", model="fraud", version=v, le=repr(e)
            )
            assert got == np.count_nonzero(scores < e), (v, e)
        assert (
            value(reg, "driftline_prediction_score_bucket", model="fraud", version=v, le="+Inf")
            == (scores.shape[0])
        )


def test_latency_histogram_and_cost_match_the_events(run: Run) -> None:
    reg = run.registry
    for v in ("v1", "v2"):
        lat_s = np.array([p["latency_ms"] for p in run.preds if p["model_version"] == v]) / 1000
        for le in LATENCY_BUCKETS_S:
            got = value(
                reg,
                "driftline_prediction_latency_seconds_bucket",
                model="fraud",
                version=v,
                le=repr(le),
            )
            assert got == np.count_nonzero(lat_s < le), (v, le)
        assert value(
            reg, "driftline_prediction_latency_seconds_sum", model="fraud", version=v
        ) == pytest.approx(float(lat_s.sum()), rel=1e-9)
        cost = [p["cost_usd"] for p in run.preds if p["model_version"] == v]
        assert value(
            reg, "driftline_prediction_cost_usd_total", model="fraud", version=v
        ) == pytest.approx(sum(cost), rel=1e-9)
        assert value(reg, "driftline_costed_predictions_total", model="fraud", version=v) == len(
            cost
        )
    # v2 costs ~10x per request (the scenario's cost incident)
    per_1k = {
        v: 1000
        * (value(reg, "driftline_prediction_cost_usd_total", model="fraud", version=v) or 0)
        / (value(reg, "driftline_costed_predictions_total", model="fraud", version=v) or 1)
        for v in ("v1", "v2")
    }
    assert per_1k["v2"] / per_1k["v1"] == pytest.approx(10.0, rel=0.05)


def test_summary_counts(run: Run) -> None:
    reg = run.registry
    emitted = value(reg, "driftline_summaries_emitted_total")
    assert emitted == run.runner.result.summaries and emitted > 0
    assert value(reg, "driftline_summaries_consumed_total", outcome="applied") == emitted
    assert value(reg, "driftline_summaries_consumed_total", outcome="duplicate") == 0.0
    assert value(reg, "driftline_summaries_consumed_total", outcome="invalid") == 0.0


def test_alerts_and_kill_switch(run: Run) -> None:
    reg = run.registry
    want = Counter((a["kind"], a["severity"]) for a in run.runner.result.alerts)
    assert want, "the scenario must alert"
    got = {
        (d["kind"], d["severity"]): v
        for k, v in samples(reg, "driftline_alerts_total").items()
        for d in [dict(k)]
        if v
    }
    assert got == want
    # every (kind, severity) exists from the start, at 0 when it never alerted
    assert len(samples(reg, "driftline_alerts_total")) == 8 * 2
    cmds = Counter((c["action"], c["mode"]) for c in run.runner.result.commands)
    assert cmds == Counter({("rollback", "automatic"): 1, ("release", "manual"): 1})
    got_cmds = {
        (d["action"], d["mode"]): v
        for k, v in samples(reg, "driftline_killswitch_commands_total").items()
        for d in [dict(k)]
        if v
    }
    assert got_cmds == cmds
    assert run.ks_after_trip == 1.0  # tripped at the end of the run ...
    for a in ACTIONS:  # ... and released by the operator, read back from the store mirror
        assert value(reg, "driftline_killswitch_active", model="fraud", action=a) == 0.0


def test_drift_gauges_hold_the_latest_findings(run: Run) -> None:
    reg = run.registry
    psi = [k for k in run.findings if k[3] == "psi"]
    assert any(k[2] == "covariate_drift" for k in psi) and any(
        k[2] == "prediction_drift" for k in psi
    )
    for key, f in run.findings.items():
        if f.sequential:  # overwritten by the detector-state gauges
            continue
        labels = dict(
            zip(("model", "version", "kind", "detector", "feature", "slice"), key, strict=True)
        )
        assert value(reg, "driftline_drift_statistic", **labels) == pytest.approx(f.statistic)
        assert value(reg, "driftline_drift_threshold", **labels) == pytest.approx(f.threshold)
        assert value(reg, "driftline_drift_window_events", **labels) == f.n
    # the scale break is a contract break on seller_quality_score
    oor = value(
        reg,
        "driftline_drift_statistic",
        model="fraud",
        version="v1",
        kind="data_quality",
        detector="quality.out_of_range",
        feature="seller_quality_score",
        slice="-",
    )
    assert oor is not None


def test_sequential_detector_state_gauges(run: Run) -> None:
    reg = run.registry
    mon = next(
        mon for det in run.runner.detect for m_id, mon in det.models.items() if m_id == "fraud"
    )
    det = mon.versions["v2"].seq_dets["concept:region=apac"]
    labels = {
        "model": "fraud",
        "version": "v2",
        "kind": "concept_drift",
        "detector": "bernoulli_cusum",
        "feature": "-",
        "slice": "region=apac",
    }
    assert value(reg, "driftline_drift_statistic", **labels) == pytest.approx(max(det.statistic))
    assert value(reg, "driftline_drift_threshold", **labels) == pytest.approx(det.threshold)
    assert value(reg, "driftline_drift_window_events", **labels) == det.n_seen
    cusum = samples(reg, "driftline_drift_statistic")
    feats = {dict(k)["feature"] for k in cusum if dict(k)["detector"] == "cusum"}
    assert {"amount", "merchant_risk", "seller_quality_score", "-"} <= feats


def test_detector_state_gauges_read_only_the_models_a_batch_changed(run: Run) -> None:
    """Every stage-2 commit re-reads the sequential detectors of the models its batch
    changed (``DetectOutput.models``), not of every model (~43 ms per commit at 1,000
    models); None (after a claim) reads them all."""
    det = next(d for d in run.runner.detect if "fraud" in d.models)
    m = Metrics(run.config, CollectorRegistry(), plans=run.runner.plans)

    def series() -> int:
        return len(samples(m.registry, "driftline_drift_statistic"))

    m.observe_detector_state(det, models=[])
    m.observe_detector_state(det, models=["not-a-model"])
    assert series() == 0
    m.observe_detector_state(det, models=["fraud"])
    assert series() > 10  # the CUSUMs of every feature, version and slice
    assert det.process([]).models == set()


def test_checkpoint_metrics(run: Run) -> None:
    reg = run.registry
    for stage in ("ingest", "detect"):
        n = value(reg, "driftline_checkpoint_duration_seconds_count", stage=stage)
        assert n == run.commits[stage] and n > 0
        assert value(reg, "driftline_last_checkpoint_timestamp_seconds", stage=stage) == (
            run.clock.t
        )


# --------------------------------------------------------------------------- unit pieces


def _cfg() -> MonitorConfig:
    return load_config_text(
        """
models:
  fraud:
    features:
      amount: {type: numeric}
      country: {type: categorical}
    slices:
      region: {values: [eu, us]}
      channel: {max_values: 3}
  spam:
    features:
      length: {type: numeric}
"""
    )


def test_observe_detect_sets_drift_gauges_from_the_latest_finding() -> None:
    reg = CollectorRegistry()
    m = Metrics(_cfg(), reg)
    old = Finding("covariate_drift", "psi", "v1", "amount", None, "ok", 0.05, 0.1, 0, 59, 800)
    f = Finding("covariate_drift", "psi", "v1", "amount", None, "warn", 0.17, 0.1, 0, 60, 900)
    out = DetectOutput(applied=3, duplicates=2, invalid=1, findings=[("fraud", old), ("fraud", f)])
    m.observe_detect(out)
    lab = {"model": "fraud", "version": "v1", "kind": "covariate_drift", "detector": "psi"}
    assert value(reg, "driftline_drift_statistic", **lab, feature="amount", slice="-") == 0.17
    assert value(reg, "driftline_drift_threshold", **lab, feature="amount", slice="-") == 0.1
    assert value(reg, "driftline_drift_window_events", **lab, feature="amount", slice="-") == 900
    assert value(reg, "driftline_summaries_consumed_total", outcome="applied") == 3
    assert value(reg, "driftline_summaries_consumed_total", outcome="duplicate") == 2
    assert value(reg, "driftline_summaries_consumed_total", outcome="invalid") == 1


def test_rejections_published_messages_and_lag() -> None:
    reg = CollectorRegistry()
    m = Metrics(_cfg(), reg)
    out = IngestOutput(accepted=5, rejected=Counter({"not_json": 2, "unknown_model": 3}))
    m.observe_ingest(out)
    assert value(reg, "driftline_events_rejected_total", reason="not_json") == 2
    assert value(reg, "driftline_events_rejected_total", reason="unknown_model") == 3
    assert value(reg, "driftline_events_accepted_total") == 5
    m.observe_published(
        [
            OutMessage("a", "driftline.alerts", b"k", b"v"),
            OutMessage("b", "driftline.alerts", b"k", b"v"),
            OutMessage("c", "driftline.deadletter", b"k", b"v"),
            OutMessage("d", "someone.elses.topic", b"k", b"v"),
        ]
    )
    assert value(reg, "driftline_messages_published_total", topic="alerts") == 2
    assert value(reg, "driftline_messages_published_total", topic="deadletter") == 1
    assert value(reg, "driftline_messages_published_total", topic=OTHER) == 1
    m.set_consumer_lag("driftline.predictions", 3, 120)
    m.set_consumer_lag("driftline.predictions", 3, -5)  # never negative
    assert value(reg, "driftline_consumer_lag_messages", topic="predictions", partition="3") == 0
    m.clear_consumer_lag("driftline.predictions", 3)
    assert samples(reg, "driftline_consumer_lag_messages") == {}


def test_checkpoint_errors_are_classified_and_reraised() -> None:
    reg = CollectorRegistry()
    clock = FakeClock(123.0)
    m = Metrics(_cfg(), reg, clock=clock)
    errors: list[tuple[BaseException, str]] = [
        (Fenced("stale"), "fenced"),
        (TimeoutError(), "timeout"),
        (RedisConnectionError("down"), "connection"),
        (ConnectionResetError(), "connection"),
        (ValueError("bug"), "other"),
    ]
    for err, _ in errors:
        with pytest.raises(type(err)), m.checkpoint("detect"):
            raise err
    want = Counter(cls for _, cls in errors)
    for cls in ("fenced", "timeout", "connection", "other"):
        assert (
            value(reg, "driftline_checkpoint_errors_total", stage="detect", error=cls)
            == (want[cls])
        )
    # the process start time until the first successful checkpoint
    assert value(reg, "driftline_last_checkpoint_timestamp_seconds", stage="detect") == 123.0
    clock.t = 200.0
    assert value(reg, "driftline_checkpoint_duration_seconds_count", stage="detect") == 0
    with m.checkpoint("detect"):
        pass
    assert value(reg, "driftline_last_checkpoint_timestamp_seconds", stage="detect") == 200.0
    with m.batch("ingest", 700):
        pass
    assert value(reg, "driftline_batch_messages_sum", stage="ingest") == 700
    assert value(reg, "driftline_batch_messages_bucket", stage="ingest", le="500.0") == 0
    assert value(reg, "driftline_batch_messages_bucket", stage="ingest", le="1000.0") == 1
    assert value(reg, "driftline_batch_duration_seconds_count", stage="ingest") == 1


def test_store_counters_advance_by_deltas() -> None:
    reg = CollectorRegistry()
    m = Metrics(_cfg(), reg)
    m.observe_store_counters(10, 1)
    m.observe_store_counters(25, 1)
    m.observe_store_counters(4, 0)  # a new store object: its totals restart
    assert value(reg, "driftline_store_round_trips_total") == 29
    assert value(reg, "driftline_store_retries_total") == 1


def test_coarsened_latency_bins_keep_cumulative_counts() -> None:
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 50, size=LATENCY_EDGES_MS.shape[0] + 1).astype(np.float64)
    keep = np.arange(0, LATENCY_EDGES_MS.shape[0], 2)
    out = _coarsen(counts, keep)
    assert out.shape[0] == len(LATENCY_BUCKETS_S) + 1
    assert out.sum() == counts.sum()
    np.testing.assert_array_equal(np.cumsum(out)[:-1], np.cumsum(counts)[keep])


def test_version_slots_evict_the_idle_version_and_its_series() -> None:
    reg = CollectorRegistry()
    clock = FakeClock(0.0)
    m = Metrics(_cfg(), reg, max_versions=3, version_idle_s=100.0, clock=clock)

    def summary(version: str) -> dict[str, Any]:
        return {
            "model_id": "fraud",
            "late": 0,
            "labels": {"n": 0},
            "groups": [{"version": version, "slice": "*", "n": 1, "score": {"n": 0}}],
        }

    for v in ("v1", "v2", "v3"):
        m.observe_summary(summary(v))
        clock.t += 10
    m.observe_summary(summary("v4"))  # all slots busy and recently seen -> other
    assert value(reg, "driftline_predictions_total", model="fraud", version="other") == 1
    assert value(reg, "driftline_predictions_total", model="fraud", version="v4") is None
    clock.t = 115.0  # v1 was last seen at 0: idle for 115 s >= 100 s
    m.observe_summary(summary("v2"))
    m.observe_summary(summary("v3"))
    m.observe_summary(summary("v5"))  # v1 is the least recently seen and idle: evicted
    assert value(reg, "driftline_predictions_total", model="fraud", version="v1") is None
    assert value(reg, "driftline_predictions_total", model="fraud", version="v5") == 1
    assert value(reg, "driftline_predictions_total", model="fraud", version="v2") == 2


def test_slice_values_are_bounded() -> None:
    m = Metrics(_cfg(), CollectorRegistry())
    assert m.slice_label("fraud", "region=eu") == "region=eu"
    assert m.slice_label("fraud", "region=mars") == "region=other"
    assert m.slice_label("fraud", "region=other") == "region=other"
    assert m.slice_label("fraud", "planet=mars") == OTHER
    assert m.slice_label("fraud", None) == "-"
    got = [m.slice_label("fraud", f"channel=c{i}") for i in range(6)]
    assert got == ["channel=c0", "channel=c1", "channel=c2"] + ["channel=other"] * 3
    assert m.slice_label("spam", "region=eu") == OTHER


# --------------------------------------------------------------------------- flood


def _flood(m: Metrics, rng: random.Random, n: int) -> None:
    def rnd() -> str:
        return f"{rng.getrandbits(64):016x}"

    for _ in range(n):
        model = rng.choice(["fraud", "spam", rnd()])
        m.observe_summary(
            {
                "model_id": model,
                "late": 1,
                "labels": {"n": 1},
                "groups": [
                    {
                        "version": rnd(),
                        "slice": "*",
                        "n": 1,
                        "score": {"n": 1, "counts": [0] * 9 + [1], "sum": 0.95},
                        "latency": {
                            "n": 1,
                            "counts": [0] * 20 + [1] + [0] * 21,
                            "sum": 3.0,
                        },
                        "cost": {"n": 1, "sum": 0.001},
                    }
                ],
            }
        )
        m.observe_ingest(IngestOutput(rejected=Counter({rnd(): 1, rng.choice(REASONS): 1})))
        f = Finding(
            rng.choice(["covariate_drift", rnd()]),
            rng.choice(["psi", rnd()]),
            rnd(),
            rng.choice(["amount", rnd(), None]),
            rng.choice([None, f"region={rnd()}", f"channel={rnd()}", rnd()]),
            "warn",
            1.0,
            0.5,
            0,
            1,
            10,
        )
        m.observe_findings(model, [f])
        m.observe_alert(
            {"model_id": model, "model_version": rnd(), "kind": rnd(), "severity": rnd()}
        )
        m.observe_join(JoinResult((), (JoinOutcome(model, 1, rnd()),)))
        m.set_consumer_lag(rng.choice([rnd(), "driftline.labels"]), rng.randrange(-10, 200), 5)
        m.observe_published([OutMessage("x", rnd(), b"", b"")])
        m.observe_killswitch_state(model, {"active": True, "action": rnd()})


def test_a_flood_of_random_labels_does_not_grow_the_series_count() -> None:
    reg = CollectorRegistry()
    m = Metrics(_cfg(), reg, max_partitions=64)
    rng = random.Random(42)
    _flood(m, rng, 10_000)
    after_10k = series_count(reg)
    _flood(m, rng, 10_000)
    assert series_count(reg) == after_10k  # saturated: more random values add nothing
    assert m.series_count() == after_10k
    # every label value is from a bounded set
    versions: set[str] = set()
    for fam in reg.collect():
        for s in fam.samples:
            lab = s.labels
            assert lab.get("model", "fraud") in {"fraud", "spam", OTHER}
            assert lab.get("reason", "not_json") in {*REASONS, OTHER}
            assert lab.get("feature", "amount") in {"amount", "country", "length", "-", OTHER}
            sl = lab.get("slice", "-")
            assert sl in {"-", OTHER, "region=other", "channel=other"} or sl.startswith("channel=")
            if "version" in lab:
                versions.add(lab["model"] + "/" + lab["version"])
            if "partition" in lab:
                assert lab["partition"] == OTHER or int(lab["partition"]) < 64
    per_model = Counter(v.split("/")[0] for v in versions if not v.endswith("/other"))
    assert max(per_model.values()) <= m.max_versions
    assert "other" not in per_model
    channels = {
        s.labels["slice"]
        for fam in reg.collect()
        for s in fam.samples
        if s.labels.get("slice", "").startswith("channel=")
    }
    assert len(channels) <= 3 + 1  # max_values + other


def test_flood_of_unknown_models_only_touches_other() -> None:
    reg = CollectorRegistry()
    m = Metrics(_cfg(), reg)
    base = series_count(reg)
    rng = random.Random(1)
    for _ in range(10_000):
        m.observe_summary(
            {
                "model_id": f"m{rng.getrandbits(48)}",
                "late": 0,
                "labels": {"n": 1},
                "groups": [{"version": "v1", "slice": "*", "n": 1, "score": {"n": 0}}],
            }
        )
    # one labels_total{model=other} + one predictions_total{model=other,version=other}
    # (each counter child also exposes a _created sample)
    assert series_count(reg) == base + 4
    assert value(reg, "driftline_labels_total", model=OTHER) == 10_000
    assert value(reg, "driftline_predictions_total", model=OTHER, version=OTHER) == 10_000


def test_rejects_bad_max_versions() -> None:
    with pytest.raises(ValueError, match="max_versions"):
        Metrics(_cfg(), CollectorRegistry(), max_versions=0)
