"""Seeded load generator: realistic prediction (and label) events, encoded as Kafka messages.

Events are generated column-wise with numpy and rendered once with orjson, so generating is
never the bottleneck of a benchmark (measured: several hundred thousand events/s on one
core, see ``--dry-run``). A prediction carries 10 features (8 numeric, 2 categorical), a
score, latency, cost and a ``region`` slice, about 400 bytes of JSON::

    {"event_id":"p1-000000042","model_id":"m00","model_version":"v1",
     "request_id":"r1-000000042-6f1c2a","ts":1700000000.00042,
     "features":{"amount":87.31,"merchant_risk":0.2514,...,"country":"DE","channel":"web"},
     "prediction":0,"score":0.21877,"latency_ms":73.4,"cost_usd":0.0002113,
     "slice":{"region":"eu"}}

Labels (``label_fraction`` of the predictions) arrive ``label_delay_s`` later; a label is
drawn from the calibrated score, so the model's error rate is its own. A Kafka message holds
one event or a JSON array of ``events_per_message`` events of the same partition (Kafka's
murmur2 partitioner on ``request_id``, exactly as the producer SDK batches them).

Command line (produce to Kafka with confluent-kafka)::

    python -m load_tests.generator --bootstrap 127.0.0.1:9092 --events 200000 \\
        --events-per-message 500 --labels 0.5 --scenario scale_break
    python -m load_tests.generator --dry-run --events 200000   # generation speed only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import orjson
import yaml

from load_tests.scenarios import get_scenario
from stream.config import MonitorConfig, parse_config
from stream.embedded import partition_for
from stream.profile import Profile, build_profile

SDK_BATCH_EVENTS: Final = 500
"""Events per Kafka message by default: the producer SDK's ``batch_events`` default
(``stream.sdk.DriftlineProducer``); a unit test keeps the two equal."""

START: Final = 1_700_000_000.0
REGIONS: Final = ("eu", "us", "apac")
COUNTRIES: Final = ("DE", "FR", "ES", "US", "JP", "AU", "SG")
CHANNELS: Final = ("web", "ios", "android")
EXAMPLE_MONITORS: Final = Path(__file__).resolve().parent.parent / "examples" / "monitors.yaml"

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


class NumericFeature(NamedTuple):
    name: str
    draw: Callable[[np.random.Generator, int], FloatArray]
    decimals: int
    range: tuple[float, float]


class CategoricalFeature(NamedTuple):
    name: str
    values: tuple[str, ...]
    p: tuple[float, ...]


BASE_NUMERIC: Final = (
    NumericFeature("amount", lambda g, n: g.gamma(2.0, 60.0, n), 2, (0.0, 100_000.0)),
    NumericFeature("merchant_risk", lambda g, n: g.beta(2.0, 5.0, n), 4, (0.0, 1.0)),
    NumericFeature("seller_quality_score", lambda g, n: g.beta(5.0, 2.0, n), 4, (0.0, 1.0)),
    NumericFeature(
        "account_age_days", lambda g, n: np.floor(g.uniform(0, 3000, n)), 0, (0.0, 20_000.0)
    ),
    NumericFeature(
        "cart_items", lambda g, n: g.poisson(3.0, n).astype(np.float64), 0, (0.0, 500.0)
    ),
    NumericFeature("session_s", lambda g, n: g.lognormal(4.0, 1.0, n), 1, (0.0, 86_400.0)),
    NumericFeature("distance_km", lambda g, n: g.exponential(50.0, n), 2, (0.0, 20_000.0)),
    NumericFeature("hour", lambda g, n: g.integers(0, 24, n).astype(np.float64), 0, (0.0, 23.0)),
)
BASE_CATEGORICAL: Final = (
    CategoricalFeature("country", COUNTRIES, (0.2, 0.15, 0.1, 0.3, 0.1, 0.08, 0.07)),
    CategoricalFeature("channel", CHANNELS, (0.5, 0.3, 0.2)),
)


def feature_set(n_features: int = 10) -> tuple[list[NumericFeature], list[CategoricalFeature]]:
    """``n_features`` features, 4 numeric for each categorical (10 → 8 + 2, 20 → 16 + 4).

    Beyond the base ten, features are copies of the base ones with a suffix (``amount_2``).
    """
    if n_features < 2:
        raise ValueError(f"n_features: {n_features} must be >= 2")
    n_cat = max(1, round(n_features / 5))
    n_num = n_features - n_cat
    num = [
        BASE_NUMERIC[i % 8]._replace(name=BASE_NUMERIC[i % 8].name + _suffix(i // 8))
        for i in range(n_num)
    ]
    cat = [
        BASE_CATEGORICAL[i % 2]._replace(name=BASE_CATEGORICAL[i % 2].name + _suffix(i // 2))
        for i in range(n_cat)
    ]
    return num, cat


def _suffix(k: int) -> str:
    return "" if k == 0 else f"_{k + 1}"


@dataclass(frozen=True)
class GenConfig:
    """What to generate. ``rate`` is event-time events per second (sets the tick density)."""

    n_events: int = 100_000
    seed: int = 1
    models: int = 1
    versions: int = 1
    n_features: int = 10
    rate: float = 10_000.0
    start: float = START
    label_fraction: float = 0.0
    label_delay_s: tuple[float, float] = (5.0, 30.0)
    scenario: str = "stationary"
    change_at: float = 0.5
    model_prefix: str = "m"


@dataclass
class Generated:
    """Pre-rendered events: each event's JSON bytes plus what is needed to batch them."""

    config: GenConfig
    predictions: list[bytes]
    pred_ts: FloatArray
    pred_request_ids: list[str]
    labels: list[bytes]
    label_ts: FloatArray
    label_request_ids: list[str]
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return len(self.predictions) + len(self.labels)

    def mean_prediction_bytes(self) -> float:
        return float(np.mean([len(b) for b in self.predictions])) if self.predictions else 0.0


def model_ids(cfg: GenConfig) -> list[str]:
    width = max(2, len(str(cfg.models - 1)))
    return [f"{cfg.model_prefix}{i:0{width}d}" for i in range(cfg.models)]


def _score(cols: Mapping[str, Any]) -> FloatArray:
    z = (
        -1.0
        + 3.0 * (cols["merchant_risk"] - 0.28)
        - 2.5 * (np.clip(cols["seller_quality_score"], 0.0, 1.0) - 0.71)
        + 0.004 * (cols["amount"] - 120.0)
    )
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))
    return out


def draw_columns(rng: np.random.Generator, n: int, n_features: int = 10) -> dict[str, Any]:
    """Feature columns (numeric: float arrays; categorical: index arrays)."""
    num, cat = feature_set(n_features)
    cols: dict[str, Any] = {}
    for f in num:
        cols[f.name] = f.draw(rng, n)
    for c in cat:
        cols[c.name] = rng.choice(len(c.values), size=n, p=np.asarray(c.p))
    return cols


def generate(cfg: GenConfig) -> Generated:
    """Generate and render ``cfg.n_events`` events (predictions + labels), deterministically."""
    t0 = time.perf_counter()
    if not 0.0 <= cfg.label_fraction <= 1.0:
        raise ValueError(f"label_fraction: {cfg.label_fraction} must be in [0, 1]")
    scenario = get_scenario(cfg.scenario)
    rng = np.random.default_rng(cfg.seed)
    # n predictions + about label_fraction * n labels = n_events
    n = max(1, round(cfg.n_events / (1.0 + cfg.label_fraction)))
    span = n / cfg.rate
    t = np.arange(n, dtype=np.float64) / cfg.rate + rng.uniform(0.0, 0.5 / cfg.rate, n)
    num, cat = feature_set(cfg.n_features)
    cols = draw_columns(rng, n, cfg.n_features)
    cols["cost_usd"] = 0.0002 * rng.uniform(0.8, 1.2, n)
    scenario.apply(cols, t, cfg.change_at * span)
    score = _score(cols)
    pred = (score > 0.5).astype(np.int64).tolist()
    y = rng.random(n) < score
    latency = np.round(rng.gamma(4.0, 20.0, n), 1).tolist()
    cost = np.round(cols["cost_usd"], 7).tolist()
    region = rng.choice(len(REGIONS), size=n, p=[0.45, 0.35, 0.2]).tolist()
    models = model_ids(cfg)
    model_of = rng.integers(0, cfg.models, n).tolist()
    version_of = rng.integers(0, cfg.versions, n).tolist()
    salt = rng.integers(0, 1 << 24, n).tolist()
    ts = np.round(cfg.start + t, 5)
    ts_l = ts.tolist()
    score_l = np.round(score, 5).tolist()
    feats_cols: list[tuple[str, list[Any]]] = []
    for f in num:
        vals = np.round(cols[f.name], f.decimals)
        feats_cols.append(
            (f.name, vals.astype(np.int64).tolist() if f.decimals == 0 else vals.tolist())
        )
    for c in cat:
        names = np.asarray(c.values, dtype=object)
        feats_cols.append((c.name, names[cols[c.name]].tolist()))
    names_f = [name for name, _ in feats_cols]
    columns_f = [vals for _, vals in feats_cols]
    rows_f = list(zip(*columns_f, strict=True))
    versions = [f"v{i + 1}" for i in range(cfg.versions)]
    s = cfg.seed
    rids = [f"r{s}-{i:09d}-{salt[i]:06x}" for i in range(n)]
    dumps = orjson.dumps
    preds = [
        dumps(
            {
                "event_id": f"p{s}-{i:09d}",
                "model_id": models[model_of[i]],
                "model_version": versions[version_of[i]],
                "request_id": rids[i],
                "ts": ts_l[i],
                "features": dict(zip(names_f, rows_f[i], strict=True)),
                "prediction": pred[i],
                "score": score_l[i],
                "latency_ms": latency[i],
                "cost_usd": cost[i],
                "slice": {"region": REGIONS[region[i]]},
            }
        )
        for i in range(n)
    ]
    labels: list[bytes] = []
    label_rids: list[str] = []
    label_ts = np.zeros(0)
    if cfg.label_fraction > 0:
        has = np.flatnonzero(rng.random(n) < cfg.label_fraction)
        lo, hi = cfg.label_delay_s
        lts = ts[has] + rng.uniform(lo, hi, has.shape[0])
        order = np.argsort(lts, kind="stable")
        has, lts = has[order], np.round(lts[order], 5)
        y_l = y.astype(np.int64)
        lts_l = lts.tolist()
        for j, i in enumerate(has.tolist()):
            labels.append(
                dumps(
                    {
                        "event_id": f"l{s}-{i:09d}",
                        "model_id": models[model_of[i]],
                        "request_id": rids[i],
                        "ts": lts_l[j],
                        "label": int(y_l[i]),
                    }
                )
            )
            label_rids.append(rids[i])
        label_ts = lts
    gen = Generated(cfg, preds, ts, rids, labels, label_ts, label_rids)
    gen.seconds = time.perf_counter() - t0
    gen.info = {
        "predictions": len(preds),
        "labels": len(labels),
        "event_time_span_s": round(span, 3),
        "scenario": scenario.name,
        "mean_prediction_bytes": round(gen.mean_prediction_bytes(), 1),
        "generate_seconds": round(gen.seconds, 3),
        "generate_events_per_s": round(gen.n_events / gen.seconds, 1) if gen.seconds else None,
    }
    return gen


# --------------------------------------------------------------------------- messages


class Message(NamedTuple):
    """One Kafka message to produce (or to feed stage 1 directly)."""

    kind: str  # "prediction" | "label"
    partition: int
    key: bytes
    value: bytes
    n_events: int
    first_ts: float


def batch_messages(
    events: Sequence[bytes],
    request_ids: Sequence[str],
    ts: FloatArray,
    kind: str,
    *,
    events_per_message: int,
    partitions: int = 1,
) -> list[Message]:
    """Pack events into messages: per partition (murmur2 of ``request_id``), in order,
    ``events_per_message`` at a time (1 = the bare event object, as a plain producer sends)."""
    if events_per_message < 1:
        raise ValueError(f"events_per_message: {events_per_message} must be >= 1")
    if partitions == 1:
        parts = [0] * len(events)
    else:
        parts = [partition_for(r.encode(), partitions) for r in request_ids]
    ts_l = ts.tolist()
    out: list[Message] = []
    if events_per_message == 1:
        for i, ev in enumerate(events):
            out.append(Message(kind, parts[i], request_ids[i].encode(), ev, 1, ts_l[i]))
        return out
    pending: dict[int, list[int]] = {}
    for i in range(len(events)):
        buf = pending.setdefault(parts[i], [])
        buf.append(i)
        if len(buf) >= events_per_message:
            out.append(_pack(events, request_ids, ts_l, kind, parts[i], buf))
            pending[parts[i]] = []
    for p, buf in pending.items():
        if buf:
            out.append(_pack(events, request_ids, ts_l, kind, p, buf))
    out.sort(key=lambda m: m.first_ts)
    return out


def _pack(
    events: Sequence[bytes],
    request_ids: Sequence[str],
    ts_l: Sequence[float],
    kind: str,
    partition: int,
    idx: Sequence[int],
) -> Message:
    value = b"[" + b",".join(events[i] for i in idx) + b"]"
    return Message(kind, partition, request_ids[idx[0]].encode(), value, len(idx), ts_l[idx[0]])


def messages(gen: Generated, *, events_per_message: int, partitions: int = 1) -> list[Message]:
    """Predictions and labels as messages, merged in arrival (event-time) order."""
    preds = batch_messages(
        gen.predictions,
        gen.pred_request_ids,
        gen.pred_ts,
        "prediction",
        events_per_message=events_per_message,
        partitions=partitions,
    )
    if not gen.labels:
        return preds
    labels = batch_messages(
        gen.labels,
        gen.label_request_ids,
        gen.label_ts,
        "label",
        events_per_message=events_per_message,
        partitions=partitions,
    )
    return sorted(preds + labels, key=lambda m: m.first_ts)


# --------------------------------------------------------------------------- config + profiles


def reference_profile(
    model_id: str, n_features: int = 10, rows: int = 5000, seed: int = 7, bins: int = 10
) -> dict[str, Any]:
    """A reference profile built by ``driftline baseline``'s code from a stationary sample."""
    rng = np.random.default_rng(seed)
    cols = draw_columns(rng, rows, n_features)
    num, cat = feature_set(n_features)
    score = _score(cols)
    snapshot: dict[str, list[Any]] = {}
    for f in num:
        snapshot[f.name] = np.round(cols[f.name], f.decimals).tolist()
    for c in cat:
        snapshot[c.name] = np.asarray(c.values, dtype=object)[cols[c.name]].tolist()
    snapshot["score"] = score.tolist()
    snapshot["prediction"] = (score > 0.5).astype(np.int64).tolist()
    snapshot["label"] = (rng.random(rows) < score).astype(np.int64).tolist()
    model = _model_config(model_id, n_features, bins)
    return build_profile(snapshot, model, source="load_tests.generator", progress=None)


def _model_config(model_id: str, n_features: int, bins: int) -> Any:
    doc = {"models": {model_id: {"features": _features_doc(n_features)}}}
    if bins != 10:
        doc["models"][model_id]["detectors"] = {"bins": bins}
    return parse_config(doc, "generated").models[model_id]


def _features_doc(n_features: int) -> dict[str, Any]:
    num, cat = feature_set(n_features)
    out: dict[str, Any] = {}
    for f in num:
        out[f.name] = {"type": "numeric", "range": list(f.range)}
    for c in cat:
        out[c.name] = {"type": "categorical", "categories": list(c.values)}
    return out


def monitor_config(
    gcfg: GenConfig,
    *,
    label_horizon: str | float | None = None,
    template: Path = EXAMPLE_MONITORS,
) -> tuple[MonitorConfig, dict[str, Profile]]:
    """A monitor config for the generator's models, built from ``examples/monitors.yaml``'s
    first model (detectors, budgets, policy, kill switch, label horizon, slices) with the
    generator's features and an inline profile per model. ``label_horizon`` overrides the
    template's (0 turns the label join off)."""
    from stream.profile import Profile

    tdoc = yaml.safe_load(template.read_text(encoding="utf-8"))
    base = dict(next(iter(tdoc["models"].values())))
    base.pop("reference", None)
    base["features"] = _features_doc(gcfg.n_features)
    base["slices"] = {"region": {"values": list(REGIONS)}}
    if label_horizon is not None:
        base["label_horizon"] = label_horizon
    if gcfg.versions < 2:
        base.pop("kill_switch", None)  # rollback targets need a v1 to roll back to
    profile_doc = reference_profile("template", gcfg.n_features)
    models: dict[str, Any] = {}
    profiles: dict[str, Profile] = {}
    for m in model_ids(gcfg):
        pdoc = {**profile_doc, "model_id": m}
        models[m] = {**base, "reference": pdoc}
        profiles[m] = Profile.from_dict(pdoc)
    cfg = parse_config({"version": 1, "models": models}, "generated-monitors.yaml")
    return cfg, profiles


# --------------------------------------------------------------------------- producing


def produce(
    bootstrap: str,
    msgs: Sequence[Message],
    topics: Mapping[str, str],
    *,
    extra_conf: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Produce messages with confluent-kafka (acks=all, no compression, large batches);
    ``topics`` maps ``kind`` → topic name. Returns counts and the produce rate."""
    from confluent_kafka import Producer

    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "compression.type": "none",
        "message.max.bytes": 10_000_000,
    }
    conf.update(extra_conf or {})
    producer = Producer(conf)
    errors: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    t0 = time.perf_counter()
    n_events = 0
    for m in msgs:
        while True:
            try:
                producer.produce(
                    topics[m.kind],
                    value=m.value,
                    key=m.key,
                    partition=m.partition,
                    on_delivery=done,
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        n_events += m.n_events
    left = producer.flush(60)
    secs = time.perf_counter() - t0
    if left or errors:
        raise RuntimeError(f"produce: {left} messages not delivered; errors: {errors[:3]}")
    return {
        "messages": len(msgs),
        "events": n_events,
        "bytes": sum(len(m.value) for m in msgs),
        "seconds": round(secs, 3),
        "messages_per_s": round(len(msgs) / secs, 1),
        "events_per_s": round(n_events / secs, 1),
    }


def iter_chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default: env)")
    ap.add_argument("--predictions-topic", default="driftline.predictions")
    ap.add_argument("--labels-topic", default="driftline.labels")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--events-per-message", type=int, default=SDK_BATCH_EVENTS)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--models", type=int, default=1)
    ap.add_argument("--labels", type=float, default=0.0, help="label fraction (0..1)")
    ap.add_argument("--scenario", default="stationary")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="generate only; print the speed")
    args = ap.parse_args(argv)
    cfg = GenConfig(
        n_events=args.events,
        seed=args.seed,
        models=args.models,
        label_fraction=args.labels,
        scenario=args.scenario,
    )
    gen = generate(cfg)
    t0 = time.perf_counter()
    msgs = messages(gen, events_per_message=args.events_per_message, partitions=args.partitions)
    gen.info["batch_seconds"] = round(time.perf_counter() - t0, 3)
    print(orjson.dumps(gen.info).decode())
    if args.dry_run:
        return 0
    import os

    bootstrap = args.bootstrap or os.environ.get("DRIFTLINE_KAFKA_BOOTSTRAP")
    if not bootstrap:
        print(
            "generator: error: --bootstrap or DRIFTLINE_KAFKA_BOOTSTRAP is needed", file=sys.stderr
        )
        return 2
    res = produce(
        bootstrap,
        msgs,
        {"prediction": args.predictions_topic, "label": args.labels_topic},
    )
    print(orjson.dumps(res).decode())
    return 0


__all__ = [
    "SDK_BATCH_EVENTS",
    "GenConfig",
    "Generated",
    "Message",
    "batch_messages",
    "feature_set",
    "generate",
    "messages",
    "monitor_config",
    "produce",
    "reference_profile",
]

if __name__ == "__main__":
    sys.exit(main())
