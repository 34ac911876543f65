"""Stage 2 (pure): merge tick summaries per model, run the detectors, apply the policy.

One :class:`Detect` per summaries partition holds a :class:`ModelMonitor` per model. Each
summary is applied exactly once (dedupe by ``(source, partition) → last applied seq``) and
then the signals it touched are evaluated, in summary order, so the same summaries give the
same alerts. Stage-2 "now" is event time: the end of the newest tick seen for the model.

Signals per model version (``slice "*"`` unless noted):

============================  ==============================================  ================
signal                        test                                            alert kind
============================  ==============================================  ================
feature distribution          PSI over a sliding window of ticks vs profile   covariate_drift
feature mean                  CUSUM calibrated from profile mean/std (ARL0)   covariate_drift
out-of-range / unknown cat.   Wilson lower bound of the rate > allowed rate   data_quality
missing / NaN                 same, vs profile missing rate + allowed rate    data_quality
wrong type, required missing  same                                            schema
score distribution / mean     PSI + CUSUM vs profile score                    prediction_drift
label distribution / rate     PSI + Bernoulli CUSUM vs profile (model level)  label_drift
joined errors (per slice)     Bernoulli CUSUM, p0 = profile error rate        concept_drift
calibration (per slice)       weighted |observed - predicted| per score bin   performance
latency percentile            histogram percentile vs budget                  performance
cost per 1k requests          window cost / requests vs budget                cost
LLM tokens, per prompt ver.   PSI + CUSUM vs profile (``llm.output_tokens``)  prediction_drift
LLM flag rate, per prompt v.  Bernoulli CUSUM, p0 = profile flag rate         prediction_drift
============================  ==============================================  ================

LLM signals (features named ``llm.*`` in the config, see :mod:`stream.summary`) are tested
per (model version, prompt version) against the profile's columns of the same name; their
alerts carry ``feature = "llm.<signal>"`` and ``slice = "prompt_version=<pv>"``.
``llm.output_tokens`` and ``llm.flags.*`` are outputs (``prediction_drift``);
``llm.input_tokens`` and ``llm.retrieval_hits`` are inputs (``covariate_drift``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

from detectors.base import Detection, load
from detectors.binary import BernoulliCUSUM, BernoulliCUSUMSpec
from detectors.cusum import CUSUM, CUSUMSpec
from detectors.psi import PSI, PSISpec
from stream.config import ModelConfig, MonitorConfig, Topics
from stream.policy import Detail, Finding, KillSwitch, SignalPolicy, build_alert
from stream.store import OutMessage
from stream.summary import CALIB_BINS, LATENCY_EDGES_MS, ModelPlan

# 2: count windows save their ring arrays ([width, window, newest, slot_ticks, rows]) instead
# of [[tick, row as floats], ...]; schema-1 states still load (their windows in the old
# layout), a schema-1 worker refuses schema 2 (docs/deploy.md, "Upgrades and rollbacks")
STATE_SCHEMA: Final = 2
READABLE_SCHEMAS: Final = frozenset({1, 2})
DETECTOR_NAMES: Final[tuple[str, ...]] = (
    "psi",
    "cusum",
    "bernoulli_cusum",
    "calibration",
    "cost_per_1k",
    "quality.missing",
    "quality.wrong_type",
    "quality.out_of_range",
    "quality.unknown_category",
)
"""Every ``detector`` value stage 2 emits, plus ``latency_p<q>`` per configured percentile
(bounded: safe as a metric label)."""
MAX_VERSIONS: Final = 8
MAX_PROMPTS: Final = 8  # prompt versions tracked per model version (least recent evicted)
QUALITY_WINDOW_TICKS: Final = 10
_QUALITY_DETAIL: Final = ("rate", "violations")
_PSI_DETAIL: Final = ("p_value", "n_effective")
_QUALITY_DETECTOR: Final = {
    d: f"quality.{d}" for d in ("missing", "wrong_type", "out_of_range", "unknown_category")
}
FloatArray = npt.NDArray[np.float64]


def wilson_lower(k: float, n: float, z: float) -> float:
    """Wilson score lower confidence bound of a binomial rate ``k / n``.

    >>> round(wilson_lower(10, 10, 3.0), 3), round(wilson_lower(0, 100, 3.0), 3)
    (0.526, 0.0)
    """
    if n <= 0:
        return 0.0
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return max(0.0, (centre - margin) / (1 + z2 / n))


class TickWindow:
    """Sparse per-tick float vectors over the last ``window`` ticks (tick → vector)."""

    __slots__ = ("newest", "ticks", "width", "window")

    def __init__(self, width: int, window: int) -> None:
        self.width = width
        self.window = window
        self.ticks: dict[int, FloatArray] = {}
        self.newest: int | None = None

    def add(self, tick: int, vec: Sequence[float] | FloatArray) -> bool:
        if self.newest is not None and tick <= self.newest - self.window:
            return False
        row = self.ticks.get(tick)
        if row is None:
            row = self.ticks[tick] = np.zeros(self.width, np.float64)
        row += np.asarray(vec, np.float64)
        if self.newest is None or tick > self.newest:
            self.newest = tick
            cut = tick - self.window
            for t in [t for t in self.ticks if t <= cut]:
                del self.ticks[t]
        return True

    def total(self) -> FloatArray:
        out = np.zeros(self.width, np.float64)
        for row in self.ticks.values():
            out += row
        return out

    @property
    def start_tick(self) -> int:
        return min(self.ticks) if self.ticks else 0

    def to_state(self) -> list[Any]:
        return [
            self.width,
            self.window,
            self.newest,
            [[t, r.tolist()] for t, r in sorted(self.ticks.items())],
        ]

    @classmethod
    def from_state(cls, doc: Sequence[Any]) -> TickWindow:
        w = cls(int(doc[0]), int(doc[1]))
        w.newest = doc[2]
        w.ticks = {int(t): np.asarray(r, np.float64) for t, r in doc[3]}
        return w


_NO_TICK: Final = np.iinfo(np.int64).min
_I32: Final = np.iinfo(np.int32)
_RING_START: Final = 4  # rows a CountWindow starts with; doubles up to ``window`` when needed


class CountWindow:
    """Integer per-tick vectors over the last ``window`` ticks, in one ring buffer.

    The same contract, totals and state layout as :class:`TickWindow` (whose float rows hold
    counts exactly), in one ``(rows, width)`` int32 array (int64 once a value would not fit)
    plus one int64 array of the tick each row holds, instead of one numpy array per tick in a
    dict. The ring starts with ``_RING_START`` rows and doubles (up to ``window``) when two
    ticks of the window would share a row, so sparse streams stay small; ``total()`` is one
    masked int64 sum (exact).

    Its state is the ring itself (see :meth:`to_state`): serialising it creates no Python
    object per count, which is what makes a stage-2 checkpoint of thousands of full windows
    cheap. :meth:`from_state` also loads the older ``[width, window, newest, [[tick, row],
    ...]]`` layout (and a :class:`TickWindow` state of counts).

    >>> w = CountWindow(3, 4)
    >>> [w.add(t, [t, 1, 0]) for t in (10, 12, 11, 14, 10)]
    [True, True, True, True, False]
    >>> w.total().tolist(), w.start_tick, w.newest
    ([37, 3, 0], 11, 14)
    >>> saved = orjson.dumps(w.to_state(), option=orjson.OPT_SERIALIZE_NUMPY)
    >>> saved
    b'[3,4,14,[12,-9223372036854775808,14,11],[[12,1,0],[0,0,0],[14,1,0],[11,1,0]]]'
    >>> back = CountWindow.from_state(orjson.loads(saved))
    >>> back.total().tolist(), back.start_tick, back.newest
    ([37, 3, 0], 11, 14)
    """

    __slots__ = ("newest", "rows", "slot_ticks", "width", "window")

    def __init__(self, width: int, window: int) -> None:
        self.width = width
        self.window = window
        self.newest: int | None = None
        cap = max(1, min(window, _RING_START))
        self.rows: npt.NDArray[np.signedinteger[Any]] = np.zeros((cap, width), np.int32)
        self.slot_ticks: npt.NDArray[np.int64] = np.full(cap, _NO_TICK, np.int64)

    def _row(self, tick: int, newest: int) -> int:
        """The row of ``tick`` (claimed and zeroed when it held an expired tick); grows the
        ring while another tick of the window holds that row."""
        cut = newest - self.window
        while True:
            cap = int(self.slot_ticks.shape[0])
            s = tick % cap
            held = int(self.slot_ticks[s])
            if held == tick:
                return s
            if held <= cut:  # empty or expired: reuse
                self.slot_ticks[s] = tick
                self.rows[s] = 0
                return s
            if cap >= self.window:  # distinct ticks of one window never share a row here
                raise AssertionError(f"tick {tick} collides with {held} in a full ring")
            self._grow(min(self.window, 2 * cap), newest)

    def _grow(self, cap: int, newest: int) -> None:
        live = np.flatnonzero(self.slot_ticks > newest - self.window)
        ticks, rows = self.slot_ticks[live].tolist(), self.rows[live]
        self.slot_ticks = np.full(cap, _NO_TICK, np.int64)
        self.rows = np.zeros((cap, self.width), self.rows.dtype)
        for t, r in zip(ticks, rows, strict=True):
            row = self._row(t, newest)
            self.rows[row] = r

    def add(self, tick: int, vec: Sequence[float] | npt.NDArray[Any]) -> bool:
        """Add ``vec`` to ``tick``'s row; False (nothing kept) when the tick left the window."""
        newest = self.newest
        if newest is not None and tick <= newest - self.window:
            return False
        if newest is None or tick > newest:
            newest = tick
        row = self._row(tick, newest)  # first: it may grow (replace) self.rows
        new = self.rows[row] + np.asarray(vec, np.int64)  # int64 either way
        self._fit(new)
        self.rows[row] = new
        self.newest = newest
        return True

    def _fit(self, values: npt.NDArray[np.int64]) -> None:
        """Widen the rows to int64 before they would have to hold a value int32 cannot."""
        if (
            self.rows.dtype == np.int32
            and values.shape[0]
            and (int(values.max()) > _I32.max or int(values.min()) < _I32.min)
        ):
            self.rows = self.rows.astype(np.int64)

    def _live(self) -> npt.NDArray[np.bool_]:
        if self.newest is None:
            return np.zeros(self.slot_ticks.shape[0], np.bool_)
        return self.slot_ticks > self.newest - self.window

    def total(self) -> npt.NDArray[np.int64]:
        """Sum of the rows of the ticks in the window (int64, exact)."""
        live = self._live()
        rows = self.rows if live.all() else self.rows[live]
        out: npt.NDArray[np.int64] = rows.sum(axis=0, dtype=np.int64)
        return out

    @property
    def start_tick(self) -> int:
        ticks = self.slot_ticks[self._live()]
        return int(ticks.min()) if ticks.shape[0] else 0

    def to_state(self) -> list[Any]:
        """``[width, window, newest, slot_ticks, rows]``: the ring's own arrays, not copies.

        Serialise it (``orjson.OPT_SERIALIZE_NUMPY``) before the next :meth:`add`. Slots of
        expired ticks are cleared first (in place: they are dead data), so a window restored
        from this state saves the same bytes again."""
        self._clear_dead()
        return [self.width, self.window, self.newest, self.slot_ticks, self.rows]

    def _clear_dead(self) -> None:
        """Empty the slots that hold no tick of the window (expired or never used)."""
        dead = ~self._live()
        if dead.any():
            self.slot_ticks[dead] = _NO_TICK
            self.rows[dead] = 0

    @classmethod
    def from_state(cls, doc: Sequence[Any]) -> CountWindow:
        """Load :meth:`to_state`, the older ``[width, window, newest, [[tick, row], ...]]``
        layout, or a :class:`TickWindow` state of counts."""
        w = cls(int(doc[0]), int(doc[1]))
        w.newest = None if doc[2] is None else int(doc[2])
        if len(doc) == 5:
            if w.newest is not None and len(doc[3]):
                w.slot_ticks = np.array(doc[3], np.int64).reshape(-1)  # copies: never aliases
                w.rows = np.array(doc[4], np.int64).reshape(w.slot_ticks.shape[0], w.width)
                w._clear_dead()
                rows = w.rows
                if rows.size == 0 or (rows.max() <= _I32.max and rows.min() >= _I32.min):
                    w.rows = w.rows.astype(np.int32)
            return w
        if doc[3]:
            cap = max(1, min(w.window, _RING_START))
            while cap < min(w.window, len(doc[3])):
                cap *= 2
            cap = min(w.window, cap)
            w.slot_ticks = np.full(cap, _NO_TICK, np.int64)
            w.rows = np.zeros((cap, w.width), np.int32)
            newest = int(doc[2])
            for t, r in doc[3]:
                row = w._row(int(t), newest)
                values = np.rint(np.asarray(r, np.float64)).astype(np.int64)
                w._fit(values)
                w.rows[row] = values
        return w


_W = TypeVar("_W", TickWindow, CountWindow)


def _percentile_from_hist(counts: FloatArray, edges: FloatArray, q: float) -> float:
    n = counts.sum()
    if n <= 0:
        return math.nan
    target = q / 100.0 * n
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, target, side="left"))
    # upper edge of the bin holding the quantile (conservative); last bin is open-ended
    return float(edges[i]) if i < edges.shape[0] else float(edges[-1])


# --------------------------------------------------------------------------- per version


@dataclass
class VersionMonitor:
    """Detector state of one model version."""

    windows: dict[str, TickWindow | CountWindow] = field(default_factory=dict)
    seq_dets: dict[str, Any] = field(default_factory=dict)  # CUSUM / Bernoulli CUSUM
    warmup: dict[str, list[float]] = field(default_factory=dict)  # slice -> [n, errors]
    last_tick: int = 0
    prompts: dict[str, int] = field(default_factory=dict)  # prompt version -> last tick

    def to_state(self) -> dict[str, Any]:
        return {
            "windows": {k: w.to_state() for k, w in self.windows.items()},
            "seq": {k: d.to_state() for k, d in self.seq_dets.items()},
            "warmup": self.warmup,
            "last_tick": self.last_tick,
            "prompts": self.prompts,
        }

    @classmethod
    def from_state(cls, doc: Mapping[str, Any]) -> VersionMonitor:
        return cls(
            windows={k: _window_from_state(k, w) for k, w in doc["windows"].items()},
            seq_dets={k: load(s) for k, s in doc["seq"].items()},
            warmup={k: list(v) for k, v in doc["warmup"].items()},
            last_tick=int(doc["last_tick"]),
            prompts={str(k): int(v) for k, v in doc.get("prompts", {}).items()},
        )


_COUNT_WINDOWS: Final = ("psi:", "quality:", "latency")


def _window_from_state(key: str, doc: Sequence[Any]) -> TickWindow | CountWindow:
    """Count windows (PSI, data quality, latency) load as rings, the rest (calibration and
    cost, which sum floats) as :class:`TickWindow`; both share one state layout."""
    if key.startswith(_COUNT_WINDOWS):
        return CountWindow.from_state(doc)
    return TickWindow.from_state(doc)


class ModelMonitor:
    """Everything stage 2 keeps for one model."""

    def __init__(
        self,
        plan: ModelPlan,
        config_hash: str,
        tick_s: float,
        psi_cache: dict[PSISpec, PSI] | None = None,
    ) -> None:
        self.plan = plan
        self.model: ModelConfig = plan.model
        self.config_hash = config_hash
        self.tick_s = tick_s
        self.reference_id = plan.profile.id if plan.profile is not None else "none"
        self.versions: dict[str, VersionMonitor] = {}
        self.model_level = VersionMonitor()
        self.applied: dict[str, int] = {}
        self.policy = SignalPolicy(self.model)
        self.killswitch = KillSwitch(self.model)
        self.newest_tick: int | None = None
        self.duplicates = 0
        self.detector_errors: dict[str, str] = {}
        self.stale = 0  # tick data refused because it was older than a detector's window
        d = self.model.detectors
        prof = plan.profile
        # PSI engines (stateless) per numeric/categorical feature, score and labels; shared
        # through ``psi_cache`` by every model with the same spec (same profile columns)
        self.psi: dict[str, PSI] = {}
        cache: dict[PSISpec, PSI] = {} if psi_cache is None else psi_cache

        def shared(spec: PSISpec) -> PSI:
            engine = cache.get(spec)
            if engine is None:
                engine = cache[spec] = PSI(spec)
            return engine

        params = {
            "warn": d.psi_warn,
            "critical": d.psi_critical,
            "alpha": d.psi_alpha,
            "min_count": d.psi_min_count,
        }
        if prof is not None:
            for p in plan.numeric:
                if p.name in prof.numeric:
                    self.psi[p.name] = shared(prof.psi_spec(prof.numeric[p.name], **params))
            for c in plan.categorical:
                if c.name in prof.categorical:
                    self.psi[c.name] = shared(prof.psi_spec(prof.categorical[c.name], **params))
            for p in plan.llm:
                if p.name in prof.numeric and not p.name.startswith("llm.flags."):
                    self.psi[p.name] = shared(prof.psi_spec(prof.numeric[p.name], **params))
            if prof.score is not None:
                self.psi["@score"] = shared(prof.psi_spec(prof.score, **params))
            if prof.labels is not None:
                self.psi["@labels"] = shared(prof.psi_spec(prof.labels, **params))

    # ----------------------------------------------------------------- detectors

    def _cusum(self, name: str, mean: float, std: float) -> CUSUM | None:
        if not (std > 0 and math.isfinite(mean)):
            return None
        d = self.model.detectors
        return CUSUM(CUSUMSpec.from_reference(mean, std, arl0=d.cusum_arl0, k=d.cusum_k))

    def _version(self, version: str, tick: int) -> VersionMonitor:
        vm = self.versions.get(version)
        if vm is None:
            if len(self.versions) >= MAX_VERSIONS:
                oldest = min(self.versions, key=lambda v: self.versions[v].last_tick)
                del self.versions[oldest]
            vm = self.versions[version] = VersionMonitor()
        vm.last_tick = max(vm.last_tick, tick)
        return vm

    def _seq(self, vm: VersionMonitor, key: str, make: Any) -> Any:
        det = vm.seq_dets.get(key)
        if det is None:
            try:
                det = make()
            except (ValueError, ArithmeticError) as err:  # uncalibratable spec: skip, count
                self.detector_errors[key] = str(err)
                return None
            if det is not None:
                vm.seq_dets[key] = det
        return det

    # ----------------------------------------------------------------- apply + evaluate

    def apply(self, doc: Mapping[str, Any]) -> list[Finding] | None:
        """Apply one summary; None if it was already applied (duplicate)."""
        src = f"{doc['source']}:{doc['partition']}"
        seq = int(doc["seq"])
        if seq <= self.applied.get(src, 0):
            self.duplicates += 1
            return None
        self.applied[src] = seq
        tick = int(doc["tick"])
        if self.newest_tick is None or tick > self.newest_tick:
            self.newest_tick = tick
        findings: list[Finding] = []
        for g in doc["groups"]:
            vm = self._version(sys.intern(g["version"]), tick)
            findings += self._apply_group(vm, g, tick)
        findings += self._apply_labels(doc["labels"], tick)
        return findings

    @staticmethod
    def _window(vm: VersionMonitor, key: str, kind: type[_W], width: int, window: int) -> _W:
        """``vm``'s window ``key``, created on first use: a :class:`TickWindow` of float sums
        (calibration, cost) or a :class:`CountWindow` of counts (PSI bins, data quality,
        latency histogram)."""
        w = vm.windows.get(key)
        if w is None:
            w = vm.windows[key] = kind(width, window)
        assert isinstance(w, kind)
        return w

    def _span(self, w: TickWindow | CountWindow) -> tuple[float, float]:
        end = (w.newest + 1) * self.tick_s if w.newest is not None else 0.0
        return w.start_tick * self.tick_s, end

    def _psi_finding(  # noqa: PLR0917
        self,
        vm: VersionMonitor,
        key: str,
        psi: PSI,
        counts: Sequence[int],
        tick: int,
        kind: str,
        version: str,
        feature: str | None,
        slice_: str | None = None,
    ) -> Finding | None:
        w = self._window(
            vm, f"psi:{key}", CountWindow, psi.bins, self.model.detectors.psi_window_ticks
        )
        if not w.add(tick, counts):
            self.stale += 1
            return None
        r = psi.compute(w.total())
        if r.severity == "insufficient":
            return None
        start, end = self._span(w)
        threshold = r.critical_threshold if r.severity == "critical" else r.warn_threshold
        return Finding(
            kind,
            "psi",
            version,
            feature,
            slice_,
            r.severity,
            r.statistic,
            threshold,
            start,
            end,
            r.n,
            detail=Detail(_PSI_DETAIL, (r.p_value, r.n_effective)),
        )

    def _seq_findings(  # noqa: PLR0917
        self,
        dets: list[Detection],
        kind: str,
        detector: str,
        version: str,
        feature: str | None,
        slice_: str | None,
        severity: str,
        tick: int,
        n: int,
        message: str = "",
    ) -> list[Finding]:
        end = (tick + 1) * self.tick_s
        return [
            Finding(
                kind,
                detector,
                version,
                feature,
                slice_,
                severity,
                d.statistic,
                d.threshold,
                end - self.tick_s,
                end,
                n,
                sequential=True,
                detail={"direction": d.direction, "index": d.index, **dict(d.detail)},
                message=message,
            )
            for d in dets
        ]

    def _quality(  # noqa: PLR0917
        self,
        vm: VersionMonitor,
        name: str,
        f: Mapping[str, Any],
        tick: int,
        version: str,
        required: bool,
        ref_missing: float,
    ) -> list[Finding]:
        d = self.model.detectors
        numeric = f["type"] == "numeric"
        present = (
            f["n"] + f["nan"] + f["wrong_type"] if numeric else sum(f["counts"]) + f["wrong_type"]
        )
        total = present + f["missing"]
        nan = f["nan"] if numeric else 0
        oor = f.get("out_of_range", 0)
        bad_cat = f.get("not_allowed", 0)
        valid = f["n"] if numeric else present
        vec = [total, present, f["missing"] + nan, oor, bad_cat, f["wrong_type"], valid]
        w = self._window(vm, f"quality:{name}", CountWindow, len(vec), QUALITY_WINDOW_TICKS)
        if not w.add(tick, vec):
            self.stale += 1
            return []
        t = w.total().astype(np.float64)
        start, end = self._span(w)
        checks = [
            # detector, kind, violations, denominator, allowed rate
            (
                "missing",
                "schema" if required else "data_quality",
                t[2],
                t[0],
                ref_missing + d.quality_max_rate,
            ),
            ("wrong_type", "schema", t[5], t[0], d.quality_max_rate),
        ]
        if numeric:
            checks.append(("out_of_range", "data_quality", t[3], t[6], d.quality_max_rate))
        else:
            checks.append(("unknown_category", "data_quality", t[4], t[1], d.quality_max_rate))
        out: list[Finding] = []
        for det, kind, k, n, allowed_raw in checks:
            lb = wilson_lower(k, n, d.quality_z) if n >= d.quality_min_count else 0.0
            allowed = min(allowed_raw, 0.999)
            sev = "ok"
            if lb > allowed:
                sev = "critical" if lb > min(5 * allowed, 0.5) else "warn"
            rate = k / n if n else 0.0
            msg = ""
            if sev != "ok":
                what = {
                    "missing": "missing or NaN",
                    "wrong_type": "of the wrong type",
                    "out_of_range": "outside the contract range",
                    "unknown_category": "not an allowed category",
                }[det]
                msg = (
                    f"{kind.replace('_', ' ')} on {self.model.model_id} {version} feature "
                    f"{name!r}: {rate:.1%} of {int(n)} values are {what} "
                    f"(lower bound {lb:.1%} > allowed {allowed:.1%})"
                )
            out.append(
                Finding(
                    kind,
                    _QUALITY_DETECTOR[det],
                    version,
                    name,
                    None,
                    sev,
                    lb,
                    allowed,
                    start,
                    end,
                    int(n),
                    sustain=1,
                    detail=Detail(_QUALITY_DETAIL, (rate, int(k))),
                    message=msg,
                )
            )
        return out

    def _apply_group(self, vm: VersionMonitor, g: Mapping[str, Any], tick: int) -> list[Finding]:
        out: list[Finding] = []
        version = g["version"]
        slice_key = g["slice"]
        prof = self.plan.profile
        sl = None if slice_key == "*" else slice_key
        if "features" in g:
            for p in self.plan.numeric:
                f = g["features"][p.name]
                ref = prof.numeric.get(p.name) if prof else None
                out += self._quality(
                    vm, p.name, f, tick, version, p.required, ref.missing_rate if ref else 0.0
                )
                if p.name in self.psi and f["n"]:
                    fd = self._psi_finding(
                        vm,
                        p.name,
                        self.psi[p.name],
                        f["counts"],
                        tick,
                        "covariate_drift",
                        version,
                        p.name,
                    )
                    if fd:
                        out.append(fd)
                if ref is not None and f["n"]:
                    det = self._seq(
                        vm, f"cusum:{p.name}", lambda r=ref: self._cusum("", r.mean, r.std)
                    )
                    if det is not None:
                        dets = det.update(f["n"], f["sum"], f["sumsq"])
                        out += self._seq_findings(
                            dets,
                            "covariate_drift",
                            "cusum",
                            version,
                            p.name,
                            None,
                            "warn",
                            tick,
                            det.n_seen,
                        )
            for c in self.plan.categorical:
                f = g["features"][c.name]
                cref = prof.categorical.get(c.name) if prof else None
                out += self._quality(
                    vm, c.name, f, tick, version, c.required, cref.missing_rate if cref else 0.0
                )
                if c.name in self.psi and sum(f["counts"]):
                    fd = self._psi_finding(
                        vm,
                        c.name,
                        self.psi[c.name],
                        f["counts"],
                        tick,
                        "covariate_drift",
                        version,
                        c.name,
                    )
                    if fd:
                        out.append(fd)
            out += self._budgets(vm, g, tick, version)
            prompts = g.get("llm", {}).get("prompts")
            if prompts and self.plan.llm:
                out += self._llm(vm, prompts, tick, version)
            sc = g["score"]
            if "@score" in self.psi and sc["n"]:
                fd = self._psi_finding(
                    vm,
                    "@score",
                    self.psi["@score"],
                    sc["counts"],
                    tick,
                    "prediction_drift",
                    version,
                    None,
                )
                if fd:
                    out.append(fd)
            if prof is not None and prof.score is not None and sc["n"]:
                s = prof.score
                det = self._seq(vm, "cusum:@score", lambda: self._cusum("", s.mean, s.std))
                if det is not None:
                    dets = det.update(sc["n"], sc["sum"], sc["sumsq"])
                    out += self._seq_findings(
                        dets,
                        "prediction_drift",
                        "cusum",
                        version,
                        None,
                        None,
                        "warn",
                        tick,
                        det.n_seen,
                    )
        j = g["joined"]
        if j["n"]:
            out += self._concept(vm, slice_key, sl, j, tick, version)
            out += self._calibration(vm, slice_key, sl, j, tick, version)
        return out

    def _llm(
        self, vm: VersionMonitor, prompts: Mapping[str, Any], tick: int, version: str
    ) -> list[Finding]:
        """LLM signals per prompt version (see the module doc)."""
        out: list[Finding] = []
        prof = self.plan.profile
        for pv, pdoc in sorted(prompts.items()):
            self._touch_prompt(vm, pv, tick)
            sl = f"prompt_version={pv}"
            for p in self.plan.llm:
                f = pdoc["signals"].get(p.name)
                ref = prof.numeric.get(p.name) if prof is not None else None
                if f is None or not f["n"] or ref is None:
                    continue
                key = f"{p.name}@{pv}"
                if p.name.startswith("llm.flags."):
                    out += self._flag_rate(vm, key, p.name, sl, ref.mean, f, tick, version)
                    continue
                kind = "covariate_drift" if p.name != "llm.output_tokens" else "prediction_drift"
                if p.name in self.psi:
                    fd = self._psi_finding(
                        vm, key, self.psi[p.name], f["counts"], tick, kind, version, p.name, sl
                    )
                    if fd:
                        out.append(fd)
                det = self._seq(vm, f"cusum:{key}", lambda r=ref: self._cusum("", r.mean, r.std))
                if det is not None:
                    dets = det.update(f["n"], f["sum"], f["sumsq"])
                    out += self._seq_findings(
                        dets, kind, "cusum", version, p.name, sl, "warn", tick, det.n_seen
                    )
        return out

    def _flag_rate(  # noqa: PLR0917
        self,
        vm: VersionMonitor,
        key: str,
        name: str,
        sl: str,
        ref_rate: float,
        f: Mapping[str, Any],
        tick: int,
        version: str,
    ) -> list[Finding]:
        d = self.model.detectors
        p0 = min(max(ref_rate, 0.001), 0.45)
        p1 = min(p0 * d.concept_shift, (1 + p0) / 2)
        det = self._seq(
            vm,
            f"flag:{key}",
            lambda: BernoulliCUSUM(BernoulliCUSUMSpec(p0=p0, p1=p1, arl0=d.concept_arl0)),
        )
        if det is None:
            return []
        dets = det.update(f["n"], f["sum"])
        return self._seq_findings(
            dets,
            "prediction_drift",
            "bernoulli_cusum",
            version,
            name,
            sl,
            "warn",
            tick,
            det.n_seen,
            message=(
                f"prediction drift on {self.model.model_id} {version} {sl}: the rate of "
                f"{name} rose above {p0:.2%} (tuned to catch {p1:.2%})"
            ),
        )

    def _touch_prompt(self, vm: VersionMonitor, pv: str, tick: int) -> None:
        """Track prompt versions per model version; evict the least recent beyond 8."""
        if pv not in vm.prompts and len(vm.prompts) >= MAX_PROMPTS:
            old = min(vm.prompts, key=lambda k: vm.prompts[k])
            del vm.prompts[old]
            suffix = f"@{old}"
            for d in (vm.windows, vm.seq_dets):
                for k in [k for k in d if k.endswith(suffix)]:
                    del d[k]
        vm.prompts[pv] = max(vm.prompts.get(pv, tick), tick)

    def _concept(  # noqa: PLR0917
        self,
        vm: VersionMonitor,
        slice_key: str,
        sl: str | None,
        j: Mapping[str, Any],
        tick: int,
        version: str,
    ) -> list[Finding]:
        if self.model.task == "regression":
            return []
        d = self.model.detectors
        key = f"concept:{slice_key}"
        det = vm.seq_dets.get(key)
        if det is None:
            p0 = self.plan.profile.error_rate if self.plan.profile is not None else None
            if p0 is None:  # learn the in-control rate from the first pairs of this version
                wu = vm.warmup.setdefault(slice_key, [0.0, 0.0])
                wu[0] += j["n"]
                wu[1] += j["errors"]
                if wu[0] < d.concept_warmup_pairs:
                    return []
                p0 = wu[1] / wu[0]
            p0 = min(max(p0, 0.005), 0.45)
            p1 = min(p0 * d.concept_shift, (1 + p0) / 2)
            spec_p = (p0, p1)
            det = self._seq(
                vm,
                key,
                lambda: BernoulliCUSUM(
                    BernoulliCUSUMSpec(p0=spec_p[0], p1=spec_p[1], arl0=d.concept_arl0)
                ),
            )
            if det is None:
                return []
            if self.plan.profile is None or self.plan.profile.error_rate is None:
                return []
        dets = det.update(j["n"], j["errors"])
        where = f" slice {sl!r}" if sl else ""
        return self._seq_findings(
            dets,
            "concept_drift",
            "bernoulli_cusum",
            version,
            None,
            sl,
            "critical",
            tick,
            det.n_seen,
            message=(
                f"concept drift on {self.model.model_id} {version}{where}: error rate on joined "
                f"labels rose above {det.spec.p0:.1%} (tuned to catch {det.p1:.1%})"
            ),
        )

    def _calibration(  # noqa: PLR0917
        self,
        vm: VersionMonitor,
        slice_key: str,
        sl: str | None,
        j: Mapping[str, Any],
        tick: int,
        version: str,
    ) -> list[Finding]:
        d = self.model.detectors
        vec = [*j["calib_n"], *j["calib_pos"], *j["calib_score"]]
        w = self._window(vm, f"calib:{slice_key}", TickWindow, 3 * CALIB_BINS, d.psi_window_ticks)
        if not w.add(tick, vec):
            self.stale += 1
            return []
        t = w.total()
        n, pos, ssum = t[:CALIB_BINS], t[CALIB_BINS : 2 * CALIB_BINS], t[2 * CALIB_BINS :]
        total = n.sum()
        if total < d.calibration_min_count:
            return []
        mask = n > 0
        gap = float(np.sum(np.abs(pos[mask] - ssum[mask])) / total)
        sev = "warn" if gap > d.calibration_max_gap else "ok"
        start, end = self._span(w)
        return [
            Finding(
                "performance",
                "calibration",
                version,
                None,
                sl,
                sev,
                gap,
                d.calibration_max_gap,
                start,
                end,
                int(total),
            )
        ]

    def _budgets(
        self, vm: VersionMonitor, g: Mapping[str, Any], tick: int, version: str
    ) -> list[Finding]:
        b = self.model.budgets
        out: list[Finding] = []
        if b.cost_usd_per_1k is not None and g["cost"]["n"]:
            w = self._window(vm, "cost", TickWindow, 2, b.window_ticks)
            w.add(tick, [g["cost"]["n"], g["cost"]["sum"]])
            n, total = w.total()
            if n >= b.min_count:
                per_1k = 1000.0 * total / n
                sev = "ok"
                if per_1k > b.cost_usd_per_1k:
                    sev = "critical" if per_1k > 2 * b.cost_usd_per_1k else "warn"
                start, end = self._span(w)
                out.append(
                    Finding(
                        "cost",
                        "cost_per_1k",
                        version,
                        None,
                        None,
                        sev,
                        per_1k,
                        b.cost_usd_per_1k,
                        start,
                        end,
                        int(n),
                        message=(
                            f"cost on {self.model.model_id} {version}: ${per_1k:.3f} per 1k "
                            f"requests over {int(n)} requests, budget ${b.cost_usd_per_1k:.3f}"
                        )
                        if sev != "ok"
                        else "",
                    )
                )
        lat = g["latency"]
        if b.latency_ms is not None and lat["n"]:
            lw = self._window(vm, "latency", CountWindow, len(lat["counts"]), b.window_ticks)
            lw.add(tick, lat["counts"])
            counts = lw.total().astype(np.float64)
            n = int(counts.sum())
            if n >= b.min_count:
                p = _percentile_from_hist(counts, LATENCY_EDGES_MS, b.latency_percentile)
                sev = "warn" if p > b.latency_ms else "ok"
                start, end = self._span(lw)
                out.append(
                    Finding(
                        "performance",
                        f"latency_p{b.latency_percentile:g}",
                        version,
                        None,
                        None,
                        sev,
                        p,
                        b.latency_ms,
                        start,
                        end,
                        n,
                    )
                )
        return out

    def _apply_labels(self, lab: Mapping[str, Any], tick: int) -> list[Finding]:
        if not lab["n"]:
            return []
        out: list[Finding] = []
        vm = self.model_level
        if "@labels" in self.psi:
            fd = self._psi_finding(
                vm, "@labels", self.psi["@labels"], lab["counts"], tick, "label_drift", "*", None
            )
            if fd:
                out.append(fd)
        prof = self.plan.profile
        pr = prof.positive_rate if prof is not None else None
        if pr is not None and 0.0 < pr < 1.0:
            d = self.model.detectors
            det = self._seq(
                vm,
                "label_rate",
                lambda: BernoulliCUSUM(
                    BernoulliCUSUMSpec(
                        p0=min(max(pr, 0.001), 0.999),
                        p1=(
                            min(pr * d.concept_shift, (1 + pr) / 2)
                            if pr < 0.5
                            else pr / d.concept_shift
                        ),
                        arl0=d.concept_arl0,
                    )
                ),
            )
            if det is None:
                return out
            dets = det.update(lab["n"], lab["positives"])
            out += self._seq_findings(
                dets, "label_drift", "bernoulli_cusum", "*", None, None, "warn", tick, det.n_seen
            )
        return out

    # ----------------------------------------------------------------- state

    def to_state(self) -> dict[str, Any]:
        """The model's state; count windows contribute their ring arrays (not copies), so
        serialise it with ``orjson.OPT_SERIALIZE_NUMPY`` before the next :meth:`apply`."""
        return {
            "versions": {v: vm.to_state() for v, vm in self.versions.items()},
            "model_level": self.model_level.to_state(),
            "applied": self.applied,
            "policy": self.policy.to_state(),
            "killswitch": self.killswitch.to_state(),
            "newest_tick": self.newest_tick,
            "duplicates": self.duplicates,
            "stale": self.stale,
        }

    def load(self, doc: Mapping[str, Any]) -> None:
        self.versions = {v: VersionMonitor.from_state(s) for v, s in doc["versions"].items()}
        self.model_level = VersionMonitor.from_state(doc["model_level"])
        self.applied = {k: int(v) for k, v in doc["applied"].items()}
        self.policy.load(doc["policy"])
        self.killswitch.load(doc["killswitch"])
        self.newest_tick = doc["newest_tick"]
        self.duplicates = int(doc["duplicates"])
        self.stale = int(doc.get("stale", 0))


# --------------------------------------------------------------------------- stage 2


@dataclass
class DetectOutput:
    """What one stage-2 batch produced."""

    messages: list[OutMessage] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    findings: list[tuple[str, Finding]] = field(default_factory=list)  # (model_id, finding)
    killswitch: dict[str, bytes] = field(default_factory=dict)
    next_offset: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0
    invalid: int = 0
    # models whose detector state this batch changed (applied summaries, manual requests):
    # the sequential detectors' gauges need re-reading for these only
    models: set[str] = field(default_factory=set)


class Detect:
    """Stage 2 for one summaries partition."""

    def __init__(
        self,
        config: MonitorConfig,
        plans: Mapping[str, ModelPlan],
        partition: int,
        *,
        topics: Topics | None = None,
        tick_s: float = 1.0,
    ) -> None:
        self.config = config
        self.plans = plans
        self.partition = partition
        self.topics = topics or Topics()
        self.tick_s = tick_s
        self.models: dict[str, ModelMonitor] = {}
        self.next_offset: dict[str, int] = {}
        self._psi_cache: dict[PSISpec, PSI] = {}  # stateless PSI engines shared by models

    def _monitor(self, model_id: str) -> ModelMonitor | None:
        mon = self.models.get(model_id)
        if mon is None:
            plan = self.plans.get(model_id)
            if plan is None:
                return None
            mon = self.models[model_id] = ModelMonitor(
                plan, self.config.config_hash, self.tick_s, self._psi_cache
            )
        return mon

    def process_raw(self, values: Iterable[tuple[int, bytes]]) -> DetectOutput:
        """Apply summary messages given as ``(offset, value bytes)`` in partition order.

        Each summary is decoded, applied and dropped before the next one is decoded: a batch
        of thousands of decoded summaries (~10x their JSON size as Python objects) would
        otherwise be a memory peak whose freed arenas stay pinned by the state it created.
        ``invalid`` counts the values that are not JSON (a summary of an unknown model is
        skipped without counting, as before).
        """
        items = values if isinstance(values, Sequence) else list(values)
        topic = self.topics.summaries
        for offset, _raw in items:
            self.next_offset[topic] = max(self.next_offset.get(topic, 0), offset + 1)
        out = DetectOutput(next_offset=dict(self.next_offset))
        invalid = 0
        for _offset, raw in items:
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                invalid += 1
                continue
            self._apply(doc, out)
        out.invalid = invalid
        return out

    def process(self, summaries: Sequence[Mapping[str, Any]]) -> DetectOutput:
        """Apply decoded summaries in order; return alerts, commands and state changes."""
        out = DetectOutput(next_offset=dict(self.next_offset))
        for doc in summaries:
            self._apply(doc, out)
        return out

    def _apply(self, doc: Mapping[str, Any], out: DetectOutput) -> None:
        mon = self._monitor(str(doc.get("model_id")))
        if mon is None:
            out.invalid += 1
            return
        findings = mon.apply(doc)
        if findings is None:
            out.duplicates += 1
            return
        out.applied += 1
        now = (int(mon.newest_tick or 0) + 1) * self.tick_s
        mid = mon.model.model_id
        out.models.add(mid)
        out.findings.extend((mid, f) for f in findings)
        for f in findings:
            seq = mon.policy.evaluate(f, now)
            if seq is None:
                continue
            alert = build_alert(
                mon.model,
                f,
                seq,
                detected_at=now,
                reference_id=mon.reference_id,
                config_hash=mon.config_hash,
            )
            out.alerts.append(alert)
            out.messages.append(self._msg(alert["alert_id"], self.topics.alerts, alert))
            cmd = mon.killswitch.on_alert(alert, now)
            if cmd is not None:
                self._command(out, mon, cmd)

    def _msg(self, mid: str, topic: str, doc: Mapping[str, Any]) -> OutMessage:
        return OutMessage(mid, topic, str(doc["model_id"]).encode(), orjson.dumps(doc))

    def _command(self, out: DetectOutput, mon: ModelMonitor, cmd: dict[str, Any]) -> None:
        out.commands.append(cmd)
        out.messages.append(self._msg(cmd["command_id"], self.topics.control, cmd))
        out.killswitch[mon.model.model_id] = orjson.dumps(mon.killswitch.to_state())

    def manual(
        self,
        model_id: str,
        action: str,
        now: float,
        *,
        target_version: str | None = None,
        reason: str = "",
    ) -> DetectOutput:
        """Manual kill-switch trip or release; commit the output like any batch."""
        mon = self._monitor(model_id)
        if mon is None:
            valid = ", ".join(sorted(self.plans))
            raise ValueError(f"model_id: {model_id!r} is not configured; valid values: {valid}")
        out = DetectOutput(next_offset=dict(self.next_offset))
        out.models.add(mon.model.model_id)
        cmd = mon.killswitch.manual(action, now, target_version=target_version, reason=reason)
        self._command(out, mon, cmd)
        return out

    def snapshot(self) -> bytes:
        """The partition's state as JSON: one model's state is encoded at a time and the
        pieces joined (the same bytes as one ``orjson.dumps`` of the whole document, without
        holding the whole document as Python objects)."""
        head = orjson.dumps(
            {
                "schema": STATE_SCHEMA,
                "kind": "detect",
                "partition": self.partition,
                "next_offset": self.next_offset,
            }
        )
        parts = [head[:-1], b',"models":{']
        for i, (m, mon) in enumerate(sorted(self.models.items())):
            if i:
                parts.append(b",")
            parts.append(orjson.dumps(m))
            parts.append(b":")
            parts.append(orjson.dumps(mon.to_state(), option=orjson.OPT_SERIALIZE_NUMPY))
        parts.append(b"}}")
        return b"".join(parts)

    def restore(self, state: bytes | None) -> None:
        if state is None:
            return
        doc = orjson.loads(state)
        if doc.get("schema") not in READABLE_SCHEMAS or doc.get("kind") != "detect":
            raise ValueError(
                f"state: expected detect schema {sorted(READABLE_SCHEMAS)}, got "
                f"{doc.get('kind')!r} schema {doc.get('schema')!r}"
            )
        self.next_offset = dict(doc["next_offset"])
        self.models = {}
        for m, s in doc["models"].items():
            mon = self._monitor(m)
            if mon is not None:
                mon.load(s)
