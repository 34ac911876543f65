"""Event contracts and the fast decoder for stage 1.

The JSON Schemas in ``stream/schemas/`` are the contract (the producer SDK uses them too);
this module checks the same rules with hand-written code, because a generic JSON-Schema
validator costs tens of µs per event and stage 1 must sustain 100k events/s in one
process. ``tests/unit/stream/test_events_schema.py`` proves on a generated corpus that the
hand-written validator accepts exactly what the JSON Schema accepts.

Rules beyond the schema (JSON itself cannot express them):

* ``NaN`` / ``Infinity`` tokens (emitted by Python's ``json`` module) are parsed leniently:
  inside ``features`` they are accepted and counted by stage 1 as a data-quality signal
  (``nan``), anywhere else the event is rejected with ``non_finite``.
* ``ts`` more than ``max_future_s`` after the caller's ``now`` → ``future_timestamp``.
* ``model_id`` not in the configured models → ``unknown_model``.
* an ``event_id`` seen recently on the same decoder (bounded window) → ``duplicate_event_id``.

Every rejection carries a reason code from the bounded set :data:`REASONS` (safe as a metric
label) and a human message naming the field.

>>> dec = Decoder("prediction", known_models=frozenset({"fraud"}))
>>> ok, bad = dec.decode(b'[{"event_id":"e1","model_id":"fraud","model_version":"v1",'
...     b'"request_id":"r1","ts":10,"features":{"amount":3.5},"prediction":1},'
...     b'{"event_id":"e2","model_id":"spam"}]', now=100.0)
>>> ok[0].features, ok[0].ts
({'amount': 3.5}, 10.0)
>>> bad[0].reason, bad[0].position, bad[0].message
('unknown_model', 1, "model_id: 'spam' is not a configured model; valid values: 'fraud'")
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import orjson

EventKind = Literal["prediction", "label"]

PREDICTION_FIELDS: Final = (
    "event_id",
    "model_id",
    "model_version",
    "request_id",
    "ts",
    "features",
    "prediction",
    "score",
    "latency_ms",
    "cost_usd",
    "slice",
    "llm",
)
LABEL_FIELDS: Final = ("event_id", "model_id", "request_id", "ts", "label")
_PRED_REQUIRED: Final = ("event_id", "model_version", "request_id", "ts", "features", "prediction")
_LABEL_REQUIRED: Final = ("event_id", "request_id", "ts", "label")
_LLM_FIELDS: Final = frozenset(
    {"prompt_version", "input_tokens", "output_tokens", "retrieval_hits", "flags"}
)

REASONS: Final[tuple[str, ...]] = (
    "not_json",
    "not_object",
    "too_large",
    "too_many_events",
    "missing_model_id",
    "unknown_model",
    "non_finite",
    "future_timestamp",
    "duplicate_event_id",
    "unknown_topic",
    "schema:unexpected_field",
    *(f"schema:{f}" for f in dict.fromkeys(PREDICTION_FIELDS + LABEL_FIELDS)),
)
"""Every reason code a rejection can carry (bounded: safe as a Prometheus label)."""

MODEL_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_NAN_TOKENS: Final = (b"NaN", b"Infinity")
_INF: Final = math.inf
_NONE_T: Final = type(None)
_DICT_T: Final = frozenset({dict})
_STR_T: Final = frozenset({str})
_TS_T: Final = frozenset({float, int})
_OPT_FLOAT_T: Final = frozenset({float, _NONE_T})
_TARGET_T: Final = frozenset({float, int, str, bool})
_FEATURE_T: Final = frozenset({float, int, str, bool, _NONE_T})
# builds a NamedTuple from a row in C (its own __new__ is a Python function): one call less
_TUPLE_NEW: Final = tuple.__new__
_SHORT_NAMES_MAX: Final = 65_536  # bound of a decoder's cache of valid feature names


class LLMInfo(NamedTuple):
    """Optional LLM details of a prediction."""

    prompt_version: str | None
    input_tokens: int | None
    output_tokens: int | None
    retrieval_hits: int | None
    flags: dict[str, bool] | None


class Prediction(NamedTuple):
    """A validated prediction event."""

    event_id: str
    model_id: str
    model_version: str
    request_id: str
    ts: float
    features: dict[str, Any]
    prediction: float | int | str | bool
    score: float | None = None
    latency_ms: float | None = None
    cost_usd: float | None = None
    slice: dict[str, str] | None = None
    llm: LLMInfo | None = None


class Label(NamedTuple):
    """A validated label event."""

    event_id: str
    model_id: str
    request_id: str
    ts: float
    label: float | int | str | bool


class Reject(NamedTuple):
    """One rejected event (or whole message when ``index == -1``)."""

    reason: str
    message: str
    position: int = -1  # index inside a JSON-array message; -1 = the whole message
    event_id: str | None = None
    model_id: str | None = None
    raw: bytes | None = None  # the event's own bytes (array elements); None = the message


class RawMessage(NamedTuple):
    """One Kafka message as stage 1 receives it (value is the raw bytes)."""

    topic: str
    partition: int
    offset: int
    value: bytes


class DecodeError(ValueError):
    """Raised by :func:`validate_prediction` / :func:`validate_label` on a bad event."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- helpers


def _is_num(v: object) -> bool:
    t = type(v)
    return t is float or t is int


def _is_int(v: object) -> bool:
    t = type(v)
    return t is int or (t is float and v.is_integer())  # type: ignore[attr-defined]


def _fail(field: str, message: str, reason: str | None = None) -> DecodeError:
    return DecodeError(reason or f"schema:{field}", f"{field}: {message}")


def _str_field(d: dict[str, Any], field: str, lo: int, hi: int) -> str:
    v = d[field]
    if type(v) is not str:
        raise _fail(field, f"expected a string, got {_tname(v)}")
    n = len(v)
    if n < lo or n > hi:
        raise _fail(field, f"length {n} is outside [{lo}, {hi}]")
    return v


def _tname(v: object) -> str:
    if v is None:
        return "null"
    t = type(v)
    if t is bool:
        return "boolean"
    if t is int or t is float:
        return "number"
    if t is str:
        return "string"
    if t is list:
        return "array"
    if t is dict:
        return "object"
    return t.__name__


def _model_id(d: dict[str, Any], known: frozenset[str] | None) -> str:
    if "model_id" not in d:
        raise DecodeError("missing_model_id", "model_id: required field is missing")
    v = d["model_id"]
    if known is not None and v in known:
        return v  # type: ignore[no-any-return]
    if type(v) is not str or MODEL_ID_RE.fullmatch(v) is None:
        raise _fail(
            "model_id",
            f"{v!r} must be a string of 1-64 characters [A-Za-z0-9_.-] starting with a "
            "letter or digit",
        )
    if known is not None:
        valid = ", ".join(repr(m) for m in sorted(known))
        raise DecodeError(
            "unknown_model", f"model_id: {v!r} is not a configured model; valid values: {valid}"
        )
    return v


def _ts(d: dict[str, Any]) -> float:
    v = d["ts"]
    if not _is_num(v):
        raise _fail("ts", f"expected a number (seconds since the epoch), got {_tname(v)}")
    if v < 0:
        raise _fail("ts", f"{v!r} must be >= 0")
    f = float(v)
    if not math.isfinite(f):
        raise _fail("ts", f"{v!r} is not finite", "non_finite")
    return f


def _opt_nonneg(d: dict[str, Any], field: str) -> float | None:
    v = d.get(field)
    if v is None and field in d:
        raise _fail(field, "expected a number >= 0, got null")
    if v is None:
        return None
    if not _is_num(v):
        raise _fail(field, f"expected a number >= 0, got {_tname(v)}")
    if v < 0:
        raise _fail(field, f"{v!r} must be >= 0")
    f = float(v)
    if not math.isfinite(f):
        raise _fail(field, f"{v!r} is not finite", "non_finite")
    return f


def _check_keys(d: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            valid = ", ".join(sorted(allowed))
            raise DecodeError(
                "schema:unexpected_field" if where == "" else f"schema:{where}",
                f"{where + '.' if where else ''}{k}: unexpected field; valid fields: {valid}",
            )


_SCALAR_TYPES: Final = frozenset({float, int, str, bool, type(None)})
_STR_TYPE: Final = frozenset({str})
_BOOL_TYPE: Final = frozenset({bool})


def _obj_map(v: object, field: str, max_props: int, check: str, max_str: int = 0) -> dict[str, Any]:
    if type(v) is not dict:
        raise _fail(field, f"expected an object, got {_tname(v)}")
    if len(v) > max_props:
        raise _fail(field, f"has {len(v)} properties, more than the maximum {max_props}")
    if not v:
        return v
    # fast path (C loops); the slow loop below only runs to name the offending entry
    if max(map(len, v)) <= 128:
        if check == "scalar":
            if _SCALAR_TYPES.issuperset(map(type, v.values())):
                return v
        elif check == "str":
            vals = v.values()
            if _STR_TYPE.issuperset(map(type, vals)) and max(map(len, vals)) <= max_str:
                return v
        elif _BOOL_TYPE.issuperset(map(type, v.values())):
            return v
    for k, x in v.items():
        if len(k) > 128:
            raise _fail(field, f"property name {k[:40]!r}... is longer than 128 characters")
        t = type(x)
        if check == "scalar":
            if not (t is float or t is int or t is str or t is bool or x is None):
                raise _fail(
                    field,
                    f"{k}: expected a number, string, boolean or null, got {_tname(x)}",
                )
        elif check == "str":
            if t is not str:
                raise _fail(field, f"{k}: expected a string, got {_tname(x)}")
            if len(x) > max_str:
                raise _fail(field, f"{k}: string longer than {max_str} characters")
        elif t is not bool:
            raise _fail(field, f"{k}: expected a boolean, got {_tname(x)}")
    return v


def _llm(v: object) -> LLMInfo:
    if type(v) is not dict:
        raise _fail("llm", f"expected an object, got {_tname(v)}")
    _check_keys(v, _LLM_FIELDS, "llm")
    pv = v.get("prompt_version")
    if "prompt_version" in v and (type(pv) is not str or len(pv) > 128):
        raise _fail("llm", "prompt_version: expected a string of at most 128 characters")
    ints: list[int | None] = []
    for name in ("input_tokens", "output_tokens", "retrieval_hits"):
        if name in v:
            x = v[name]
            if not _is_int(x) or x < 0:
                raise _fail("llm", f"{name}: expected an integer >= 0, got {x!r}")
            ints.append(int(x))
        else:
            ints.append(None)
    flags = _obj_map(v["flags"], "llm", 64, "bool") if "flags" in v else None
    return LLMInfo(pv, ints[0], ints[1], ints[2], flags)


def _target(v: object, field: str) -> float | int | str | bool:
    t = type(v)
    if t is float:
        if not math.isfinite(v):  # type: ignore[arg-type]
            raise _fail(field, f"{v!r} is not finite", "non_finite")
        return v  # type: ignore[return-value]
    if t is int or t is str or t is bool:
        return v  # type: ignore[return-value]
    raise _fail(field, f"expected a number, string or boolean, got {_tname(v)}")


# --------------------------------------------------------------------------- validators


def validate_prediction(d: object, known: frozenset[str] | None = None) -> Prediction:
    """Validate one decoded JSON value as a prediction; raise :class:`DecodeError`.

    ``known`` (the configured model ids) is checked right after ``model_id`` itself, so an
    event of an unconfigured model is reported as ``unknown_model`` whatever else is wrong.
    """
    if type(d) is not dict:
        raise DecodeError("not_object", f"event: expected a JSON object, got {_tname(d)}")
    model_id = d.get("model_id")
    if known is None or type(model_id) is not str or model_id not in known:
        model_id = _model_id(d, known)
    if not d.keys() <= _PRED_ALLOWED:
        _check_keys(d, _PRED_ALLOWED, "")
    # Fast path: straight-line checks of the common case; anything unusual falls back to
    # the helpers, which raise the precise error (or accept an unusual but valid value).
    get = d.get
    event_id: Any = get("event_id")
    version: Any = get("model_version")
    request_id: Any = get("request_id")
    ts: Any = get("ts")
    features: Any = get("features")
    prediction: Any = get("prediction")
    if (
        prediction is None
        or features is None
        or ts is None
        or event_id is None
        or version is None
        or request_id is None
    ):
        for f in _PRED_REQUIRED:
            if f not in d:
                raise _fail(f, "required field is missing")
    if type(event_id) is not str or not 0 < len(event_id) <= 200:
        event_id = _str_field(d, "event_id", 1, 200)
    if type(version) is not str or not 0 < len(version) <= 64:
        version = _str_field(d, "model_version", 1, 64)
    if type(request_id) is not str or not 0 < len(request_id) <= 200:
        request_id = _str_field(d, "request_id", 1, 200)
    if type(ts) is float and 0.0 <= ts < _INF:
        pass
    elif type(ts) is int and ts >= 0:
        ts = float(ts)
    else:
        ts = _ts(d)
    if type(features) is not dict:
        raise _fail("features", f"expected an object, got {_tname(features)}")
    _obj_map(features, "features", 512, "scalar")
    tp = type(prediction)
    if not (tp is int or tp is str or tp is bool or (tp is float and -_INF < prediction < _INF)):
        prediction = _target(prediction, "prediction")
    score: Any = get("score")
    if score is not None and not (type(score) is float and -_INF < score < _INF):
        if not _is_num(score):
            raise _fail("score", f"expected a number or null, got {_tname(score)}")
        score = float(score)
        if not math.isfinite(score):
            raise _fail("score", f"{d['score']!r} is not finite", "non_finite")
    latency: Any = get("latency_ms")
    if not (type(latency) is float and 0.0 <= latency < _INF):
        latency = _opt_nonneg(d, "latency_ms") if "latency_ms" in d else None
    cost: Any = get("cost_usd")
    if not (type(cost) is float and 0.0 <= cost < _INF):
        cost = _opt_nonneg(d, "cost_usd") if "cost_usd" in d else None
    slc = _obj_map(d["slice"], "slice", 16, "str", 128) if "slice" in d else None
    llm = _llm(d["llm"]) if "llm" in d else None
    return Prediction(
        event_id,
        model_id,
        version,
        request_id,
        ts,
        features,
        prediction,
        score,
        latency,
        cost,
        slc,
        llm,
    )


def validate_label(d: object, known: frozenset[str] | None = None) -> Label:
    """Validate one decoded JSON value as a label; raise :class:`DecodeError`."""
    if type(d) is not dict:
        raise DecodeError("not_object", f"event: expected a JSON object, got {_tname(d)}")
    model_id = _model_id(d, known)
    if not d.keys() <= _LABEL_ALLOWED:
        _check_keys(d, _LABEL_ALLOWED, "")
    for f in _LABEL_REQUIRED:
        if f not in d:
            raise _fail(f, "required field is missing")
    event_id = _str_field(d, "event_id", 1, 200)
    request_id = _str_field(d, "request_id", 1, 200)
    ts = _ts(d)
    label = _target(d["label"], "label")
    return Label(event_id, model_id, request_id, ts, label)


_PRED_ALLOWED: Final = frozenset(PREDICTION_FIELDS)
_LABEL_ALLOWED: Final = frozenset(LABEL_FIELDS)


# --------------------------------------------------------------------------- decoder


class _DedupeWindow:
    """Bounded "recently seen" set: two generations of at most ``size`` ids each."""

    __slots__ = ("cur", "prev", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.cur: set[str] = set()
        self.prev: set[str] = set()

    def seen(self, key: str) -> bool:
        if key in self.cur or key in self.prev:
            return True
        self.cur.add(key)
        if len(self.cur) >= self.size:
            self.prev = self.cur
            self.cur = set()
        return False


def _column(docs: list[dict[str, Any]], name: str) -> list[Any]:
    """``[d.get(name) for d in docs]`` in one C-level pass."""
    return list(map(dict.get, docs, repeat(name)))


def _ids_ok(vals: list[Any], longest: int) -> bool:
    """Every value of a column is a string of 1 to ``longest`` characters."""
    if not _STR_T.issuperset(map(type, vals)):
        return False
    lens = list(map(len, vals))
    return min(lens) >= 1 and max(lens) <= longest


def _lenient_loads(raw: bytes) -> Any:
    """Parse JSON that contains NaN/Infinity tokens (Python ``json`` accepts them)."""
    return json.loads(raw)


def _element_bytes(d: object, lenient: bool) -> bytes:
    """One event of an array message as compact JSON (NaN/Infinity kept as tokens when the
    message had them): what its dead-letter record keeps instead of the whole message, so
    that rejecting the N events of one message does not store the message's head N times."""
    if lenient:
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    return orjson.dumps(d)


def _has_non_finite(v: object) -> bool:
    t = type(v)
    if t is float:
        return not math.isfinite(v)  # type: ignore[arg-type]
    if t is dict:
        return any(_has_non_finite(x) for x in v.values())  # type: ignore[attr-defined]
    if t is list:
        return any(_has_non_finite(x) for x in v)  # type: ignore[attr-defined]
    return False


class Decoder:
    """Decode raw Kafka message values into typed events and rejections.

    ``kind`` selects the contract ("prediction" or "label"). ``known_models`` (None = any)
    comes from the monitor config. The duplicate window is per decoder instance (one per
    stage-1 partition) and bounded to ``2 * dedupe_window`` ids; it is not persisted, so a
    duplicate that straddles a worker restart is not caught (the restart itself replays from
    the checkpoint and cannot double-count).
    """

    def __init__(
        self,
        kind: EventKind,
        known_models: frozenset[str] | None = None,
        *,
        max_message_bytes: int = 1 << 20,
        max_events_per_message: int = 10_000,
        max_future_s: float = 300.0,
        dedupe_window: int = 100_000,
    ) -> None:
        if kind not in ("prediction", "label"):
            raise ValueError(f"kind: {kind!r} is not valid; valid values: 'prediction', 'label'")
        self.kind: EventKind = kind
        self.known_models = known_models
        self.max_message_bytes = max_message_bytes
        self.max_events_per_message = max_events_per_message
        self.max_future_s = max_future_s
        self._dedupe = _DedupeWindow(dedupe_window)
        self._short_names: set[str] = set()
        self._validate = validate_prediction if kind == "prediction" else validate_label

    def decode(self, raw: bytes, now: float) -> tuple[list[Prediction] | list[Label], list[Reject]]:
        """Decode one message value (an event or a JSON array of events).

        ``now`` (seconds since the epoch) is the reference for ``future_timestamp``; it is a
        parameter so that replays and tests are deterministic.
        """
        events: list[Any] = []
        rejects: list[Reject] = []
        if len(raw) > self.max_message_bytes:
            rejects.append(
                Reject(
                    "too_large",
                    f"message: {len(raw)} bytes is more than the limit of "
                    f"{self.max_message_bytes} bytes",
                )
            )
            return events, rejects
        lenient = False
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            doc = None
            if "infinity" in str(err) or any(tok in raw for tok in _NAN_TOKENS):
                try:
                    doc = _lenient_loads(raw)
                    orjson.dumps(doc)  # the strict encoder refuses lone surrogates
                    lenient = True
                except (ValueError, RecursionError, TypeError):
                    doc = None
            if doc is None:
                rejects.append(Reject("not_json", f"message: not valid UTF-8 JSON ({err})"))
                return events, rejects
        if type(doc) is list:
            if len(doc) > self.max_events_per_message:
                rejects.append(
                    Reject(
                        "too_many_events",
                        f"message: {len(doc)} events is more than the limit of "
                        f"{self.max_events_per_message}",
                    )
                )
                return events, rejects
            items: Iterable[tuple[int, Any]] = enumerate(doc)
        else:
            items = ((-1, doc),)
        if not lenient:
            docs = doc if type(doc) is list else [doc]
            fast: list[Prediction] | list[Label] | None
            if self.kind == "prediction":
                fast = self._fast_predictions(docs, now)
            else:
                fast = self._fast_labels(docs, now)
            if fast is not None:
                return fast, rejects
        validate = self._validate
        known = self.known_models
        limit = now + self.max_future_s
        dedupe = self._dedupe
        for idx, d in items:
            try:
                ev = validate(d, known)
                if lenient and self.kind == "prediction":
                    for k in ev._fields:
                        if k != "features" and _has_non_finite(getattr(ev, k)):
                            raise DecodeError("non_finite", f"{k}: value is not finite")
                if ev.ts > limit:
                    raise DecodeError(
                        "future_timestamp",
                        f"ts: {ev.ts!r} is {ev.ts - now:.0f} s after now ({now:.0f}); "
                        f"the limit is {self.max_future_s:.0f} s",
                    )
                if dedupe.seen(ev.model_id + "\x00" + ev.event_id):
                    raise DecodeError(
                        "duplicate_event_id",
                        f"event_id: {ev.event_id!r} was already seen for model {ev.model_id!r}",
                    )
            except DecodeError as err:
                eid = d.get("event_id") if type(d) is dict else None
                mid = d.get("model_id") if type(d) is dict else None
                rejects.append(
                    Reject(
                        err.reason,
                        err.message,
                        idx,
                        eid if type(eid) is str else None,
                        mid if type(mid) is str else None,
                        None if idx < 0 else _element_bytes(d, lenient),
                    )
                )
                continue
            events.append(ev)
        return events, rejects

    def _fast_predictions(self, docs: list[Any], now: float) -> list[Prediction] | None:
        """All events of one strictly parsed message, validated column by column.

        Each rule of :func:`validate_prediction` is checked for the whole message at once
        with C-level passes (``map``, ``frozenset.issuperset``, ``min``/``max``) over the
        values of one field. It only ever accepts: it returns None as soon as anything is
        unusual (an error, an int where a float is common, ``llm``, an explicit null, a
        duplicate...), and the caller then validates event by event, which names the precise
        error — so the result is the same as the per-event path, only faster. The dedupe
        window is only touched once every check passed. Non-finite numbers cannot occur
        here: orjson (strict) refuses them, and lenient messages never come this way.
        """
        n = len(docs)
        if n == 0 or not _DICT_T.issuperset(map(type, docs)):
            return None
        if not _PRED_ALLOWED.issuperset(chain.from_iterable(docs)):
            return None

        def col(name: str) -> list[Any]:
            return _column(docs, name)

        def present(name: str) -> int:
            return sum(map(dict.__contains__, docs, repeat(name)))

        mids = col("model_id")
        if not self._model_ids_ok(mids):
            return None
        eids = col("event_id")
        versions = col("model_version")
        rids = col("request_id")
        if not (_ids_ok(eids, 200) and _ids_ok(versions, 64) and _ids_ok(rids, 200)):
            return None
        ts = self._ts_column(docs, now)
        if ts is None:
            return None
        feats = col("features")
        if not _DICT_T.issuperset(map(type, feats)) or max(map(len, feats)) > 512:
            return None
        if any(feats):
            names = self._short_names  # feature names already known to be <= 128 chars
            if not names.issuperset(chain.from_iterable(feats)):
                unseen = set(chain.from_iterable(feats)) - names
                if max(map(len, unseen)) > 128:
                    return None
                if len(names) + len(unseen) <= _SHORT_NAMES_MAX:
                    names |= unseen
            if not _FEATURE_T.issuperset(map(type, chain.from_iterable(map(dict.values, feats)))):
                return None
        preds = col("prediction")
        if not _TARGET_T.issuperset(map(type, preds)):
            return None
        scores = col("score")
        if not _OPT_FLOAT_T.issuperset(map(type, scores)):
            return None
        opt: list[list[Any]] = []
        for name in ("latency_ms", "cost_usd"):
            vals = col(name)
            if not _OPT_FLOAT_T.issuperset(map(type, vals)):
                return None
            nulls = vals.count(None)
            if nulls:  # absent is fine, an explicit null is not
                if present(name) != n - nulls:
                    return None
                if nulls < n and min(v for v in vals if v is not None) < 0:
                    return None
            elif min(vals) < 0:
                return None
            opt.append(vals)
        slices = col("slice")
        nulls = slices.count(None)
        if present("slice") != n - nulls:
            return None
        if nulls < n:
            given = [x for x in slices if x is not None] if nulls else slices
            if not _DICT_T.issuperset(map(type, given)) or max(map(len, given)) > 16:
                return None
            if any(given):
                if max(map(len, chain.from_iterable(given))) > 128:
                    return None
                vals = list(chain.from_iterable(map(dict.values, given)))
                if not _STR_T.issuperset(map(type, vals)) or max(map(len, vals)) > 128:
                    return None
        if present("llm"):
            return None
        if not self._dedupe_all(list(map("\x00".join, zip(mids, eids, strict=True)))):
            return None
        rows = zip(
            eids,
            mids,
            versions,
            rids,
            ts,
            feats,
            preds,
            scores,
            opt[0],
            opt[1],
            slices,
            repeat(None),
        )
        return list(map(_TUPLE_NEW, repeat(Prediction), rows))

    def _fast_labels(self, docs: list[Any], now: float) -> list[Label] | None:
        """All events of one strictly parsed label message, validated column by column
        (the rules of :func:`validate_label`); None as soon as anything is unusual, and the
        caller then validates event by event (see :meth:`_fast_predictions`)."""
        n = len(docs)
        if n == 0 or not _DICT_T.issuperset(map(type, docs)):
            return None
        if not _LABEL_ALLOWED.issuperset(chain.from_iterable(docs)):
            return None
        if sum(map(len, docs)) != len(_LABEL_ALLOWED) * n:  # every field is required
            return None
        mids = _column(docs, "model_id")
        if not self._model_ids_ok(mids):
            return None
        eids = _column(docs, "event_id")
        rids = _column(docs, "request_id")
        if not (_ids_ok(eids, 200) and _ids_ok(rids, 200)):
            return None
        ts = self._ts_column(docs, now)
        if ts is None:
            return None
        labels = _column(docs, "label")
        if not _TARGET_T.issuperset(map(type, labels)):
            return None
        if not self._dedupe_all(list(map("\x00".join, zip(mids, eids, strict=True)))):
            return None
        return list(map(_TUPLE_NEW, repeat(Label), zip(eids, mids, rids, ts, labels, strict=True)))

    def _model_ids_ok(self, mids: list[Any]) -> bool:
        """Every ``model_id`` of a column is a string of a configured model (or, with no
        configured set, matches :data:`MODEL_ID_RE`)."""
        if not _STR_T.issuperset(map(type, mids)):
            return False
        known = self.known_models
        if known is not None:
            return known.issuperset(mids)
        return None not in map(MODEL_ID_RE.fullmatch, mids)

    def _ts_column(self, docs: list[dict[str, Any]], now: float) -> list[Any] | None:
        """The ``ts`` column as floats when every one is a non-negative number at most
        ``max_future_s`` after ``now``; else None."""
        ts = _column(docs, "ts")
        ts_types = set(map(type, ts))
        if not _TS_T.issuperset(ts_types) or min(ts) < 0:
            return None
        if int in ts_types:
            ts = list(map(float, ts))
        return None if max(ts) > now + self.max_future_s else ts

    def _dedupe_all(self, keys: list[str]) -> bool:
        """Add ``keys`` to the dedupe window if none was seen and the window does not rotate
        meanwhile (then the per-event path would do exactly the same); else change nothing."""
        dedupe = self._dedupe
        cur = dedupe.cur
        if (
            len(set(keys)) != len(keys)
            or len(cur) + len(keys) >= dedupe.size
            or not cur.isdisjoint(keys)
            or not dedupe.prev.isdisjoint(keys)
        ):
            return False
        cur.update(keys)
        return True


# --------------------------------------------------------------------------- dead letters

DEADLETTER_RAW_LIMIT: Final = 4096


def deadletter_record(
    reject: Reject, msg: RawMessage, raw_limit: int = DEADLETTER_RAW_LIMIT
) -> dict[str, Any]:
    """The dead-letter record for ``reject`` (schema ``deadletter.schema.json``).

    The raw value is kept as base64 of its first ``raw_limit`` bytes, so the exact bytes
    survive whatever their encoding; ``raw_truncated`` says whether it was cut. For one
    event of a JSON-array message (``reject.raw`` set by the decoder) it is that event
    re-encoded as compact JSON instead of the message's head: a message of 10,000 rejected
    events then costs 10,000 small records, not 10,000 copies of its first 4 KiB. ``size``
    is always the whole message's size.
    """
    src = msg.value if reject.raw is None else reject.raw
    raw = src[:raw_limit]
    return {
        "deadletter_id": f"{msg.topic}:{msg.partition}:{msg.offset}:{reject.position}",
        "reason": reject.reason,
        "message": reject.message,
        "event_id": reject.event_id,
        "model_id": reject.model_id,
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "index": reject.position,
        "size": len(msg.value),
        "raw_b64": base64.b64encode(raw).decode("ascii"),
        "raw_truncated": len(src) > raw_limit,
    }


# --------------------------------------------------------------------------- schemas

SCHEMA_DIR: Final = Path(__file__).resolve().parent / "schemas"
SCHEMA_NAMES: Final = ("prediction", "label", "alert", "control", "deadletter", "summary")


def load_schema(name: str) -> dict[str, Any]:
    """Load one of the shipped JSON Schemas by name (see :data:`SCHEMA_NAMES`)."""
    if name not in SCHEMA_NAMES:
        valid = ", ".join(SCHEMA_NAMES)
        raise ValueError(f"schema: {name!r} is not valid; valid values: {valid}")
    text = (SCHEMA_DIR / f"{name}.schema.json").read_bytes()
    out: dict[str, Any] = orjson.loads(text)
    return out
