"""Monitor configuration (YAML → frozen dataclasses) and service settings (environment).

Every validation error names the file, the model and the field, e.g.
``monitors.yaml: models.fraud.features.amount.range: lo (5) must be < hi (1)``; unknown keys
are rejected with the valid keys listed.

>>> cfg = load_config_text('''
... models:
...   fraud:
...     features:
...       amount: {type: numeric, range: [0, 10000]}
...       country: {type: categorical, categories: [DE, FR]}
...     budgets: {cost_usd_per_1k: 0.5}
... ''', source="inline.yaml")
>>> m = cfg.models["fraud"]
>>> m.features[0].name, m.features[0].range, m.features[1].categories
('amount', (0.0, 10000.0), ('DE', 'FR'))
>>> m.detectors.psi_window_ticks, m.budgets.cost_usd_per_1k
(300, 0.5)
>>> try:
...     load_config_text("models: {fraud: {features: {amount: {type: numeric, range: [5, 1]}}}}",
...                      source="monitors.yaml")
... except ConfigError as err:
...     print(err)
monitors.yaml: models.fraud.features.amount.range: lo (5) must be < hi (1)
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson
import yaml

from stream.events import MODEL_ID_RE

KINDS: Final = (
    "covariate_drift",
    "label_drift",
    "concept_drift",
    "prediction_drift",
    "data_quality",
    "schema",
    "performance",
    "cost",
)
ACTIONS: Final = ("rollback", "fallback", "throttle")
SEVERITIES: Final = ("warn", "critical")
TASKS: Final = ("binary", "multiclass", "regression")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names file, model and field."""


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """One monitored feature and its data contract."""

    name: str
    type: str  # numeric | categorical
    required: bool = True
    range: tuple[float, float] | None = None
    categories: tuple[str, ...] | None = None  # allowed categories (contract); None = any


@dataclass(frozen=True, slots=True)
class SliceConfig:
    """A slice dimension with bounded cardinality (values beyond ``max_values`` → "other").

    The kept values are ``values`` when given, otherwise the ``max_values`` most frequent
    categories of the same-named feature in the reference profile (deterministic on every
    worker). Values are read from the event's ``slice{}`` first, then from ``features{}``.
    """

    name: str
    max_values: int = 16
    values: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """Detector parameters with defaults that are safe for most models."""

    psi_window_ticks: int = 300
    psi_warn: float = 0.1
    psi_critical: float = 0.25
    psi_alpha: float = 1e-3
    psi_min_count: int = 200
    bins: int = 10
    cusum_arl0: float = 1e6
    cusum_k: float = 0.5
    concept_arl0: float = 1e5
    concept_warmup_pairs: int = 200
    concept_shift: float = 2.0  # the error-rate ratio p1/p0 the Bernoulli CUSUM is tuned for
    quality_max_rate: float = 0.01  # tolerated violation rate above the reference rate
    quality_z: float = 3.0  # Wilson lower bound z for "the rate exceeds the limit"
    quality_min_count: int = 20
    calibration_max_gap: float = 0.15
    calibration_min_count: int = 200


@dataclass(frozen=True, slots=True)
class Budgets:
    """Per-model-version budgets; None = not monitored."""

    cost_usd_per_1k: float | None = None
    latency_ms: float | None = None
    latency_percentile: float = 95.0
    window_ticks: int = 60
    min_count: int = 200


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Alert policy: sustain (consecutive breaching evaluations), hysteresis, cooldown."""

    sustain: int = 3
    cooldown_s: float = 600.0
    hysteresis: float = 0.2
    clear_after: int = 3


@dataclass(frozen=True, slots=True)
class KillSwitchRule:
    """Trip the model's kill switch when ``count`` alerts match ``when`` within ``sustain_s``."""

    name: str
    kinds: tuple[str, ...]
    min_severity: str = "critical"
    detector: str | None = None
    feature: str | None = None
    slice: str | None = None
    count: int = 1
    sustain_s: float = 0.0
    cooldown_s: float = 3600.0
    action: str = "rollback"
    target_version: str | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything monitored for one model."""

    model_id: str
    features: tuple[FeatureConfig, ...]
    slices: tuple[SliceConfig, ...] = ()
    reference_path: str | None = None
    # an inline profile kept as its JSON bytes: one object, where the parsed document of
    # 1,000 models x 20 features was ~700k Python objects (29 MB) held for the worker's life
    reference_inline: bytes | None = None
    task: str = "binary"
    positive_label: str = "1"
    label_horizon_s: float = 86400.0
    detectors: DetectorSettings = field(default_factory=DetectorSettings)
    budgets: Budgets = field(default_factory=Budgets)
    policy: PolicySettings = field(default_factory=PolicySettings)
    kill_switch: tuple[KillSwitchRule, ...] = ()

    def feature(self, name: str) -> FeatureConfig:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """The whole monitor file."""

    source: str
    models: Mapping[str, ModelConfig]
    config_hash: str

    @property
    def model_ids(self) -> frozenset[str]:
        return frozenset(self.models)


# --------------------------------------------------------------------------- parsing helpers


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {msg}")

    def mapping(self, v: object, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.err(path, f"expected a mapping, got {_yname(v)}")
        for k in v:
            if k not in allowed:
                raise self.err(
                    f"{path}.{k}" if path else str(k),
                    f"unknown key; valid keys: {', '.join(allowed)}",
                )
        return v

    def number(
        self,
        v: object,
        path: str,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        integer: bool = False,
    ) -> float:
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.err(path, f"{v!r} is not {kind}")
        if integer and not isinstance(v, int):
            raise self.err(path, f"{v!r} is not {kind}")
        if not math.isfinite(v):
            raise self.err(path, f"{v!r} is not finite")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self.err(path, f"{v!r} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and v > hi:
            raise self.err(path, f"{v!r} must be <= {hi:g}")
        return float(v)

    def choice(self, v: object, path: str, choices: tuple[str, ...]) -> str:
        if v not in choices:
            raise self.err(path, f"{v!r} is not valid; valid values: {', '.join(choices)}")
        return str(v)

    def string(self, v: object, path: str) -> str:
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise self.err(path, f"expected a string, got {_yname(v)}")
        return str(v)

    def strings(self, v: object, path: str) -> tuple[str, ...]:
        if not isinstance(v, list) or not v:
            raise self.err(path, f"expected a non-empty list of strings, got {_yname(v)}")
        out = tuple(self.string(x, f"{path}[{i}]") for i, x in enumerate(v))
        if len(set(out)) != len(out):
            dup = next(x for x in out if out.count(x) > 1)
            raise self.err(path, f"{dup!r} is listed twice")
        return out

    def boolean(self, v: object, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.err(path, f"{v!r} is not a boolean (true/false)")
        return v


def _yname(v: object) -> str:
    if v is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__
    )


_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def _duration(ctx: _Ctx, v: object, path: str) -> float:
    """Seconds from a number or a string like ``90s``, ``15m``, ``7d``."""
    if isinstance(v, str):
        m = _DURATION_RE.match(v)
        if not m:
            raise ctx.err(path, f"{v!r} is not a duration; use seconds or e.g. 90s, 15m, 2h, 7d")
        return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
    return ctx.number(v, path, lo=0)


def _dataclass_from(
    ctx: _Ctx, cls: Any, raw: object, path: str, durations: tuple[str, ...] = ()
) -> Any:
    names = tuple(f for f in cls.__dataclass_fields__)
    data = ctx.mapping(raw, path, names)
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        d = getattr(defaults, k)
        p = f"{path}.{k}"
        if k in durations:
            kwargs[k] = _duration(ctx, v, p)
        elif isinstance(d, bool):
            kwargs[k] = ctx.boolean(v, p)
        elif isinstance(d, int):
            kwargs[k] = int(ctx.number(v, p, lo=1, integer=True))
        else:
            kwargs[k] = ctx.number(v, p, lo=0)
    return cls(**kwargs)


# --------------------------------------------------------------------------- model parsing

_MODEL_KEYS: Final = (
    "features",
    "slices",
    "reference",
    "task",
    "positive_label",
    "label_horizon",
    "detectors",
    "budgets",
    "policy",
    "kill_switch",
)
_FEATURE_KEYS: Final = ("type", "required", "range", "categories")
_SLICE_KEYS: Final = ("max_values", "values")
_RULE_KEYS: Final = ("name", "when", "count", "sustain", "cooldown", "action", "target_version")
_WHEN_KEYS: Final = ("kind", "severity", "detector", "feature", "slice")


LLM_SIGNALS: Final = ("llm.input_tokens", "llm.output_tokens", "llm.retrieval_hits")
"""Numeric LLM signals a model may monitor like features (read from the event's ``llm{}``);
``llm.flags.<name>`` monitors the rate of one boolean flag."""


def is_llm_signal(name: str) -> bool:
    """True for a monitored LLM signal name (``llm.output_tokens``, ``llm.flags.refusal``).

    >>> is_llm_signal("llm.flags.toxicity"), is_llm_signal("amount")
    (True, False)
    """
    return name in LLM_SIGNALS or (name.startswith("llm.flags.") and len(name) > 10)


def _feature(ctx: _Ctx, name: str, raw: object, path: str) -> FeatureConfig:
    data = ctx.mapping(raw, path, _FEATURE_KEYS)
    if "type" not in data:
        raise ctx.err(f"{path}.type", "required key is missing; valid values: numeric, categorical")
    ftype = ctx.choice(data["type"], f"{path}.type", ("numeric", "categorical"))
    if name.startswith("llm."):
        if not is_llm_signal(name):
            raise ctx.err(
                path,
                f"{name!r} is not an LLM signal; valid values: {', '.join(LLM_SIGNALS)}, "
                "llm.flags.<flag name>",
            )
        if ftype != "numeric":
            raise ctx.err(f"{path}.type", "LLM signals are numeric; valid values: numeric")
    required = ctx.boolean(data["required"], f"{path}.required") if "required" in data else True
    rng: tuple[float, float] | None = None
    cats: tuple[str, ...] | None = None
    if "range" in data:
        if ftype != "numeric":
            raise ctx.err(f"{path}.range", "only numeric features have a range")
        r = data["range"]
        if not isinstance(r, list) or len(r) != 2:
            raise ctx.err(f"{path}.range", f"expected [lo, hi], got {r!r}")
        lo = ctx.number(r[0], f"{path}.range[0]")
        hi = ctx.number(r[1], f"{path}.range[1]")
        if not lo < hi:
            raise ctx.err(f"{path}.range", f"lo ({r[0]}) must be < hi ({r[1]})")
        rng = (lo, hi)
    if "categories" in data:
        if ftype != "categorical":
            raise ctx.err(f"{path}.categories", "only categorical features have categories")
        cats = ctx.strings(data["categories"], f"{path}.categories")
    return FeatureConfig(name, ftype, required, rng, cats)


def _rule(ctx: _Ctx, raw: object, path: str, versions_hint: str) -> KillSwitchRule:
    data = ctx.mapping(raw, path, _RULE_KEYS)
    if "name" not in data:
        raise ctx.err(f"{path}.name", "required key is missing")
    name = ctx.string(data["name"], f"{path}.name")
    if "when" not in data:
        raise ctx.err(
            f"{path}.when", f"required key is missing; valid keys: {', '.join(_WHEN_KEYS)}"
        )
    when = ctx.mapping(data["when"], f"{path}.when", _WHEN_KEYS)
    if "kind" not in when:
        raise ctx.err(
            f"{path}.when.kind", f"required key is missing; valid values: {', '.join(KINDS)}"
        )
    kv = when["kind"]
    kinds = tuple(kv) if isinstance(kv, list) else (kv,)
    for i, k in enumerate(kinds):
        ctx.choice(k, f"{path}.when.kind" + (f"[{i}]" if isinstance(kv, list) else ""), KINDS)
    sev = ctx.choice(when.get("severity", "critical"), f"{path}.when.severity", SEVERITIES)
    action = ctx.choice(data.get("action", "rollback"), f"{path}.action", ACTIONS)
    target = data.get("target_version")
    if action == "rollback" and target is None:
        raise ctx.err(f"{path}.target_version", "required when action is rollback")
    return KillSwitchRule(
        name=name,
        kinds=tuple(str(k) for k in kinds),
        min_severity=sev,
        detector=ctx.string(when["detector"], f"{path}.when.detector")
        if "detector" in when
        else None,
        feature=ctx.string(when["feature"], f"{path}.when.feature") if "feature" in when else None,
        slice=ctx.string(when["slice"], f"{path}.when.slice") if "slice" in when else None,
        count=int(ctx.number(data.get("count", 1), f"{path}.count", lo=1, integer=True)),
        sustain_s=_duration(ctx, data.get("sustain", 0), f"{path}.sustain"),
        cooldown_s=_duration(ctx, data.get("cooldown", 3600), f"{path}.cooldown"),
        action=action,
        target_version=None if target is None else ctx.string(target, f"{path}.target_version"),
    )


def _model(ctx: _Ctx, model_id: str, raw: object, base_dir: Path | None) -> ModelConfig:
    path = f"models.{model_id}"
    if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id):
        raise ctx.err(
            path, "model ids are 1-64 characters [A-Za-z0-9_.-] starting with a letter or digit"
        )
    data = ctx.mapping(raw, path, _MODEL_KEYS)
    feats_raw = data.get("features")
    if not isinstance(feats_raw, dict) or not feats_raw:
        raise ctx.err(f"{path}.features", "expected a non-empty mapping of feature name → settings")
    features = tuple(_feature(ctx, str(n), v, f"{path}.features.{n}") for n, v in feats_raw.items())
    slices: list[SliceConfig] = []
    sl_raw = data.get("slices") or {}
    if not isinstance(sl_raw, dict):
        raise ctx.err(
            f"{path}.slices", f"expected a mapping of slice name → settings, got {_yname(sl_raw)}"
        )
    for n, v in sl_raw.items():
        sp = f"{path}.slices.{n}"
        sd = ctx.mapping(v, sp, _SLICE_KEYS)
        mv = int(
            ctx.number(sd.get("max_values", 16), f"{sp}.max_values", lo=1, hi=256, integer=True)
        )
        vals = ctx.strings(sd["values"], f"{sp}.values") if "values" in sd else None
        if vals is not None and len(vals) > mv:
            raise ctx.err(f"{sp}.values", f"{len(vals)} values is more than max_values ({mv})")
        slices.append(SliceConfig(str(n), mv, vals))
    ref = data.get("reference")
    ref_path: str | None = None
    ref_inline: bytes | None = None
    if isinstance(ref, str):
        p = Path(ref)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        ref_path = str(p)
    elif isinstance(ref, dict):
        try:
            ref_inline = orjson.dumps(ref)
        except TypeError as err:  # e.g. a YAML date or set inside the profile
            raise ctx.err(f"{path}.reference", f"inline profile is not JSON data: {err}") from None
    elif ref is not None:
        raise ctx.err(f"{path}.reference", "expected a profile path or an inline profile mapping")
    task = ctx.choice(data.get("task", "binary"), f"{path}.task", TASKS)
    detectors = _dataclass_from(ctx, DetectorSettings, data.get("detectors"), f"{path}.detectors")
    if detectors.psi_critical <= detectors.psi_warn:
        raise ctx.err(
            f"{path}.detectors.psi_critical",
            f"{detectors.psi_critical:g} must be > psi_warn ({detectors.psi_warn:g})",
        )
    if detectors.bins < 2:
        raise ctx.err(f"{path}.detectors.bins", f"{detectors.bins} must be >= 2")
    budgets = _dataclass_from(ctx, Budgets, data.get("budgets"), f"{path}.budgets")
    if not 0 < budgets.latency_percentile < 100:
        raise ctx.err(f"{path}.budgets.latency_percentile", "must be in (0, 100)")
    policy = _dataclass_from(
        ctx, PolicySettings, data.get("policy"), f"{path}.policy", ("cooldown_s",)
    )
    if not 0 <= policy.hysteresis < 1:
        raise ctx.err(f"{path}.policy.hysteresis", f"{policy.hysteresis:g} must be in [0, 1)")
    rules_raw = data.get("kill_switch") or []
    if not isinstance(rules_raw, list):
        raise ctx.err(f"{path}.kill_switch", f"expected a list of rules, got {_yname(rules_raw)}")
    rules = tuple(_rule(ctx, r, f"{path}.kill_switch[{i}]", "") for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ctx.err(f"{path}.kill_switch", "rule names must be unique")
    for r in rules:
        fnames = [f.name for f in features]
        if r.feature is not None and r.feature not in fnames:
            raise ctx.err(
                f"{path}.kill_switch.{r.name}.when.feature",
                f"{r.feature!r} is not a feature; valid values: {', '.join(fnames)}",
            )
    return ModelConfig(
        model_id=model_id,
        features=features,
        slices=tuple(slices),
        reference_path=ref_path,
        reference_inline=ref_inline,
        task=task,
        positive_label=ctx.string(data.get("positive_label", "1"), f"{path}.positive_label"),
        label_horizon_s=_duration(ctx, data.get("label_horizon", "1d"), f"{path}.label_horizon"),
        detectors=detectors,
        budgets=budgets,
        policy=policy,
        kill_switch=rules,
    )


def parse_config(doc: object, source: str, base_dir: Path | None = None) -> MonitorConfig:
    """Validate a parsed YAML document; ``source`` names the file in error messages."""
    ctx = _Ctx(source)
    top = ctx.mapping(doc, "", ("version", "models"))
    if "version" in top and top["version"] != 1:
        raise ctx.err("version", f"{top['version']!r} is not supported; valid values: 1")
    models_raw = top.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise ctx.err("models", "expected a non-empty mapping of model id → monitor settings")
    models = {str(k): _model(ctx, str(k), v, base_dir) for k, v in models_raw.items()}
    canon = orjson.dumps(
        {k: asdict(v) for k, v in models.items()},
        default=orjson.loads,  # an inline profile's bytes hash as the document they hold
        option=orjson.OPT_SORT_KEYS,
    )
    digest = hashlib.sha256(canon).hexdigest()[:16]
    return MonitorConfig(source=source, models=models, config_hash=digest)


_SAFE_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config_text(
    text: str, source: str = "<string>", base_dir: Path | None = None
) -> MonitorConfig:
    """Parse and validate YAML text; a JSON document (YAML's JSON subset) is read as JSON.

    A fleet's generated config with inline profiles is large: 1,000 models × 20 features
    is 6.8 MB. PyYAML's pure-Python parser took 26 s and left the worker at 800 MB RSS
    before any event (its transient objects stay fragmented); libyaml (used when PyYAML
    has it) ~6 s and ~400 MB; orjson 0.05 s. So a document starting with ``{`` is
    parsed as JSON first, and YAML (libyaml, else Python) parses everything else and any
    JSON that orjson refuses."""
    if text.lstrip().startswith("{"):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # YAML flow style, comments, ...: YAML decides
        else:
            return parse_config(doc, source, base_dir)
    try:
        doc = yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    return parse_config(doc, source, base_dir)


def load_config(path: str | Path) -> MonitorConfig:
    """Load and validate a monitor file; reference paths resolve relative to it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    return load_config_text(text, source=p.name, base_dir=p.parent)


# --------------------------------------------------------------------------- service settings

TOPIC_DEFAULTS: Final = {
    "predictions": "driftline.predictions",
    "labels": "driftline.labels",
    "summaries": "driftline.summaries",
    "alerts": "driftline.alerts",
    "control": "driftline.control",
    "deadletter": "driftline.deadletter",
}
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Topics:
    predictions: str = TOPIC_DEFAULTS["predictions"]
    labels: str = TOPIC_DEFAULTS["labels"]
    summaries: str = TOPIC_DEFAULTS["summaries"]
    alerts: str = TOPIC_DEFAULTS["alerts"]
    control: str = TOPIC_DEFAULTS["control"]
    deadletter: str = TOPIC_DEFAULTS["deadletter"]


@dataclass(frozen=True)
class ServiceSettings:
    """Runtime settings from ``DRIFTLINE_*`` environment variables.

    Consumer batching (both stages; see ``stream.worker.StageRunner._take``): a batch is
    the records gathered for up to ``batch_within_s`` (``DRIFTLINE_BATCH_WITHIN_S``, default
    0.2) after the first one arrived, closed early once it holds ``batch_size`` records
    (``DRIFTLINE_BATCH_SIZE``, default 10,000 Kafka messages, each one event or an SDK batch
    of up to 500). ``fetch_partition_bytes`` (``DRIFTLINE_FETCH_PARTITION_BYTES``, default
    8 MiB, at least 1 KiB) is the consumer's ``max_partition_fetch_bytes``: how much one
    fetch request brings per partition (raised from 1 MiB: 1.9-2.3x the worker's
    throughput and ~0.65x its CPU per event, ``load_tests/results/batching.json``).

    ``heap_trim_s`` (``DRIFTLINE_HEAP_TRIM_S``, default 10, 0 = off): how often the worker
    hands freed heap pages back to the OS (:mod:`stream.heap`); without it a worker's RSS
    stays at its backlog peak (1,471 MB instead of ~600 MB at 1,000 models x 20 features).

    ``max_summaries_per_commit`` (``DRIFTLINE_MAX_SUMMARIES_PER_COMMIT``, default 2,000):
    stage 1 splits a batch into several commits when it would close more ticks than this
    (a backlog of many models); see ``stream.worker.IngestRunner._learn_output_rate``.

    Secrets (SASL password, API token) are excluded from ``repr`` and from :meth:`redacted`,
    so logging the settings never leaks them.
    """

    kafka_bootstrap: str = "localhost:9092"
    redis_url: str = field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    topics: Topics = field(default_factory=Topics)
    tick_s: float = 1.0
    allowed_lateness_s: float = 5.0
    batch_size: int = 10_000
    batch_within_s: float = 0.2
    fetch_partition_bytes: int = 8 << 20
    heap_trim_s: float = 10.0
    max_summaries_per_commit: int = 2_000
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    web_bind: str = "127.0.0.1:6066"
    api_token: str | None = field(default=None, repr=False)
    config_path: str = "monitors.yaml"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read settings from ``env`` (default ``os.environ``); errors name the variable."""
        e = os.environ if env is None else env

        def num(name: str, default: float, lo: float, integer: bool = False) -> float:
            raw = e.get(name)
            if raw is None or raw == "":
                return default
            try:
                v = int(raw) if integer else float(raw)
            except ValueError:
                raise ConfigError(
                    f"{name}: {raw!r} is not {'an integer' if integer else 'a number'}"
                ) from None
            if not math.isfinite(v) or v < lo:
                raise ConfigError(f"{name}: {raw!r} must be >= {lo:g}")
            return v

        def choice(name: str, default: str | None, choices: tuple[str, ...]) -> str | None:
            raw = e.get(name) or default
            if raw is not None and raw not in choices:
                raise ConfigError(
                    f"{name}: {raw!r} is not valid; valid values: {', '.join(choices)}"
                )
            return raw

        token = e.get("DRIFTLINE_API_TOKEN") or None
        token_file = e.get("DRIFTLINE_API_TOKEN_FILE")
        if token is None and token_file:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip() or None
            except OSError as err:
                raise ConfigError(
                    f"DRIFTLINE_API_TOKEN_FILE: cannot read {token_file}: {err.strerror}"
                ) from None
        topics = Topics(
            **{k: e.get(f"DRIFTLINE_TOPIC_{k.upper()}") or v for k, v in TOPIC_DEFAULTS.items()}
        )
        proto = choice("DRIFTLINE_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", SECURITY_PROTOCOLS)
        mech = choice("DRIFTLINE_KAFKA_SASL_MECHANISM", None, SASL_MECHANISMS)
        if proto is not None and proto.startswith("SASL") and mech is None:
            raise ConfigError(
                "DRIFTLINE_KAFKA_SASL_MECHANISM: required when the security protocol is "
                f"{proto}; valid values: {', '.join(SASL_MECHANISMS)}"
            )
        return cls(
            kafka_bootstrap=e.get("DRIFTLINE_KAFKA_BOOTSTRAP") or cls.kafka_bootstrap,
            redis_url=e.get("DRIFTLINE_REDIS_URL") or cls.redis_url,
            topics=topics,
            tick_s=num("DRIFTLINE_TICK_S", 1.0, 0.001),
            allowed_lateness_s=num("DRIFTLINE_ALLOWED_LATENESS_S", 5.0, 0.0),
            batch_size=int(num("DRIFTLINE_BATCH_SIZE", 10_000, 1, integer=True)),
            batch_within_s=num("DRIFTLINE_BATCH_WITHIN_S", 0.2, 0.0),
            fetch_partition_bytes=int(
                num("DRIFTLINE_FETCH_PARTITION_BYTES", 8 << 20, 1024, integer=True)
            ),
            heap_trim_s=num("DRIFTLINE_HEAP_TRIM_S", 10.0, 0.0),
            max_summaries_per_commit=int(
                num("DRIFTLINE_MAX_SUMMARIES_PER_COMMIT", 2_000, 1, integer=True)
            ),
            security_protocol=proto or "PLAINTEXT",
            sasl_mechanism=mech,
            sasl_username=e.get("DRIFTLINE_KAFKA_SASL_USERNAME") or None,
            sasl_password=e.get("DRIFTLINE_KAFKA_SASL_PASSWORD") or None,
            ssl_cafile=e.get("DRIFTLINE_KAFKA_SSL_CAFILE") or None,
            ssl_certfile=e.get("DRIFTLINE_KAFKA_SSL_CERTFILE") or None,
            ssl_keyfile=e.get("DRIFTLINE_KAFKA_SSL_KEYFILE") or None,
            web_bind=e.get("DRIFTLINE_WEB_BIND") or cls.web_bind,
            api_token=token,
            config_path=e.get("DRIFTLINE_CONFIG") or cls.config_path,
        )

    def redacted(self) -> dict[str, Any]:
        """Settings safe to log: secrets replaced by ``"***"`` (or None when unset)."""
        out = asdict(self)
        for k in ("sasl_password", "api_token"):
            out[k] = None if out[k] is None else "***"
        out["redis_url"] = redact_url(self.redis_url)
        return out


def redact_url(url: str) -> str:
    """``url`` with its password (and only that) replaced by ``***``.

    >>> redact_url("rediss://driftline:s3cret@redis:6380/0")
    'rediss://driftline:***@redis:6380/0'
    >>> redact_url("redis://:s3cret@redis:6379/0"), redact_url("redis://redis:6379/0")
    ('redis://:***@redis:6379/0', 'redis://redis:6379/0')
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
