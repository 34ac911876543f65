"""Seeded scenarios of production-ML incidents (deterministic for a given seed).

**The four stories** (``driftline demo``): four *distinct* models share a 360 s timeline of
event time (``START`` + seconds). Each runs stationary traffic until its own change, so
every model has a quiet period in which no alert may fire, then one incident from
``reference/production-ml-article.txt``:

========  ==================  ===========================================================
t (s)     model               incident
========  ==================  ===========================================================
``60``    ``search_ranking``  an upstream "quick fix" ships ``seller_quality_score`` on a
                              0–100 scale instead of 0–1 (data contract + PSI)
``120``   ``recommender``     v2, a large neural model, replaces the compact v1 and costs
                              30× per request (latency stays in its SLO: the infra team
                              autoscaled) — only the cost budget per version catches it
``180``   ``support_triage``  the LLM's prompt template is edited in production
                              (``prompt_version`` triage-v7 → triage-v8): answers get
                              longer and refusals / toxic outputs more frequent
``240``   ``fraud``           fraudsters adapt in ``region=apac``: ``P(Y|X)`` inverts while
                              ``P(X)`` and ``P(Y)`` stay put, so feature, score and label
                              monitors (and the static test set) see nothing; the error
                              rate on joined labels does → kill switch: roll back to v1
========  ==================  ===========================================================

API: :data:`STORIES_YAML`, :data:`STORIES`, :func:`story_reference_rows`,
:func:`generate_stories`, :func:`scope_of`.

**The single-model service scenario** (end of this module: :data:`MONITORS_YAML`,
:func:`reference_rows`, :func:`generate`, :data:`CHANGES`): one fraud model with three
incidents in 300 s — used by the worker's integration tests, ``examples/monitors.yaml``
and the Kubernetes example overlay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

START: Final = 1_700_000_000.0
STORIES_END: Final = 360.0

FloatArray = npt.NDArray[np.float64]

RATES: Final = {
    "fraud": 150.0,
    "search_ranking": 100.0,
    "recommender": 100.0,
    "support_triage": 40.0,
}
"""Predictions per second per model at ``scale=1``."""

REGIONS: Final = ("eu", "us", "apac")
COUNTRIES: Final = {"eu": ("DE", "FR", "ES"), "us": ("US",), "apac": ("JP", "AU", "SG")}
CHANNELS: Final = ("web", "ios", "android")
CATEGORIES: Final = ("electronics", "fashion", "home", "toys", "garden")
DEVICES: Final = ("mobile", "desktop", "tablet")
LANGUAGES: Final = ("en", "de", "fr", "es")
TICKET_CHANNELS: Final = ("email", "chat", "form")
TRIAGE_CLASSES: Final = ("billing", "technical", "account", "other")
PROMPT_OLD: Final = "triage-v7"
PROMPT_NEW: Final = "triage-v8"

STORIES_YAML: Final = """\
# driftline monitors: one entry per model (see docs/architecture.md).
# Reference profiles are built with `driftline baseline reference-<model>.csv --config
# monitors.yaml --model <model> -o profile-<model>.json` (scripts/make_sample_data.py).
version: 1
models:
  fraud:
    reference: profile-fraud.json
    task: binary
    positive_label: "1"
    label_horizon: 1h
    features:
      amount: {type: numeric, range: [0, 100000]}
      merchant_risk: {type: numeric, range: [0, 1]}
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
    policy: {sustain: 3, cooldown_s: 600}
    kill_switch:
      - name: concept-rollback
        when: {kind: concept_drift, severity: critical}
        action: rollback
        target_version: v1
        cooldown: 1h
  search_ranking:
    reference: profile-search_ranking.json
    task: regression
    label_horizon: 0
    features:
      seller_quality_score: {type: numeric, range: [0, 1]}
      query_length: {type: numeric, range: [1, 64]}
      price: {type: numeric, range: [0, 100000]}
      category: {type: categorical, categories: [electronics, fashion, home, toys, garden]}
    detectors:
      psi_window_ticks: 30
      psi_min_count: 300
      cusum_arl0: 1.0e+8
    policy: {sustain: 3, cooldown_s: 600}
  recommender:
    reference: profile-recommender.json
    task: binary
    label_horizon: 0
    features:
      user_tenure_days: {type: numeric, range: [0, 10000]}
      items_in_session: {type: numeric, range: [0, 500]}
      device: {type: categorical, categories: [mobile, desktop, tablet]}
    detectors:
      psi_window_ticks: 30
      psi_min_count: 300
      cusum_arl0: 1.0e+8
    budgets:
      cost_usd_per_1k: 0.25
      latency_ms: 150
      latency_percentile: 95
      window_ticks: 30
      min_count: 200
    policy: {sustain: 3, cooldown_s: 600}
  support_triage:
    reference: profile-support_triage.json
    task: multiclass
    label_horizon: 0
    features:
      ticket_words: {type: numeric, range: [0, 5000]}
      language: {type: categorical}
      channel: {type: categorical, categories: [email, chat, form]}
      llm.input_tokens: {type: numeric, range: [0, 32000]}
      llm.output_tokens: {type: numeric, range: [0, 4096]}
      llm.flags.refusal: {type: numeric, range: [0, 1]}
      llm.flags.toxicity: {type: numeric, range: [0, 1]}
    detectors:
      psi_window_ticks: 30
      psi_min_count: 300
      cusum_arl0: 1.0e+8
      concept_arl0: 1.0e+6
    policy: {sustain: 3, cooldown_s: 600}
"""


@dataclass(frozen=True)
class Expect:
    """A detection a story must produce: alert kind + detector on a version/feature/slice,
    within ``max_events`` predictions of the affected scope after the change."""

    kind: str
    detector: str
    version: str
    feature: str | None = None
    slice: str | None = None
    max_events: int = 1000

    def matches(self, alert: Mapping[str, Any]) -> bool:
        return (
            alert["kind"] == self.kind
            and alert["detector"] == self.detector
            and alert["model_version"] == self.version
            and alert.get("feature") == self.feature
            and alert.get("slice") == self.slice
        )

    @property
    def where(self) -> str:
        return " ".join(x for x in (self.feature, self.slice) if x) or "-"


@dataclass(frozen=True)
class Story:
    """One incident: the model, when it changes, and what must catch it."""

    model: str
    title: str
    at: float  # seconds after START
    what: str
    expect: tuple[Expect, ...]
    scope_version: str | None = None  # events counted for "events after the change"
    scope_slice: str | None = None  # "dim=value"
    killswitch: str | None = None  # expected automatic action


STORIES: Final = (
    Story(
        "search_ranking",
        "upstream rescales seller_quality_score 0–1 → 0–100",
        60.0,
        "An upstream team ships a 'quick fix' that sends seller_quality_score on a 0–100 "
        "scale; no schema check in the feature pipeline, ranking goes haywire.",
        (
            Expect("data_quality", "quality.out_of_range", "v1", "seller_quality_score", None, 300),
            Expect("covariate_drift", "psi", "v1", "seller_quality_score", None, 800),
        ),
        scope_version="v1",
    ),
    Story(
        "recommender",
        "v2 (neural) costs 30× per request",
        120.0,
        "The compact v1 is swapped for a large neural v2: CTR +2%, inference cost ×30; "
        "latency stays inside its SLO because the infra team autoscaled.",
        (Expect("cost", "cost_per_1k", "v2", None, None, 600),),
        scope_version="v2",
    ),
    Story(
        "support_triage",
        f"prompt edited in production ({PROMPT_OLD} → {PROMPT_NEW})",
        180.0,
        "Someone edits the triage prompt in production: answers get longer, refusals and "
        "toxic outputs more frequent; latency and error codes look fine.",
        (
            Expect(
                "prediction_drift",
                "psi",
                "v3",
                "llm.output_tokens",
                f"prompt_version={PROMPT_NEW}",
                800,
            ),
            Expect(
                "prediction_drift",
                "bernoulli_cusum",
                "v3",
                "llm.flags.refusal",
                f"prompt_version={PROMPT_NEW}",
                1500,
            ),
        ),
        scope_version="v3",
    ),
    Story(
        "fraud",
        "fraudsters adapt in region=apac: P(Y|X) inverts",
        240.0,
        "Fraud moves to transactions the model scores as safe. Feature, score and label "
        "distributions stay put and the static test set still says AUC is fine; only "
        "the error rate on joined labels moves.",
        (Expect("concept_drift", "bernoulli_cusum", "v2", None, "region=apac", 2500),),
        scope_version="v2",
        scope_slice="region=apac",
        killswitch="rollback",
    ),
)


# --------------------------------------------------------------------------- models


def _logistic(z: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
    return out


def _fraud_x(rng: np.random.Generator, n: int) -> dict[str, Any]:
    region = rng.choice(len(REGIONS), size=n, p=[0.45, 0.35, 0.20])
    country_u = rng.random(n)
    country = []
    for r, u in zip(region.tolist(), country_u.tolist(), strict=True):
        opts = COUNTRIES[REGIONS[r]]
        country.append(opts[min(int(u * len(opts)), len(opts) - 1)])
    return {
        "region": region,
        "amount": np.round(rng.gamma(2.0, 60.0, size=n), 2),
        "merchant_risk": np.round(rng.beta(2.0, 5.0, size=n), 4),
        "account_age_days": np.round(rng.uniform(0, 3000, size=n)),
        "missing_age": rng.random(n) < 0.05,
        "country": country,
        "channel": rng.choice(len(CHANNELS), size=n, p=[0.5, 0.3, 0.2]),
    }


def _fraud_score(x: Mapping[str, Any]) -> FloatArray:
    z = (
        -1.2
        + 5.0 * (x["merchant_risk"] - 0.28)
        + 0.006 * (x["amount"] - 120.0)
        - 0.0004 * (x["account_age_days"] - 1500.0)
        + 0.6 * (x["channel"] == 2)
    )
    return _logistic(z)


def _ranking_x(rng: np.random.Generator, n: int) -> dict[str, Any]:
    return {
        "seller_quality_score": np.round(rng.beta(5.0, 2.0, size=n), 4),
        "query_length": (rng.poisson(2.5, size=n) + 1).astype(np.float64),
        "price": np.round(rng.lognormal(3.5, 0.9, size=n), 2),
        "category": rng.choice(len(CATEGORIES), size=n, p=[0.3, 0.25, 0.2, 0.15, 0.1]),
    }


def _ranking_score(x: Mapping[str, Any]) -> FloatArray:
    z = -0.5 + 2.5 * (x["seller_quality_score"] - 0.7) - 0.1 * (x["query_length"] - 3.5)
    return _logistic(z - 0.002 * (x["price"] - 50.0))


def _reco_x(rng: np.random.Generator, n: int) -> dict[str, Any]:
    return {
        "user_tenure_days": np.round(rng.exponential(400.0, size=n)),
        "items_in_session": (rng.poisson(6.0, size=n)).astype(np.float64),
        "device": rng.choice(len(DEVICES), size=n, p=[0.6, 0.3, 0.1]),
    }


def _reco_score(x: Mapping[str, Any], rng: np.random.Generator) -> FloatArray:
    z = -2.2 + 0.08 * (x["items_in_session"] - 6.0) + 0.0003 * (x["user_tenure_days"] - 400)
    return _logistic(z + rng.normal(0.0, 0.3, size=z.shape[0]))


def _triage_x(rng: np.random.Generator, n: int) -> dict[str, Any]:
    words = np.round(rng.lognormal(4.3, 0.6, size=n))
    return {
        "ticket_words": words,
        "language": rng.choice(len(LANGUAGES), size=n, p=[0.6, 0.2, 0.1, 0.1]),
        "channel": rng.choice(len(TICKET_CHANNELS), size=n, p=[0.5, 0.35, 0.15]),
        "input_tokens": (420 + np.round(1.35 * words)).astype(np.int64),
        "class": rng.choice(len(TRIAGE_CLASSES), size=n, p=[0.35, 0.35, 0.2, 0.1]),
        "confidence": np.round(rng.beta(8.0, 2.0, size=n), 4),
        "retrieval_hits": rng.poisson(3.0, size=n),
    }


def _triage_llm(
    rng: np.random.Generator, n: int, new_prompt: npt.NDArray[np.bool_]
) -> dict[str, Any]:
    """Output tokens and flags; the new prompt makes answers longer and riskier."""
    out_old = rng.gamma(6.0, 25.0, size=n)  # mean 150
    out_new = rng.gamma(6.0, 45.0, size=n)  # mean 270
    u_ref, u_tox = rng.random(n), rng.random(n)
    return {
        "output_tokens": np.round(np.where(new_prompt, out_new, out_old)).astype(np.int64),
        "refusal": u_ref < np.where(new_prompt, 0.07, 0.02),
        "toxicity": u_tox < np.where(new_prompt, 0.015, 0.003),
    }


# --------------------------------------------------------------------------- reference


def story_reference_rows(model: str, n: int = 20_000, seed: int = 7) -> list[dict[str, Any]]:
    """A training / evaluation snapshot of ``model`` before its incident (flat rows)."""
    rng = np.random.default_rng([seed, list(RATES).index(model)])
    rows: list[dict[str, Any]] = []
    if model == "fraud":
        x = _fraud_x(rng, n)
        s = _fraud_score(x)
        y = (rng.random(n) < s).astype(int)
        for i in range(n):
            rows.append(
                {
                    "amount": float(x["amount"][i]),
                    "merchant_risk": float(x["merchant_risk"][i]),
                    "account_age_days": None
                    if x["missing_age"][i]
                    else float(x["account_age_days"][i]),
                    "country": x["country"][i],
                    "channel": CHANNELS[int(x["channel"][i])],
                    "region": REGIONS[int(x["region"][i])],
                    "score": float(s[i]),
                    "prediction": int(s[i] > 0.5),
                    "label": int(y[i]),
                }
            )
    elif model == "search_ranking":
        x = _ranking_x(rng, n)
        s = _ranking_score(x)
        for i in range(n):
            rows.append(
                {
                    "seller_quality_score": float(x["seller_quality_score"][i]),
                    "query_length": float(x["query_length"][i]),
                    "price": float(x["price"][i]),
                    "category": CATEGORIES[int(x["category"][i])],
                    "score": float(s[i]),
                }
            )
    elif model == "recommender":
        x = _reco_x(rng, n)
        s = _reco_score(x, rng)
        for i in range(n):
            rows.append(
                {
                    "user_tenure_days": float(x["user_tenure_days"][i]),
                    "items_in_session": float(x["items_in_session"][i]),
                    "device": DEVICES[int(x["device"][i])],
                    "score": float(s[i]),
                }
            )
    elif model == "support_triage":
        x = _triage_x(rng, n)
        llm = _triage_llm(rng, n, np.zeros(n, dtype=bool))
        for i in range(n):
            rows.append(
                {
                    "ticket_words": float(x["ticket_words"][i]),
                    "language": LANGUAGES[int(x["language"][i])],
                    "channel": TICKET_CHANNELS[int(x["channel"][i])],
                    "llm.input_tokens": int(x["input_tokens"][i]),
                    "llm.output_tokens": int(llm["output_tokens"][i]),
                    "llm.flags.refusal": int(llm["refusal"][i]),
                    "llm.flags.toxicity": int(llm["toxicity"][i]),
                    "score": float(x["confidence"][i]),
                }
            )
    else:
        raise ValueError(f"model: {model!r} is not in the scenario; valid values: {list(RATES)}")
    return rows


# --------------------------------------------------------------------------- traffic


def _times(rng: np.random.Generator, rate: float) -> FloatArray:
    n = int(rate * STORIES_END)
    return np.sort(rng.uniform(0.0, STORIES_END, size=n))


def _story(model: str) -> Story:
    return next(s for s in STORIES if s.model == model)


def _fraud(
    rng: np.random.Generator, rate: float, start: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    t = _times(rng, rate)
    n = t.shape[0]
    x = _fraud_x(rng, n)
    s = _fraud_score(x)
    # fraudsters adapt in apac: fraud moves to what the model scores as safe. The fraud
    # probability is the score of the mirror-ranked transaction, so P(Y) and P(X) keep
    # their distributions while P(Y|X) inverts.
    p_true = s.copy()
    adapted = (t >= _story("fraud").at) & (x["region"] == REGIONS.index("apac"))
    idx = np.flatnonzero(adapted)
    order = idx[np.argsort(s[idx], kind="stable")]
    p_true[order] = s[order[::-1]]
    y = (rng.random(n) < p_true).astype(int)
    has_label: npt.NDArray[np.bool_] = np.asarray(rng.random(n) < 0.5)
    delay: FloatArray = np.asarray(rng.uniform(5.0, 30.0, size=n))
    latency: FloatArray = np.asarray(rng.gamma(4.0, 5.0, size=n))
    preds: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    for i in range(n):
        rid = f"fraud-{i:07d}"
        ts = round(start + float(t[i]), 3)
        preds.append(
            {
                "event_id": f"fp-{i:07d}",
                "model_id": "fraud",
                "model_version": "v2",
                "request_id": rid,
                "ts": ts,
                "features": {
                    "amount": float(x["amount"][i]),
                    "merchant_risk": float(x["merchant_risk"][i]),
                    "account_age_days": None
                    if x["missing_age"][i]
                    else float(x["account_age_days"][i]),
                    "country": x["country"][i],
                    "channel": CHANNELS[int(x["channel"][i])],
                },
                "prediction": int(s[i] > 0.5),
                "score": round(float(s[i]), 5),
                "latency_ms": round(float(latency[i]), 2),
                "slice": {"region": REGIONS[int(x["region"][i])]},
            }
        )
        if has_label[i] and t[i] + delay[i] < STORIES_END:
            labels.append(
                {
                    "event_id": f"fl-{i:07d}",
                    "model_id": "fraud",
                    "request_id": rid,
                    "ts": round(ts + float(delay[i]), 3),
                    "label": int(y[i]),
                }
            )
    return preds, labels


def _ranking(rng: np.random.Generator, rate: float, start: float) -> list[dict[str, Any]]:
    t = _times(rng, rate)
    n = t.shape[0]
    x = _ranking_x(rng, n)
    broken = t >= _story("search_ranking").at
    sqs = np.where(
        broken, np.round(x["seller_quality_score"] * 100.0, 2), x["seller_quality_score"]
    )
    s = _ranking_score({**x, "seller_quality_score": sqs})  # the model reads the broken feature
    latency: FloatArray = np.asarray(rng.gamma(4.0, 6.0, size=n))
    out = []
    for i in range(n):
        out.append(
            {
                "event_id": f"sp-{i:07d}",
                "model_id": "search_ranking",
                "model_version": "v1",
                "request_id": f"search-{i:07d}",
                "ts": round(start + float(t[i]), 3),
                "features": {
                    "seller_quality_score": float(sqs[i]),
                    "query_length": float(x["query_length"][i]),
                    "price": float(x["price"][i]),
                    "category": CATEGORIES[int(x["category"][i])],
                },
                "prediction": round(float(s[i]), 5),
                "score": round(float(s[i]), 5),
                "latency_ms": round(float(latency[i]), 2),
            }
        )
    return out


def _recommender(rng: np.random.Generator, rate: float, start: float) -> list[dict[str, Any]]:
    t = _times(rng, rate)
    n = t.shape[0]
    x = _reco_x(rng, n)
    s = _reco_score(x, rng)
    v2 = t >= _story("recommender").at
    # v2: CTR +2 % relative, cost x30, latency up but autoscaled into the SLO
    s = np.where(v2, np.minimum(s * 1.02, 1.0), s)
    cost = np.where(v2, 30 * 0.00008, 0.00008) * rng.uniform(0.8, 1.2, size=n)
    latency = np.where(v2, rng.gamma(4.0, 14.0, size=n), rng.gamma(4.0, 6.0, size=n))
    out = []
    for i in range(n):
        out.append(
            {
                "event_id": f"rp-{i:07d}",
                "model_id": "recommender",
                "model_version": "v2" if v2[i] else "v1",
                "request_id": f"reco-{i:07d}",
                "ts": round(start + float(t[i]), 3),
                "features": {
                    "user_tenure_days": float(x["user_tenure_days"][i]),
                    "items_in_session": float(x["items_in_session"][i]),
                    "device": DEVICES[int(x["device"][i])],
                },
                "prediction": int(s[i] > 0.5),
                "score": round(float(s[i]), 5),
                "latency_ms": round(float(latency[i]), 2),
                "cost_usd": round(float(cost[i]), 8),
            }
        )
    return out


def _triage(rng: np.random.Generator, rate: float, start: float) -> list[dict[str, Any]]:
    t = _times(rng, rate)
    n = t.shape[0]
    x = _triage_x(rng, n)
    new = t >= _story("support_triage").at
    llm = _triage_llm(rng, n, new)
    latency = 300.0 + 8.0 * llm["output_tokens"] + rng.gamma(2.0, 40.0, size=n)
    cost = (x["input_tokens"] * 0.5 + llm["output_tokens"] * 1.5) / 1e6
    out = []
    for i in range(n):
        flags = {}
        if llm["refusal"][i]:
            flags["refusal"] = True
        if llm["toxicity"][i]:
            flags["toxicity"] = True
        out.append(
            {
                "event_id": f"tp-{i:07d}",
                "model_id": "support_triage",
                "model_version": "v3",
                "request_id": f"ticket-{i:07d}",
                "ts": round(start + float(t[i]), 3),
                "features": {
                    "ticket_words": float(x["ticket_words"][i]),
                    "language": LANGUAGES[int(x["language"][i])],
                    "channel": TICKET_CHANNELS[int(x["channel"][i])],
                },
                "prediction": TRIAGE_CLASSES[int(x["class"][i])],
                "score": float(x["confidence"][i]),
                "latency_ms": round(float(latency[i]), 1),
                "cost_usd": round(float(cost[i]), 8),
                "llm": {
                    "prompt_version": PROMPT_NEW if new[i] else PROMPT_OLD,
                    "input_tokens": int(x["input_tokens"][i]),
                    "output_tokens": int(llm["output_tokens"][i]),
                    "retrieval_hits": int(x["retrieval_hits"][i]),
                    "flags": flags,
                },
            }
        )
    return out


def generate_stories(
    scale: float = 1.0, seed: int = 11, start: float = START
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prediction and label events of the four stories, each list sorted by ``ts``.

    ``scale`` multiplies every model's rate (:data:`RATES`).
    """
    if not scale > 0:
        raise ValueError(f"scale: {scale!r} must be > 0")
    rng = [np.random.default_rng([seed, i]) for i in range(4)]
    fraud_p, fraud_l = _fraud(rng[0], RATES["fraud"] * scale, start)
    preds = fraud_p
    preds += _ranking(rng[1], RATES["search_ranking"] * scale, start)
    preds += _recommender(rng[2], RATES["recommender"] * scale, start)
    preds += _triage(rng[3], RATES["support_triage"] * scale, start)
    preds.sort(key=lambda e: e["ts"])
    fraud_l.sort(key=lambda e: e["ts"])
    return preds, fraud_l


def scope_of(ev: Mapping[str, Any], story: Story) -> bool:
    """Is prediction ``ev`` in the story's affected scope (model, version, slice)?"""
    if ev["model_id"] != story.model:
        return False
    if story.scope_version is not None and ev["model_version"] != story.scope_version:
        return False
    if story.scope_slice is not None:
        dim, _, val = story.scope_slice.partition("=")
        return bool((ev.get("slice") or {}).get(dim) == val)
    return True


# =========================================================================== service scenario
# One fraud model, three incidents in 300 s (the worker's integration tests, examples/
# monitors.yaml and the k8s example overlay use it):
# 0-90 s stationary v1; 90-120 s seller_quality_score sent on a 0-100 scale; 150 s v2 at
# 10x cost; 210 s outcomes invert for v2 in region=apac (concept drift -> rollback to v1).

SCALE_BREAK: Final = (90.0, 120.0)
NEW_VERSION_AT: Final = 150.0
CONCEPT_FLIP_AT: Final = 210.0
END: Final = 300.0

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
