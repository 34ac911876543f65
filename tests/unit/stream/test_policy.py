"""Policy: sustain, dedupe, hysteresis, cooldown; kill-switch rules and manual operations."""

from __future__ import annotations

from typing import Any

import pytest

from stream.config import load_config_text
from stream.policy import Finding, KillSwitch, SignalPolicy, build_alert

CFG = load_config_text(
    """
models:
  m:
    features: {x: {type: numeric}}
    policy: {sustain: 3, cooldown_s: 100, hysteresis: 0.2, clear_after: 2}
    kill_switch:
      - {name: concept, when: {kind: concept_drift, severity: critical, slice: region=eu},
         action: rollback, target_version: v1, count: 2, sustain: 60, cooldown: 500}
      - {name: cost, when: {kind: cost, severity: warn}, action: throttle}
"""
)
MODEL = CFG.models["m"]


def f(sev: str, stat: float = 0.3, thr: float = 0.25, *, seq: bool = False, **kw: Any) -> Finding:
    base: dict[str, Any] = dict(
        kind="covariate_drift",
        detector="psi",
        version="v2",
        feature="x",
        slice=None,
        severity=sev,
        statistic=stat,
        threshold=thr,
        window_start=0.0,
        window_end=1.0,
        n=500,
        sequential=seq,
    )
    base.update(kw)
    return Finding(**base)


def fire(policy: SignalPolicy, seq: list[tuple[str, float]], t0: float = 0.0) -> list[int | None]:
    return [policy.evaluate(f(s, stat), t0 + i) for i, (s, stat) in enumerate(seq)]


def test_sustain_needs_consecutive_breaches() -> None:
    p = SignalPolicy(MODEL)
    got = fire(
        p, [("warn", 0.3), ("warn", 0.3), ("ok", 0.1), ("warn", 0.3), ("warn", 0.3), ("warn", 0.3)]
    )
    assert got == [None, None, None, None, None, 1]


def test_dedupe_while_active_but_escalation_alerts() -> None:
    p = SignalPolicy(MODEL)
    got = fire(p, [("warn", 0.3)] * 5 + [("critical", 0.5)] + [("critical", 0.5)] * 3)
    assert got == [None, None, 1, None, None, 2, None, None, None]


def test_hysteresis_then_cooldown_then_realert() -> None:
    p = SignalPolicy(MODEL)
    assert fire(p, [("warn", 0.3)] * 3) == [None, None, 1]
    # below threshold but inside the hysteresis band (0.25 * 0.8 = 0.2): stays active
    assert fire(p, [("ok", 0.22)] * 4, t0=3) == [None] * 4
    assert fire(p, [("warn", 0.3)] * 3, t0=7) == [None] * 3  # still active: deduped
    # clears after 2 evaluations under 0.2, then breaches again but within the cooldown
    assert fire(p, [("ok", 0.1), ("ok", 0.1)], t0=10) == [None, None]
    assert fire(p, [("warn", 0.3)] * 3, t0=12) == [None, None, None]
    # after the cooldown (100 s after the first alert at t=2) it alerts again
    p2_state = dict(p.state)
    assert fire(p, [("ok", 0.1)] * 2 + [("warn", 0.3)] * 3, t0=200) == [None, None, None, None, 2]
    assert p2_state  # state is per signal key


def test_sequential_detections_alert_at_once_respecting_cooldown() -> None:
    p = SignalPolicy(MODEL)

    def s(t: float) -> int | None:
        return p.evaluate(f("critical", 15.0, 11.0, seq=True, detector="cusum"), t)

    assert [s(0.0), s(50.0), s(101.0)] == [1, None, 2]


def test_signals_are_independent_and_ids_deterministic() -> None:
    p = SignalPolicy(MODEL)
    a = [p.evaluate(f("warn", feature="x"), t) for t in range(3)]
    b = [p.evaluate(f("warn", feature="y"), t) for t in range(3)]
    assert a[-1] == 1 and b[-1] == 1
    alert = build_alert(
        MODEL,
        f("warn", feature="y"),
        1,
        detected_at=3.0,
        reference_id="ref-1",
        config_hash=CFG.config_hash,
    )
    assert alert["alert_id"] == "m:v2:psi:y:1"
    assert "covariate drift on m v2 feature 'y'" in alert["message"] and alert["runbook"]


def alert(kind: str, sev: str, slice_: str | None = "region=eu", aid: str = "a") -> dict[str, Any]:
    return {
        "alert_id": aid,
        "kind": kind,
        "severity": sev,
        "detector": "d",
        "feature": None,
        "slice": slice_,
    }


def test_killswitch_rule_needs_count_within_sustain_window() -> None:
    ks = KillSwitch(MODEL)
    assert ks.on_alert(alert("concept_drift", "critical", aid="a1"), 0.0) is None
    # the second match comes too late (sustain window 60 s): still not tripped
    assert ks.on_alert(alert("concept_drift", "critical", aid="a2"), 100.0) is None
    # wrong slice / too low severity do not count
    assert ks.on_alert(alert("concept_drift", "critical", slice_="region=us"), 101.0) is None
    assert ks.on_alert(alert("concept_drift", "warn"), 102.0) is None
    cmd = ks.on_alert(alert("concept_drift", "critical", aid="a3"), 120.0)
    assert cmd is not None
    assert cmd["action"] == "rollback" and cmd["target_version"] == "v1"
    assert cmd["reason_alert_ids"] == ["a2", "a3"] and cmd["mode"] == "automatic"
    assert cmd["command_id"] == "m:killswitch:concept:1" and ks.active
    # already active: no second command
    assert ks.on_alert(alert("cost", "critical"), 130.0) is None


def test_manual_release_then_cooldown_then_retrip() -> None:
    ks = KillSwitch(MODEL)
    ks.on_alert(alert("concept_drift", "critical", aid="a1"), 0.0)
    assert ks.on_alert(alert("concept_drift", "critical", aid="a2"), 1.0) is not None
    rel = ks.manual("release", 10.0, reason="fixed")
    assert rel["action"] == "release" and rel["mode"] == "manual" and not ks.active
    assert rel["command_id"] == "m:killswitch:release:1"
    ks.on_alert(alert("concept_drift", "critical", aid="a3"), 20.0)
    assert ks.on_alert(alert("concept_drift", "critical", aid="a4"), 21.0) is None  # cooldown 500 s
    # another rule (no cooldown used yet) can trip meanwhile
    cmd = ks.on_alert(alert("cost", "warn", slice_=None, aid="c1"), 22.0)
    assert (
        cmd is not None
        and cmd["action"] == "throttle"
        and cmd["command_id"] == "m:killswitch:cost:2"
    )
    ks.manual("release", 30.0)
    ks.on_alert(alert("concept_drift", "critical", aid="a5"), 600.0)
    assert ks.on_alert(alert("concept_drift", "critical", aid="a6"), 601.0) is not None
    # state round-trips
    other = KillSwitch(MODEL)
    other.load(ks.to_state())
    assert other.to_state() == ks.to_state()


def test_manual_trip_and_validation() -> None:
    ks = KillSwitch(MODEL)
    cmd = ks.manual("fallback", 5.0, reason="incident 42")
    assert cmd["mode"] == "manual" and cmd["action"] == "fallback" and ks.active
    with pytest.raises(ValueError, match="valid values: rollback, fallback, throttle, release"):
        ks.manual("explode", 6.0)
