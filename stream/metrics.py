"""Prometheus metrics of the driftline service, with bounded label values.

:class:`Metrics` registers every ``driftline_*`` family on a
:class:`~prometheus_client.CollectorRegistry` passed in (tests use a fresh one) and is fed by
the engine's outputs, one call per batch: :meth:`Metrics.observe_ingest` (stage 1),
:meth:`Metrics.observe_join` (the store's join result), :meth:`Metrics.observe_detect`
(stage 2). Infrastructure numbers (consumer lag, checkpoint latency, batch sizes) come from
the worker through :meth:`Metrics.checkpoint`, :meth:`Metrics.batch` and the ``set_*``
methods.

Label bounding (no label value ever comes straight from input):

* ``model``: a configured model id, else ``other``;
* ``version``: per model, at most ``max_versions`` distinct values. A new version takes a
  free slot; when none is free it replaces the least recently seen version if that one was
  idle for ``version_idle_s`` (its series are removed), else it is counted as ``other``. A
  flood of random versions therefore lands in ``other`` while real versions keep their
  slots, and a long-running worker still shows the versions deployed today;
* ``feature``: a configured feature of the model, ``-`` for none, else ``other``;
* ``slice``: ``dim=value`` with a configured slice dimension and one of its configured
  values (or, without configured values, one of the first ``max_values`` seen), ``-`` for
  none, else ``other``;
* ``detector``, ``kind``, ``severity``, ``action``, ``mode``, ``reason``, ``outcome``,
  ``stage``, ``topic`` (the topic's role, not its name): closed sets, else ``other``;
* ``partition``: ``0 .. max_partitions - 1``, else ``other``.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> from stream.config import load_config_text
>>> cfg = load_config_text("models: {fraud: {features: {amount: {type: numeric}}}}")
>>> m = Metrics(cfg, CollectorRegistry())
>>> m.model_label("fraud"), m.model_label("not-configured")
('fraud', 'other')
>>> [m.version_label("fraud", f"v{i}") for i in range(10)][-3:]
['v7', 'other', 'other']
>>> m.reason_label("unknown_model"), m.reason_label("made-up")
('unknown_model', 'other')
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PCounter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from stream.config import ACTIONS, KINDS, SEVERITIES, MonitorConfig, Topics
from stream.detect import DetectOutput
from stream.engine import IngestOutput
from stream.events import REASONS
from stream.policy import Finding
from stream.store import JOIN_OUTCOMES, STAGES, JoinResult, OutMessage
from stream.summary import DEFAULT_SCORE_EDGES, LATENCY_EDGES_MS, ModelPlan

__all__ = [
    "BATCH_MESSAGE_BUCKETS",
    "CHECKPOINT_BUCKETS",
    "DETECTORS",
    "FAMILIES",
    "LATENCY_BUCKETS_S",
    "OTHER",
    "TOPIC_ROLES",
    "Metrics",
]

OTHER: Final = "other"
NONE: Final = "-"
MODEL_LEVEL: Final = "*"  # version label of model-level signals (label drift)

DETECTORS: Final[tuple[str, ...]] = (
    "psi",
    "cusum",
    "bernoulli_cusum",
    "page_hinkley",
    "adwin",
    "calibration",
    "cost_per_1k",
    "quality.missing",
    "quality.wrong_type",
    "quality.out_of_range",
    "quality.unknown_category",
)
"""Detector label values (plus ``latency_p<q>`` for each configured latency percentile)."""

TOPIC_ROLES: Final[tuple[str, ...]] = tuple(Topics.__dataclass_fields__)
COMMAND_ACTIONS: Final[tuple[str, ...]] = (*ACTIONS, "release")
MODES: Final = ("automatic", "manual")
SUMMARY_OUTCOMES: Final = ("applied", "duplicate", "invalid")
REQUEST_OUTCOMES: Final = ("applied", "duplicate", "invalid")
OUTPUT_OUTCOMES: Final = ("dead_lettered", "dropped")
JOIN_OPS: Final = ("park", "label")
STORE_OPS: Final = ("claim", "commit", "ack_outbox", "get_killswitch", "set_killswitch")
CHECKPOINT_ERRORS: Final = ("fenced", "connection", "timeout", "other")
STATE_RECOVERIES: Final = ("rollback", "replay", "reset")
"""How a claim found and handled lost state: ``rollback`` (the Redis checkpoint is behind
the Kafka-committed offsets: replayed from it), ``replay`` (state missing, the log still
holds everything: replayed from offset 0, exact), ``reset`` (state missing, the log does
not: fresh state from the committed offset, ``state_reset`` alert published)."""

CHECKPOINT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_DURATION_BUCKETS: Final = CHECKPOINT_BUCKETS
BATCH_MESSAGE_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 20_000)
_LATENCY_EDGE_IDX: Final = np.arange(0, LATENCY_EDGES_MS.shape[0], 2)
LATENCY_BUCKETS_S: Final[tuple[float, ...]] = tuple(
    float(x) / 1000.0 for x in LATENCY_EDGES_MS[_LATENCY_EDGE_IDX]
)
"""Latency buckets (s): every second interior edge of the engine's latency histogram."""

FAMILIES: Final[dict[str, tuple[str, tuple[str, ...], str]]] = {
    # name (without _total): (type, labels, help)
    "driftline_up": ("gauge", (), "1 while the worker process runs its stages, 0 when stopping."),
    "driftline_ready": ("gauge", (), "1 once the worker has claimed its partitions and consumes."),
    "driftline_config_info": (
        "gauge",
        ("config_hash",),
        "Always 1; the label carries the hash of the loaded monitor config.",
    ),
    "driftline_assigned_partitions": (
        "gauge",
        ("stage",),
        "Partitions this worker currently owns, per stage.",
    ),
    "driftline_events_accepted": (
        "counter",
        (),
        "Stage 1: prediction and label events that passed decoding and validation.",
    ),
    "driftline_events_rejected": (
        "counter",
        ("reason",),
        "Stage 1: rejected events, each published to the dead-letter topic, by reason code.",
    ),
    "driftline_predictions": (
        "counter",
        ("model", "version"),
        "Predictions folded into emitted tick summaries (counted when the tick closes).",
    ),
    "driftline_labels": ("counter", ("model",), "Label events folded into emitted summaries."),
    "driftline_late_events": (
        "counter",
        ("model",),
        "Events that arrived after their tick closed (counted into the open tick).",
    ),
    "driftline_prediction_score": (
        "histogram",
        ("model", "version"),
        "Prediction scores; buckets are the model's reference score bins (le = upper edge, "
        "exclusive).",
    ),
    "driftline_prediction_latency_seconds": (
        "histogram",
        ("model", "version"),
        "Serving latency reported on predictions (le = upper edge, exclusive).",
    ),
    "driftline_prediction_cost_usd": (
        "counter",
        ("model", "version"),
        "Serving cost (USD) reported on predictions.",
    ),
    "driftline_costed_predictions": (
        "counter",
        ("model", "version"),
        "Predictions that reported a cost (denominator of cost per 1k requests).",
    ),
    "driftline_label_join_ops": (
        "counter",
        ("model", "op"),
        "Label-join operations sent to the store: park (prediction) or label.",
    ),
    "driftline_label_join": (
        "counter",
        ("model", "outcome"),
        "Label-join outcomes: joined, duplicate, early, duplicate_request.",
    ),
    "driftline_label_join_pending": (
        "gauge",
        (),
        "Entries held in the label-join buffer (when the store can report it).",
    ),
    "driftline_summaries_emitted": ("counter", (), "Stage 1: tick summaries emitted."),
    "driftline_summaries_consumed": (
        "counter",
        ("outcome",),
        "Stage 2: summaries read, by outcome: applied, duplicate (dropped by id), invalid.",
    ),
    "driftline_messages_published": (
        "counter",
        ("topic",),
        "Messages acknowledged by the broker, by topic role.",
    ),
    "driftline_output_too_large": (
        "counter",
        ("topic", "outcome"),
        "Output messages the producer or broker refused as too large, by topic role: "
        "dead_lettered (reason output_too_large) or dropped (the dead-letter topic refused "
        "the record too).",
    ),
    "driftline_drift_statistic": (
        "gauge",
        ("model", "version", "kind", "detector", "feature", "slice"),
        "Latest value of each drift / quality / budget statistic (PSI, CUSUM, rates...).",
    ),
    "driftline_drift_threshold": (
        "gauge",
        ("model", "version", "kind", "detector", "feature", "slice"),
        "Threshold the statistic is compared with (critical for PSI once critical).",
    ),
    "driftline_drift_window_events": (
        "gauge",
        ("model", "version", "kind", "detector", "feature", "slice"),
        "Events behind the latest statistic (window size; sequential detectors: events seen).",
    ),
    "driftline_alerts": (
        "counter",
        ("model", "kind", "severity"),
        "Alerts published (the alert itself names the version).",
    ),
    "driftline_killswitch_commands": (
        "counter",
        ("model", "action", "mode"),
        "Kill-switch control commands (trips and releases).",
    ),
    "driftline_killswitch_requests": (
        "counter",
        ("model", "outcome"),
        "Manual kill-switch requests read by stage 2: applied, duplicate (request id already "
        "applied, dropped) or invalid.",
    ),
    "driftline_killswitch_active": (
        "gauge",
        ("model", "action"),
        "1 while the model's kill switch is tripped with this action, else 0.",
    ),
    "driftline_consumer_lag_messages": (
        "gauge",
        ("topic", "partition"),
        "Messages between the committed position and the partition's high watermark.",
    ),
    "driftline_checkpoint_duration_seconds": (
        "histogram",
        ("stage",),
        "Duration of one checkpoint (state + offsets + outbox + join) in the store.",
    ),
    "driftline_checkpoint_errors": (
        "counter",
        ("stage", "error"),
        "Failed checkpoints: fenced, connection, timeout, other.",
    ),
    "driftline_last_checkpoint_timestamp_seconds": (
        "gauge",
        ("stage",),
        "Unix time of the last successful checkpoint per stage (process start until then).",
    ),
    "driftline_store_round_trips": (
        "counter",
        (),
        "Requests sent to the state store (retries included).",
    ),
    "driftline_store_retries": (
        "counter",
        (),
        "State-store requests retried after a connection error or timeout.",
    ),
    "driftline_state_recoveries": (
        "counter",
        ("stage", "outcome"),
        "Claims that found lost state, by outcome: rollback (Redis behind the committed "
        "Kafka offsets, replayed from its checkpoint), replay (state missing, replayed from "
        "offset 0, exact), reset (state missing, fresh state, state_reset alert).",
    ),
    "driftline_batch_messages": ("histogram", ("stage",), "Messages per processed batch."),
    "driftline_batch_duration_seconds": (
        "histogram",
        ("stage",),
        "Wall time to process one batch (engine + checkpoint + publish).",
    ),
}
"""Every family this module registers: type, label names, help (docs are generated from it)."""

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- bucket histograms


class _BucketHistograms:
    """A histogram family fed with whole bucket counts (the engine already binned them).

    Each label set has its own edges (score bins differ per model). Samples are cumulative
    as Prometheus wants; ``le`` is the bin's upper edge. Thread-safe (scrapes may run on
    another thread).
    """

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = labelnames
        self._lock = threading.Lock()
        # labels -> (edges, counts per bin incl. +Inf bin, sum)
        self._series: dict[tuple[str, ...], tuple[tuple[float, ...], FloatArray, list[float]]] = {}

    def add(
        self,
        labels: tuple[str, ...],
        edges: Sequence[float],
        counts: Sequence[float] | FloatArray,
        total: float,
    ) -> None:
        """Add bin counts (``len(edges) + 1`` bins, the last one open-ended) and their sum."""
        arr = np.asarray(counts, np.float64)
        if arr.shape[0] != len(edges) + 1:
            raise ValueError(
                f"{self.name}: {arr.shape[0]} bin counts for {len(edges)} edges "
                f"(expected {len(edges) + 1})"
            )
        with self._lock:
            cur = self._series.get(labels)
            key_edges = tuple(float(e) for e in edges)
            if cur is None or cur[0] != key_edges:
                cur = self._series[labels] = (key_edges, np.zeros(arr.shape[0]), [0.0])
            cur[1][:] += arr
            cur[2][0] += float(total)

    def remove_where(self, pred: Callable[[tuple[str, ...]], bool]) -> None:
        with self._lock:
            for k in [k for k in self._series if pred(k)]:
                del self._series[k]

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        with self._lock:
            items = [(k, e, c.copy(), s[0]) for k, (e, c, s) in self._series.items()]
        for labels, edges, counts, total in sorted(items, key=lambda x: x[0]):
            cum = np.cumsum(counts)
            buckets = [(_fmt(e), float(cum[i])) for i, e in enumerate(edges)]
            buckets.append(("+Inf", float(cum[-1])))
            fam.add_metric(list(labels), buckets, total)
        return [fam]


def _fmt(x: float) -> str:
    return repr(float(x))


DRIFT_FAMILIES: Final = (
    "driftline_drift_statistic",
    "driftline_drift_threshold",
    "driftline_drift_window_events",
)


class _DriftGauges:
    """The three drift gauge families, one entry per signal (the label set they share).

    prometheus_client's labelled :class:`~prometheus_client.Gauge` keeps a child object, a
    lock and a value object per series: ~1 KB per series, ~3 KB per signal. At 1,000
    models x 20 features a worker exports ~78k signals (234k series), which held ~250 MB
    and over a million Python objects. Here a signal is one key and one list of three
    floats. Thread-safe (scrapes may run on another thread).
    """

    def __init__(self, labelnames: tuple[str, ...]) -> None:
        self.labelnames = labelnames
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], list[float]] = {}

    def set(self, labels: tuple[str, ...], stat: float, thr: float, n: float) -> None:
        with self._lock:
            self._series[labels] = [float(stat), float(thr), float(n)]

    def remove_where(self, pred: Callable[[tuple[str, ...]], bool]) -> None:
        with self._lock:
            for k in [k for k in self._series if pred(k)]:
                del self._series[k]

    def __len__(self) -> int:
        return len(self._series)

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(name, FAMILIES[name][2], labels=self.labelnames)
            for name in DRIFT_FAMILIES
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        fams = self._families()
        with self._lock:
            items = sorted(self._series.items())
        for labels, values in items:
            key = list(labels)
            for fam, v in zip(fams, values, strict=True):
                fam.add_metric(key, v)
        return fams


# --------------------------------------------------------------------------- metrics


class Metrics:
    """All driftline metrics on one registry, with label values bounded by the config.

    ``plans`` (from :func:`stream.engine.compile_plans`) supply each model's score bin edges
    and slice values; without them the default score edges and the configured slice values
    are used. ``clock`` is the wall clock used for version-slot idleness and checkpoint
    timestamps.
    """

    def __init__(
        self,
        config: MonitorConfig,
        registry: CollectorRegistry,
        *,
        plans: Mapping[str, ModelPlan] | None = None,
        topics: Topics | None = None,
        max_versions: int = 8,
        version_idle_s: float = 900.0,
        max_partitions: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_versions < 1:
            raise ValueError(f"max_versions: {max_versions!r} must be >= 1")
        self.config = config
        self.registry = registry
        self.plans = plans or {}
        self.topics = topics or Topics()
        self.max_versions = max_versions
        self.version_idle_s = version_idle_s
        self.max_partitions = max_partitions
        self.clock = clock
        self._lock = threading.Lock()
        self._topic_roles = {getattr(self.topics, r): r for r in TOPIC_ROLES}
        self._features = {m: {f.name for f in c.features} for m, c in config.models.items()}
        self._score_edges: dict[str, tuple[float, ...]] = {}
        for m in config.models:
            plan = self.plans.get(m)
            edges = plan.score_edges if plan is not None else DEFAULT_SCORE_EDGES
            self._score_edges[m] = tuple(float(e) for e in edges)
        # slice dim -> allowed values (None: first max_values seen) and max_values
        self._slices: dict[str, dict[str, tuple[set[str] | None, int]]] = {}
        for m, c in config.models.items():
            dims: dict[str, tuple[set[str] | None, int]] = {}
            plan = self.plans.get(m)
            plan_vals = {s.name: s.values for s in plan.slices} if plan is not None else {}
            for s in c.slices:
                vals: set[str] | None = None
                if s.name in plan_vals:
                    vals = set(plan_vals[s.name])
                elif s.values is not None:
                    vals = set(s.values)
                dims[s.name] = (vals, s.max_values)
            self._slices[m] = dims
        self._slices_seen: dict[tuple[str, str], set[str]] = {}
        dets = set(DETECTORS)
        for c in config.models.values():
            dets.add(f"latency_p{c.budgets.latency_percentile:g}")
        self._detectors = frozenset(dets)
        self._versions: dict[str, dict[str, float]] = {m: {} for m in config.models}
        self._version_series: dict[tuple[str, str], set[tuple[MetricWrapperBase, tuple[str, ...]]]]
        self._version_series = {}
        self._store_seen = (0, 0)

        def counter(name: str) -> PCounter:
            _, labels, doc = FAMILIES[name]
            return PCounter(name, doc, labels, registry=registry)

        def gauge(name: str) -> Gauge:
            _, labels, doc = FAMILIES[name]
            return Gauge(name, doc, labels, registry=registry)

        def hist(name: str, buckets: Sequence[float]) -> Histogram:
            _, labels, doc = FAMILIES[name]
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self.up = gauge("driftline_up")
        self.ready = gauge("driftline_ready")
        self.config_info = gauge("driftline_config_info")
        self.assigned_partitions = gauge("driftline_assigned_partitions")
        self.events_accepted = counter("driftline_events_accepted")
        self.events_rejected = counter("driftline_events_rejected")
        self.predictions = counter("driftline_predictions")
        self.labels = counter("driftline_labels")
        self.late_events = counter("driftline_late_events")
        self.cost_usd = counter("driftline_prediction_cost_usd")
        self.costed_predictions = counter("driftline_costed_predictions")
        self.join_ops = counter("driftline_label_join_ops")
        self.join_outcomes = counter("driftline_label_join")
        self.join_pending = gauge("driftline_label_join_pending")
        self.summaries_emitted = counter("driftline_summaries_emitted")
        self.summaries_consumed = counter("driftline_summaries_consumed")
        self.messages_published = counter("driftline_messages_published")
        self.drift = _DriftGauges(FAMILIES["driftline_drift_statistic"][1])
        registry.register(self.drift)
        self.alerts = counter("driftline_alerts")
        self.killswitch_commands = counter("driftline_killswitch_commands")
        self.killswitch_active = gauge("driftline_killswitch_active")
        self.killswitch_requests = counter("driftline_killswitch_requests")
        self.output_too_large = counter("driftline_output_too_large")
        self.consumer_lag = gauge("driftline_consumer_lag_messages")
        self.checkpoint_duration = hist("driftline_checkpoint_duration_seconds", CHECKPOINT_BUCKETS)
        self.checkpoint_errors = counter("driftline_checkpoint_errors")
        self.last_checkpoint = gauge("driftline_last_checkpoint_timestamp_seconds")
        self.store_round_trips = counter("driftline_store_round_trips")
        self.store_retries = counter("driftline_store_retries")
        self.state_recoveries = counter("driftline_state_recoveries")
        self.batch_messages = hist("driftline_batch_messages", BATCH_MESSAGE_BUCKETS)
        self.batch_duration = hist("driftline_batch_duration_seconds", BATCH_DURATION_BUCKETS)
        _, lab, doc = FAMILIES["driftline_prediction_score"]
        self.score_hist = _BucketHistograms("driftline_prediction_score", doc, lab)
        _, lab, doc = FAMILIES["driftline_prediction_latency_seconds"]
        self.latency_hist = _BucketHistograms("driftline_prediction_latency_seconds", doc, lab)
        registry.register(self.score_hist)
        registry.register(self.latency_hist)

        # Series that exist from the start at 0: alert rules compare against them, and
        # increase()/rate() miss the first increment of a counter born with a value > 0.
        self.up.set(1)
        self.ready.set(0)
        self.config_info.labels(config.config_hash).set(1)
        for reason in REASONS:
            self.events_rejected.labels(reason)
        for role in TOPIC_ROLES:
            self.messages_published.labels(role)
            for outcome in OUTPUT_OUTCOMES:
                self.output_too_large.labels(role, outcome)
        for m in config.models:
            self.labels.labels(m)
            self.late_events.labels(m)
            for a in ACTIONS:
                self.killswitch_active.labels(m, a).set(0)
            for a in COMMAND_ACTIONS:
                for mode in MODES:
                    self.killswitch_commands.labels(m, a, mode)
            for kind in KINDS:
                for sev in SEVERITIES:
                    self.alerts.labels(m, kind, sev)
            for outcome in JOIN_OUTCOMES:
                self.join_outcomes.labels(m, outcome)
            for outcome in REQUEST_OUTCOMES:
                self.killswitch_requests.labels(m, outcome)
            for op in JOIN_OPS:
                self.join_ops.labels(m, op)
        started = self.clock()
        for st in STAGES:
            self.assigned_partitions.labels(st).set(0)
            # until the first checkpoint: the start time, so "stale" also catches a worker
            # that never manages to checkpoint
            self.last_checkpoint.labels(st).set(started)
            self.checkpoint_duration.labels(st)
            self.batch_messages.labels(st)
            self.batch_duration.labels(st)
            for outcome in STATE_RECOVERIES:
                self.state_recoveries.labels(st, outcome)
            for e in CHECKPOINT_ERRORS:
                self.checkpoint_errors.labels(st, e)
        for o in SUMMARY_OUTCOMES:
            self.summaries_consumed.labels(o)

    # ----------------------------------------------------------------- label bounding

    def model_label(self, model_id: object) -> str:
        """``model_id`` if configured, else ``other``."""
        return model_id if isinstance(model_id, str) and model_id in self._versions else OTHER

    def version_label(self, model_id: object, version: object) -> str:
        """A bounded version label for the model (see the module docstring)."""
        model = self.model_label(model_id)
        if model == OTHER or not isinstance(version, str):
            return OTHER
        if version == MODEL_LEVEL:
            return MODEL_LEVEL
        slots = self._versions[model]
        now = self.clock()
        with self._lock:
            if version in slots:
                slots[version] = now
                return version
            if len(slots) < self.max_versions:
                slots[version] = now
                return version
            oldest = min(slots, key=slots.__getitem__)
            if now - slots[oldest] < self.version_idle_s:
                return OTHER
            del slots[oldest]
            slots[version] = now
        self._drop_version(model, oldest)
        return version

    def _drop_version(self, model: str, version: str) -> None:
        for metric, labels in self._version_series.pop((model, version), set()):
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

        def match(k: tuple[str, ...]) -> bool:
            return k[0] == model and k[1] == version

        self.score_hist.remove_where(match)
        self.latency_hist.remove_where(match)
        self.drift.remove_where(match)

    def _versioned(self, metric: MetricWrapperBase, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)`` for a family whose first labels are model, version."""
        key = (labels[0], labels[1])
        if key[1] not in (OTHER, MODEL_LEVEL):
            self._version_series.setdefault(key, set()).add((metric, labels))
        return metric.labels(*labels)

    def feature_label(self, model_id: str, feature: object) -> str:
        """A configured feature of the model, ``-`` for None, else ``other``."""
        if feature is None:
            return NONE
        feats = self._features.get(model_id)
        return feature if feats is not None and feature in feats else OTHER

    def slice_label(self, model_id: str, slice_key: object) -> str:
        """``dim=value`` of a configured slice dimension and a bounded value, ``-``/``other``."""
        if slice_key is None or slice_key == MODEL_LEVEL:
            return NONE
        if not isinstance(slice_key, str):
            return OTHER
        dim, sep, value = slice_key.partition("=")
        spec = self._slices.get(model_id, {}).get(dim)
        if not sep or spec is None:
            return OTHER
        allowed, max_values = spec
        if value == OTHER:
            return slice_key
        if allowed is not None:
            return slice_key if value in allowed else f"{dim}={OTHER}"
        seen = self._slices_seen.setdefault((model_id, dim), set())
        if value in seen:
            return slice_key
        with self._lock:
            if len(seen) < max_values:
                seen.add(value)
                return slice_key
        return f"{dim}={OTHER}"

    def detector_label(self, detector: object) -> str:
        return detector if detector in self._detectors else OTHER

    def reason_label(self, reason: object) -> str:
        return reason if reason in REASONS else OTHER

    def topic_label(self, topic: object) -> str:
        """The role (``predictions``, ``summaries``...) of a topic name, else ``other``."""
        if isinstance(topic, str):
            if topic in self._topic_roles:
                return self._topic_roles[topic]
            if topic in TOPIC_ROLES:
                return topic
        return OTHER

    def partition_label(self, partition: object) -> str:
        if isinstance(partition, int) and 0 <= partition < self.max_partitions:
            return str(partition)
        return OTHER

    @staticmethod
    def _pick(value: object, allowed: Iterable[str]) -> str:
        return value if isinstance(value, str) and value in allowed else OTHER

    # ----------------------------------------------------------------- stage 1

    def observe_ingest(self, out: IngestOutput) -> None:
        """Count one stage-1 batch: accepted/rejected events, join ops and the summaries
        it emits (predictions per version, score/latency histograms, cost, labels)."""
        if out.accepted:
            self.events_accepted.inc(out.accepted)
        for reason, n in out.rejected.items():
            self.events_rejected.labels(self.reason_label(reason)).inc(n)
        if out.join_ops:
            ops: Counter[tuple[str, str]] = Counter((op.model_id, op.op) for op in out.join_ops)
            for (model_id, op), n in ops.items():
                self.join_ops.labels(self.model_label(model_id), self._pick(op, JOIN_OPS)).inc(n)
        summaries_topic = self.topics.summaries
        n_sum = 0
        for msg in out.messages:
            if msg.topic == summaries_topic:
                n_sum += 1
                self.observe_summary(orjson.loads(msg.value))
        if n_sum:
            self.summaries_emitted.inc(n_sum)

    def observe_summary(self, doc: Mapping[str, Any]) -> None:
        """Fold one tick summary document (``summary.schema.json``)."""
        model = self.model_label(doc.get("model_id"))
        late = doc.get("late") or 0
        if late:
            self.late_events.labels(model).inc(late)
        lab = doc.get("labels") or {}
        if lab.get("n"):
            self.labels.labels(model).inc(lab["n"])
        edges = self._score_edges.get(model)
        for g in doc.get("groups", ()):
            if g.get("slice") != "*":
                continue
            version = self.version_label(model, g.get("version"))
            n = g.get("n") or 0
            if n:
                self._versioned(self.predictions, (model, version)).inc(n)
            sc = g.get("score")
            if sc and sc.get("n") and edges is not None and len(sc["counts"]) == len(edges) + 1:
                self.score_hist.add((model, version), edges, sc["counts"], sc["sum"])
            lat = g.get("latency")
            if lat and lat.get("n"):
                counts = np.asarray(lat["counts"], np.float64)
                if counts.shape[0] == LATENCY_EDGES_MS.shape[0] + 1:
                    self.latency_hist.add(
                        (model, version),
                        LATENCY_BUCKETS_S,
                        _coarsen(counts, _LATENCY_EDGE_IDX),
                        float(lat["sum"]) / 1000.0,
                    )
            cost = g.get("cost")
            if cost and cost.get("n"):
                self._versioned(self.cost_usd, (model, version)).inc(max(0.0, cost["sum"]))
                self._versioned(self.costed_predictions, (model, version)).inc(cost["n"])

    def observe_join(self, result: JoinResult) -> None:
        """Count the label-join outcomes a stage-1 commit returned."""
        if not result.outcomes:
            return
        c: Counter[tuple[str, str]] = Counter(
            (self.model_label(o.model_id), self._pick(o.outcome, JOIN_OUTCOMES))
            for o in result.outcomes
        )
        for (model, outcome), n in c.items():
            self.join_outcomes.labels(model, outcome).inc(n)

    # ----------------------------------------------------------------- stage 2

    def observe_detect(self, out: DetectOutput) -> None:
        """Count one stage-2 batch: summaries consumed, alerts, kill-switch commands and
        states, and the drift statistics of its findings."""
        if out.applied:
            self.summaries_consumed.labels("applied").inc(out.applied)
        if out.duplicates:
            self.summaries_consumed.labels("duplicate").inc(out.duplicates)
        if out.invalid:
            self.summaries_consumed.labels("invalid").inc(out.invalid)
        if out.findings:
            self.observe_findings_of(out.findings)
        for a in out.alerts:
            self.observe_alert(a)
        for c in out.commands:
            model = self.model_label(c.get("model_id"))
            action = self._pick(c.get("action"), COMMAND_ACTIONS)
            self.killswitch_commands.labels(model, action, self._pick(c.get("mode"), MODES)).inc()
        for model_id, state in out.killswitch.items():
            self.observe_killswitch_state(model_id, state)

    def observe_alert(self, alert: Mapping[str, Any]) -> None:
        """Count one published alert."""
        model = self.model_label(alert.get("model_id"))
        kind = self._pick(alert.get("kind"), KINDS)
        sev = self._pick(alert.get("severity"), SEVERITIES)
        self.alerts.labels(model, kind, sev).inc()

    def observe_findings(self, model_id: str, findings: Iterable[Finding]) -> None:
        """Set the drift gauges from stage-2 findings of one model (the latest wins)."""
        self.observe_findings_of((model_id, f) for f in findings)

    def observe_findings_of(self, findings: Iterable[tuple[str, Finding]]) -> None:
        """Set the drift gauges from ``(model_id, finding)`` pairs (``DetectOutput.findings``);
        only the latest finding of each signal is written."""
        latest: dict[tuple[Any, ...], tuple[str, Finding]] = {}
        for model_id, f in findings:
            latest[(model_id, f.version, f.kind, f.detector, f.feature, f.slice)] = (model_id, f)
        for model_id, f in latest.values():
            model = self.model_label(model_id)
            labels = (
                model,
                self.version_label(model, f.version),
                self._pick(f.kind, KINDS),
                self.detector_label(f.detector),
                self.feature_label(model, f.feature),
                self.slice_label(model, f.slice),
            )
            self._set_drift(labels, f.statistic, f.threshold, f.n)

    def _set_drift(self, labels: tuple[str, ...], stat: float, thr: float, n: float) -> None:
        self.drift.set(labels, stat, thr, n)  # a dropped version's entries: _drop_version

    def observe_detector_state(self, detect: Any, models: Iterable[str] | None = None) -> None:
        """Set the gauges of the sequential detectors (CUSUM, Bernoulli CUSUM) from a
        :class:`stream.detect.Detect`: they report findings only when they fire, so their
        running statistic is read from the detector state (``max(up, down)``).

        ``models``: only these (``DetectOutput.models``, the ones a batch changed); None =
        every model (after a claim). Reading all 1,000 models of a 1,000 x 20 partition
        took ~43 ms, paid by every stage-2 commit."""
        mons = detect.models
        pairs = (
            list(mons.items()) if models is None else [(m, mons[m]) for m in models if m in mons]
        )
        for model_id, mon in pairs:
            model = self.model_label(model_id)
            levels = [(v, vm) for v, vm in mon.versions.items()]
            levels.append((MODEL_LEVEL, mon.model_level))
            for version, vm in levels:
                vlabel = self.version_label(model, version)
                for key, det in vm.seq_dets.items():
                    ident = _seq_identity(key)
                    if ident is None:
                        continue
                    kind, detector, feature, slice_key = ident
                    labels = (
                        model,
                        vlabel,
                        kind,
                        self.detector_label(detector),
                        self.feature_label(model, feature),
                        self.slice_label(model, slice_key),
                    )
                    up, down = det.statistic
                    self._set_drift(labels, max(up, down), det.threshold, det.n_seen)
            self.observe_killswitch_active(model_id, mon.killswitch.active, mon.killswitch.action)

    def observe_killswitch_state(self, model_id: str, state: bytes | Mapping[str, Any]) -> None:
        """Set ``driftline_killswitch_active`` from a kill-switch state (JSON bytes or dict,
        as in ``DetectOutput.killswitch`` and the store's kill-switch mirror)."""
        doc = orjson.loads(state) if isinstance(state, bytes | bytearray) else state
        self.observe_killswitch_active(model_id, bool(doc.get("active")), doc.get("action"))

    def observe_killswitch_active(self, model_id: str, active: bool, action: object) -> None:
        model = self.model_label(model_id)
        if model == OTHER:
            return
        for a in ACTIONS:
            self.killswitch_active.labels(model, a).set(1 if active and action == a else 0)

    # ----------------------------------------------------------------- infrastructure

    def observe_published(self, messages: Iterable[OutMessage]) -> None:
        """Count messages the broker acknowledged, by topic role."""
        c = Counter(self.topic_label(m.topic) for m in messages)
        for role, n in c.items():
            self.messages_published.labels(role).inc(n)

    def observe_output_too_large(self, topic: str, *, dead_lettered: bool) -> None:
        """Count one output message refused as too large (dead-lettered or dropped)."""
        outcome = "dead_lettered" if dead_lettered else "dropped"
        self.output_too_large.labels(self.topic_label(topic), outcome).inc()

    def observe_killswitch_request(self, model_id: object, outcome: str) -> None:
        """Count one manual kill-switch request read by stage 2 (see REQUEST_OUTCOMES)."""
        self.killswitch_requests.labels(
            self.model_label(model_id), self._pick(outcome, REQUEST_OUTCOMES)
        ).inc()

    def set_consumer_lag(self, topic: str, partition: int, lag: float) -> None:
        self.consumer_lag.labels(self.topic_label(topic), self.partition_label(partition)).set(
            max(0.0, lag)
        )

    def clear_consumer_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's lag series (after it was revoked from this worker)."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(self.topic_label(topic), self.partition_label(partition))

    def set_assigned_partitions(self, stage: str, n: int) -> None:
        self.assigned_partitions.labels(self._pick(stage, STAGES)).set(n)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_up(self, up: bool) -> None:
        self.up.set(1 if up else 0)

    def set_join_pending(self, n: int) -> None:
        self.join_pending.set(n)

    def observe_state_recovery(self, stage: str, outcome: str) -> None:
        """A claim found lost state and handled it (``outcome`` in :data:`STATE_RECOVERIES`)."""
        self.state_recoveries.labels(
            self._pick(stage, STAGES), self._pick(outcome, STATE_RECOVERIES)
        ).inc()

    def observe_store_counters(self, round_trips: int, retries: int) -> None:
        """Advance the store counters from the store's running totals (e.g.
        ``RedisStore.round_trips`` / ``.retries``); a total that went down means a new
        store object, whose whole total is added."""
        last_rt, last_re = self._store_seen
        d_rt = round_trips - last_rt if round_trips >= last_rt else round_trips
        d_re = retries - last_re if retries >= last_re else retries
        if d_rt:
            self.store_round_trips.inc(d_rt)
        if d_re:
            self.store_retries.inc(d_re)
        self._store_seen = (round_trips, retries)

    @contextlib.contextmanager
    def checkpoint(self, stage: str) -> Iterator[None]:
        """Time one checkpoint; on success set the stage's last-checkpoint timestamp, on an
        exception count it by class (fenced / connection / timeout / other) and re-raise."""
        st = self._pick(stage, STAGES)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as err:
            self.checkpoint_errors.labels(st, _error_class(err)).inc()
            raise
        self.checkpoint_duration.labels(st).observe(time.perf_counter() - t0)
        self.last_checkpoint.labels(st).set(self.clock())

    @contextlib.contextmanager
    def batch(self, stage: str, messages: int) -> Iterator[None]:
        """Time one batch of ``messages`` input messages (observed even if it raised)."""
        st = self._pick(stage, STAGES)
        self.batch_messages.labels(st).observe(messages)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.batch_duration.labels(st).observe(time.perf_counter() - t0)

    def series_count(self) -> int:
        """Samples currently exposed by this registry (what a scrape would return)."""
        return sum(len(m.samples) for m in self.registry.collect())


def _coarsen(counts: FloatArray, keep: npt.NDArray[np.int64]) -> FloatArray:
    """Merge bins so that only the interior edges ``keep`` remain (cumulative counts at the
    kept edges are unchanged)."""
    cum = np.cumsum(counts)
    at_edges = cum[keep]  # values below edge keep[i] = bins 0..keep[i]
    out = np.empty(keep.shape[0] + 1, np.float64)
    out[0] = at_edges[0]
    out[1:-1] = np.diff(at_edges)
    out[-1] = cum[-1] - at_edges[-1]
    return out


def _seq_identity(key: str) -> tuple[str, str, str | None, str | None] | None:
    """(kind, detector, feature, slice) of a stage-2 sequential-detector key."""
    if key == "label_rate":
        return "label_drift", "bernoulli_cusum", None, None
    if key == "cusum:@score":
        return "prediction_drift", "cusum", None, None
    if key.startswith("cusum:"):
        return "covariate_drift", "cusum", key[len("cusum:") :], None
    if key.startswith("concept:"):
        return "concept_drift", "bernoulli_cusum", None, key[len("concept:") :]
    return None


def _error_class(err: BaseException) -> str:
    from stream.store import Fenced

    if isinstance(err, Fenced):
        return "fenced"
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, ConnectionError):
        return "connection"
    for cls in type(err).__mro__:
        name = cls.__name__
        if name == "TimeoutError":
            return "timeout"
        if name == "ConnectionError":
            return "connection"
    return "other"
