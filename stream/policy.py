"""Alert policy and kill switch: findings in, alerts and control commands out (pure).

A *finding* is one evaluation of one signal (model, version, detector, subject) — a windowed
test (PSI, data quality, cost, latency, calibration) reports a severity every evaluation; a
sequential detector (CUSUM, Bernoulli CUSUM) reports only when it fires.

Policy per signal:

* **sustain** — a windowed signal must breach on ``sustain`` consecutive evaluations before it
  alerts (data-quality and schema signals use 1: a contract break alerts at once; their
  Wilson lower bound already demands evidence). A sequential detection alerts at once (the
  detector integrates the evidence itself).
* **dedupe** — while a signal is active it does not alert again, unless its severity
  escalates (warn → critical).
* **hysteresis** — an active signal clears only after ``clear_after`` consecutive evaluations
  with ``statistic < threshold * (1 - hysteresis)``.
* **cooldown** — after an alert the same signal stays silent for ``cooldown_s`` (event time)
  even if it cleared and breached again (escalation excepted). Sequential detections of the
  same signal within the cooldown are dropped.

``alert_id = <model>:<version>:<detector>:<subject>:<n>`` where ``n`` counts the signal's
alerts: deterministic for the same input.

Kill switch per model: each alert is matched against the model's rules (kinds, minimum
severity, optional detector/feature/slice); a rule trips when ``count`` matching alerts fall
within ``sustain_s`` (0 = any time), the switch is not already active and the rule is out of
its cooldown. Tripping emits a control command (``command_id =
<model>:killswitch:<rule>:<n>``) and marks the switch active; :meth:`KillSwitch.manual` trips or
releases it by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from stream.config import KillSwitchRule, ModelConfig, PolicySettings

SEVERITY_RANK: Final = {"ok": 0, "warn": 1, "critical": 2}

RUNBOOKS: Final = {
    "covariate_drift": "Compare the feature's live histogram with the reference profile; check "
    "upstream pipeline releases and traffic mix; retrain or re-baseline if the shift is real.",
    "prediction_drift": "The score distribution moved: check input drift alerts first, then the "
    "model version and its deployment; compare versions side by side.",
    "label_drift": "Outcome rates changed: confirm with the business owner whether the world "
    "changed; re-evaluate thresholds and calibration on recent labels.",
    "concept_drift": "Error rate rose on joined labels: inspect the slice, compare with the "
    "previous version, roll back or fall back if the kill-switch rule says so.",
    "data_quality": "A data contract is broken (range, missing values, categories): find the "
    "upstream change (unit or scale change?), fix or block it; the model is reading bad inputs.",
    "schema": "Events do not match the feature contract (wrong types / required fields "
    "missing): check the producer's recent deploy and the schema version.",
    "performance": "Latency or calibration is outside its budget: check the serving stack, the "
    "version's resources, and recent model changes.",
    "cost": "Cost per 1k requests is over budget for this version: compare with the previous "
    "version, check token usage / instance type, consider rollback or throttle.",
}


class Detail(Mapping[str, Any]):
    """A finding's ``detail``: a read-only mapping kept as (keys, values) tuples.

    A stage-2 batch holds one finding per signal evaluated (tens per summary, so hundreds of
    thousands in a large batch); with the keys tuple shared this costs ~90 bytes where a
    two-entry dict costs ~270. It compares equal to, and prints like, the dict it stands for.

    >>> d = Detail(("rate", "violations"), (0.25, 3))
    >>> d["rate"], d == {"rate": 0.25, "violations": 3}, d
    (0.25, True, {'rate': 0.25, 'violations': 3})
    """

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: tuple[str, ...], values: tuple[Any, ...]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"values: expected {len(keys)} (one per key), got {len(values)}")
        self._keys = keys
        self._values = values

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[self._keys.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return repr(dict(zip(self._keys, self._values, strict=True)))


@dataclass(frozen=True, slots=True)
class Finding:
    """One evaluation of one signal (slotted: a stage-2 batch creates one per signal evaluated)."""

    kind: str
    detector: str
    version: str
    feature: str | None
    slice: str | None
    severity: str  # ok | warn | critical
    statistic: float
    threshold: float
    window_start: float
    window_end: float
    n: int
    sequential: bool = False
    sustain: int | None = None  # override of the model's policy.sustain
    detail: Mapping[str, Any] | None = None
    message: str = ""

    @property
    def subject(self) -> str:
        """``feature``, ``slice``, ``feature@slice`` when both are set (LLM signals per
        prompt version), else ``-``."""
        if self.feature and self.slice:
            return f"{self.feature}@{self.slice}"
        return self.feature or self.slice or "-"

    def key(self, model_id: str) -> str:
        return f"{model_id}:{self.version}:{self.detector}:{self.subject}"


class SignalPolicy:
    """Sustain / dedupe / hysteresis / cooldown for all signals of one model."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.settings: PolicySettings = model.policy
        # key -> [streak, active_rank, clear_streak, cooldown_until, n_alerts]
        self.state: dict[str, list[float]] = {}

    def evaluate(self, f: Finding, now: float) -> int | None:
        """Return the alert sequence number if ``f`` must alert now, else None."""
        key = f.key(self.model.model_id)
        st = self.state.get(key)
        if st is None:
            st = self.state[key] = [0, 0, 0, float("-inf"), 0]
        s = self.settings
        rank = SEVERITY_RANK[f.severity]
        if f.sequential:
            if rank == 0 or now < st[3]:
                return None
            return self._fire(st, rank, now)
        if rank > 0:
            st[0] += 1
            st[2] = 0
            sustain = f.sustain if f.sustain is not None else s.sustain
            if st[0] < sustain:
                return None
            escalation = st[1] > 0 and rank > st[1]
            if st[1] > 0 and not escalation:
                return None
            if now < st[3] and not escalation:
                return None
            return self._fire(st, rank, now)
        st[0] = 0
        if st[1] > 0:
            if f.statistic < f.threshold * (1.0 - s.hysteresis):
                st[2] += 1
                if st[2] >= s.clear_after:
                    st[1] = 0
                    st[2] = 0
            else:
                st[2] = 0
        return None

    def _fire(self, st: list[float], rank: int, now: float) -> int:
        st[1] = max(st[1], rank)
        st[3] = now + self.settings.cooldown_s
        st[4] += 1
        return int(st[4])

    def to_state(self) -> dict[str, list[float | None]]:
        return {k: [None if v == float("-inf") else v for v in st] for k, st in self.state.items()}

    def load(self, doc: Mapping[str, list[float | None]]) -> None:
        """Load :meth:`to_state`; counters come back as ints (as a fresh state holds them), so
        a restored state serialises to the same bytes as the state it was saved from."""
        self.state = {k: _load_signal(st) for k, st in doc.items()}


def _load_signal(st: list[float | None]) -> list[float]:
    """``[streak, active_rank, clear_streak, cooldown_until, n_alerts]`` from its state."""
    streak, rank, clear, until, n = st
    return [
        int(streak or 0),
        int(rank or 0),
        int(clear or 0),
        float("-inf") if until is None else float(until),
        int(n or 0),
    ]


def build_alert(
    model: ModelConfig,
    f: Finding,
    seq: int,
    *,
    detected_at: float,
    reference_id: str,
    config_hash: str,
) -> dict[str, Any]:
    """The alert document (``alert.schema.json``)."""
    where = f" feature {f.feature!r}" if f.feature else ""
    where += f" slice {f.slice!r}" if f.slice else ""
    message = f.message or (
        f"{f.kind.replace('_', ' ')} on {model.model_id} {f.version}{where}: {f.detector} "
        f"statistic {f.statistic:.4g} vs threshold {f.threshold:.4g} over {f.n} events"
    )
    return {
        "alert_id": f"{f.key(model.model_id)}:{seq}",
        "model_id": model.model_id,
        "model_version": f.version,
        "kind": f.kind,
        "detector": f.detector,
        "feature": f.feature,
        "slice": f.slice,
        "severity": f.severity,
        "statistic": _num(f.statistic),
        "threshold": _num(f.threshold),
        "window": {"start": float(f.window_start), "end": float(f.window_end), "n": int(f.n)},
        "reference_id": reference_id,
        "config_hash": config_hash,
        "detected_at": detected_at,
        "message": message,
        "runbook": RUNBOOKS[f.kind],
        "detail": {
            k: _num(v) if isinstance(v, float | int) else v for k, v in (f.detail or {}).items()
        },
    }


def _num(v: float) -> float:
    """JSON-safe float (the alert schema wants numbers; non-finite becomes a large sentinel)."""
    x = float(v)
    if math.isfinite(x):
        return x
    return 1e308 if x > 0 else (-1e308 if x < 0 else 0.0)


# --------------------------------------------------------------------------- kill switch


class KillSwitch:
    """Kill-switch state and rule evaluation for one model."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.active = False
        self.action: str | None = None
        self.target_version: str | None = None
        self.rule: str | None = None
        self.command_id: str | None = None
        self.since: float | None = None
        self.trips = 0
        self.releases = 0
        self.matches: dict[str, list[tuple[float, str]]] = {}
        self.cooldown_until: dict[str, float] = {}

    def _matches(self, rule: KillSwitchRule, alert: Mapping[str, Any]) -> bool:
        if alert["kind"] not in rule.kinds:
            return False
        if SEVERITY_RANK[alert["severity"]] < SEVERITY_RANK[rule.min_severity]:
            return False
        if rule.detector is not None and alert["detector"] != rule.detector:
            return False
        if rule.feature is not None and alert.get("feature") != rule.feature:
            return False
        return rule.slice is None or alert.get("slice") == rule.slice

    def on_alert(self, alert: Mapping[str, Any], now: float) -> dict[str, Any] | None:
        """Feed one alert; return a control command if a rule trips."""
        for rule in self.model.kill_switch:
            if not self._matches(rule, alert):
                continue
            hits = self.matches.setdefault(rule.name, [])
            hits.append((now, str(alert["alert_id"])))
            if rule.sustain_s > 0:
                hits[:] = [h for h in hits if h[0] >= now - rule.sustain_s]
            del hits[: max(0, len(hits) - rule.count)]
            if self.active or len(hits) < rule.count:
                continue
            if now < self.cooldown_until.get(rule.name, float("-inf")):
                continue
            self.cooldown_until[rule.name] = now + rule.cooldown_s
            reasons = [h[1] for h in hits]
            hits.clear()
            return self._trip(
                rule.action, rule.target_version, rule.name, reasons, "automatic", now
            )
        return None

    def _trip(  # noqa: PLR0917
        self,
        action: str,
        target: str | None,
        rule: str | None,
        reasons: list[str],
        mode: str,
        now: float,
        reason: str = "",
    ) -> dict[str, Any]:
        self.trips += 1
        cid = f"{self.model.model_id}:killswitch:{rule or 'manual'}:{self.trips}"
        self.active = True
        self.action = action
        self.target_version = target
        self.rule = rule
        self.command_id = cid
        self.since = now
        return {
            "command_id": cid,
            "model_id": self.model.model_id,
            "action": action,
            "target_version": target,
            "rule": rule,
            "reason_alert_ids": reasons,
            "reason": reason or f"rule {rule!r} matched {len(reasons)} alert(s)",
            "mode": mode,
            "issued_at": now,
            "expires_at": None,
        }

    def manual(
        self,
        action: str,
        now: float,
        *,
        target_version: str | None = None,
        reason: str = "",
    ) -> dict[str, Any]:
        """Trip (rollback | fallback | throttle) or ``release`` the switch by hand."""
        valid = ("rollback", "fallback", "throttle", "release")
        if action not in valid:
            raise ValueError(f"action: {action!r} is not valid; valid values: {', '.join(valid)}")
        if action != "release":
            return self._trip(action, target_version, None, [], "manual", now, reason or "manual")
        self.releases += 1
        cid = f"{self.model.model_id}:killswitch:release:{self.releases}"
        self.active = False
        self.action = None
        self.target_version = None
        self.rule = None
        self.command_id = cid
        self.since = now
        return {
            "command_id": cid,
            "model_id": self.model.model_id,
            "action": "release",
            "target_version": None,
            "rule": None,
            "reason_alert_ids": [],
            "reason": reason or "manual release",
            "mode": "manual",
            "issued_at": now,
            "expires_at": None,
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "action": self.action,
            "target_version": self.target_version,
            "rule": self.rule,
            "command_id": self.command_id,
            "since": self.since,
            "trips": self.trips,
            "releases": self.releases,
            "matches": {k: [list(h) for h in v] for k, v in self.matches.items()},
            "cooldown_until": self.cooldown_until,
        }

    def load(self, doc: Mapping[str, Any]) -> None:
        self.active = bool(doc["active"])
        self.action = doc["action"]
        self.target_version = doc["target_version"]
        self.rule = doc["rule"]
        self.command_id = doc["command_id"]
        self.since = doc["since"]
        self.trips = int(doc["trips"])
        self.releases = int(doc["releases"])
        self.matches = {k: [(float(t), str(a)) for t, a in v] for k, v in doc["matches"].items()}
        self.cooldown_until = {k: float(v) for k, v in doc["cooldown_until"].items()}
