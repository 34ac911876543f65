"""The seeded demo scenario: a fraud model's traffic with three production incidents.

Timeline (seconds after ``start``; ``rate`` predictions per second):

* ``0 – 90``   v1, stationary traffic (must stay quiet);
* ``90 – 120`` upstream "quick fix": ``seller_quality_score`` is sent on a 0–100 scale
  instead of 0–1 (the article's marketplace incident), then fixed;
* ``150``      v2 rolls out to all traffic and costs 10× per request (budget $0.50 / 1k);
* ``210``      concept flip in slice ``region=apac``: outcomes invert for v2, so its errors
  on joined labels jump (the fraudsters adapted);
* ``300``      end.

Half of the predictions get a label 5–30 s later. Scores are calibrated by construction
(``P(label=1 | x) = score``), so the reference profile's error rate is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

START: Final = 1_700_000_000.0
SCALE_BREAK: Final = (90.0, 120.0)
NEW_VERSION_AT: Final = 150.0
CONCEPT_FLIP_AT: Final = 210.0
END: Final = 300.0
REGIONS: Final = ("eu", "us", "apac")
COUNTRIES: Final = {"eu": ("DE", "FR", "ES"), "us": ("US",), "apac": ("JP", "AU", "SG")}
CHANNELS: Final = ("web", "ios", "android")

MONITORS_YAML: Final = """\
# driftline monitors: one entry per model (see docs/architecture.md)
version: 1
models:
  fraud:
    reference: profile-fraud.json        # built with: driftline baseline reference.csv ...
    task: binary
    positive_label: "1"
    label_horizon: 1h
    features:
      amount: {type: numeric, range: [0, 100000]}
      merchant_risk: {type: numeric, range: [0, 1]}
      seller_quality_score: {type: numeric, range: [0, 1]}
      account_age_days: {type: numeric, range: [0, 20000], required: false}
      country: {type: categorical, categories: [DE, FR, ES, US, JP, AU, SG]}
      channel: {type: categorical}
    slices:
      region: {values: [eu, us, apac]}
    detectors:
      psi_window_ticks: 60
      psi_min_count: 300
      cusum_arl0: 1.0e+8
      concept_arl0: 1.0e+6
    budgets:
      cost_usd_per_1k: 0.5
      latency_ms: 250
      latency_percentile: 95
      window_ticks: 30
      min_count: 200
    policy:
      sustain: 3
      cooldown_s: 600
    kill_switch:
      - name: concept-rollback
        when: {kind: concept_drift, severity: critical}
        action: rollback
        target_version: v1
        cooldown: 1h
"""


@dataclass(frozen=True)
class Change:
    """A scripted incident and what should catch it."""

    name: str
    at: float  # seconds after start
    kinds: tuple[str, ...]
    version: str
    feature: str | None = None
    slice: str | None = None


CHANGES: Final = (
    Change(
        "scale break 0-1 -> 0-100",
        SCALE_BREAK[0],
        ("data_quality", "schema"),
        "v1",
        feature="seller_quality_score",
    ),
    Change("cost jump on new version", NEW_VERSION_AT, ("cost",), "v2"),
    Change("concept flip in apac", CONCEPT_FLIP_AT, ("concept_drift",), "v2", slice="region=apac"),
)


def _features(rng: np.random.Generator, n: int) -> dict[str, Any]:
    region = rng.choice(len(REGIONS), size=n, p=[0.45, 0.35, 0.20])
    return {
        "region": region,
        "amount": np.round(rng.gamma(2.0, 60.0, size=n), 2),
        "merchant_risk": rng.beta(2.0, 5.0, size=n),
        "seller_quality_score": rng.beta(5.0, 2.0, size=n),
        "account_age_days": np.round(rng.uniform(0, 3000, size=n)),
        "country_u": rng.random(n),
        "channel": rng.choice(len(CHANNELS), size=n, p=[0.5, 0.3, 0.2]),
        "missing_age": rng.random(n) < 0.05,
    }


def _score(f: dict[str, Any]) -> np.ndarray:
    z = (
        -1.0
        + 3.0 * (f["merchant_risk"] - 0.28)
        - 2.5 * (f["seller_quality_score"] - 0.71)
        + 0.004 * (f["amount"] - 120.0)
        + 0.5 * (f["channel"] == 2)
    )
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
    return out


def _country(f: dict[str, Any], i: int) -> str:
    opts = COUNTRIES[REGIONS[int(f["region"][i])]]
    return opts[min(int(f["country_u"][i] * len(opts)), len(opts) - 1)]


def reference_rows(n: int = 20_000, seed: int = 7) -> list[dict[str, Any]]:
    """A training snapshot of v1 (flat rows with prediction, score and label)."""
    rng = np.random.default_rng(seed)
    f = _features(rng, n)
    s = _score(f)
    y = (rng.random(n) < s).astype(int)
    rows = []
    for i in range(n):
        rows.append(
            {
                "amount": float(f["amount"][i]),
                "merchant_risk": float(f["merchant_risk"][i]),
                "seller_quality_score": float(f["seller_quality_score"][i]),
                "account_age_days": None
                if f["missing_age"][i]
                else float(f["account_age_days"][i]),
                "country": _country(f, i),
                "channel": CHANNELS[int(f["channel"][i])],
                "region": REGIONS[int(f["region"][i])],
                "score": float(s[i]),
                "prediction": int(s[i] > 0.5),
                "label": int(y[i]),
            }
        )
    return rows


def generate(
    rate: float = 300.0, seed: int = 11, start: float = START
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prediction and label events of the whole scenario (each list sorted by ``ts``)."""
    rng = np.random.default_rng(seed)
    n = int(rate * END)
    t = np.sort(rng.uniform(0.0, END, size=n))
    f = _features(rng, n)
    in_break = (t >= SCALE_BREAK[0]) & (t < SCALE_BREAK[1])
    sqs = np.where(
        in_break, np.round(f["seller_quality_score"] * 100.0, 1), f["seller_quality_score"]
    )
    # the model reads the broken feature too: its scores go haywire during the break
    s = _score({**f, "seller_quality_score": sqs})
    v2 = t >= NEW_VERSION_AT
    p_true = _score(f)
    y = (rng.random(n) < p_true).astype(int)
    apac = f["region"] == REGIONS.index("apac")
    flip = v2 & apac & (t >= CONCEPT_FLIP_AT)
    y = np.where(flip, 1 - y, y)
    latency = rng.gamma(4.0, 20.0, size=n)
    cost = np.where(v2, 0.002, 0.0002) * rng.uniform(0.8, 1.2, size=n)
    has_label = rng.random(n) < 0.5
    delay = rng.uniform(5.0, 30.0, size=n)
    preds: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    for i in range(n):
        rid = f"req-{i:07d}"
        ts = round(start + float(t[i]), 3)
        feats: dict[str, Any] = {
            "amount": float(f["amount"][i]),
            "merchant_risk": round(float(f["merchant_risk"][i]), 4),
            "seller_quality_score": round(float(sqs[i]), 4),
            "account_age_days": None if f["missing_age"][i] else float(f["account_age_days"][i]),
            "country": _country(f, i),
            "channel": CHANNELS[int(f["channel"][i])],
        }
        preds.append(
            {
                "event_id": f"p-{i:07d}",
                "model_id": "fraud",
                "model_version": "v2" if v2[i] else "v1",
                "request_id": rid,
                "ts": ts,
                "features": feats,
                "prediction": int(s[i] > 0.5),
                "score": round(float(s[i]), 5),
                "latency_ms": round(float(latency[i]), 2),
                "cost_usd": round(float(cost[i]), 7),
                "slice": {"region": REGIONS[int(f["region"][i])]},
            }
        )
        if has_label[i] and t[i] + delay[i] < END:
            labels.append(
                {
                    "event_id": f"l-{i:07d}",
                    "model_id": "fraud",
                    "request_id": rid,
                    "ts": round(ts + float(delay[i]), 3),
                    "label": int(y[i]),
                }
            )
    labels.sort(key=lambda e: e["ts"])
    return preds, labels


def events_between(
    preds: list[dict[str, Any]],
    t0: float,
    t1: float,
    version: str | None = None,
    slice_key: str | None = None,
) -> int:
    """Predictions with ``t0 <= ts < t1`` (optionally of one version / slice ``dim=value``)."""
    n = 0
    dim, _, val = (slice_key or "").partition("=")
    for p in preds:
        if not t0 <= p["ts"] < t1:
            continue
        if version is not None and p["model_version"] != version:
            continue
        if slice_key and (p.get("slice") or {}).get(dim) != val:
            continue
        n += 1
    return n
