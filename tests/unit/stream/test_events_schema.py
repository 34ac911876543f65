"""The hand-written validators accept exactly what the shipped JSON Schemas accept."""

from __future__ import annotations

import math
from typing import Any

import fastjsonschema
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import Decoder, load_schema

PRED_SCHEMA = fastjsonschema.compile(load_schema("prediction"))
LABEL_SCHEMA = fastjsonschema.compile(load_schema("label"))

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
SHORT_TEXT = st.text(max_size=8)
TRICKY_TEXT = st.one_of(
    SHORT_TEXT,
    st.sampled_from(["", "fraud", "fraud\n", "a" * 64, "a" * 65, "-x", "x y", "m.v_1-2", "ü"]),
    st.text(min_size=120, max_size=210),
)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), INT64, FLOATS, TRICKY_TEXT)
JSON_ANY = st.recursive(
    JSON_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(SHORT_TEXT, inner, max_size=3)
    ),
    max_leaves=6,
)
NUMBERISH = st.one_of(INT64, FLOATS, st.sampled_from([0, -0.0, -1, 1.0, 2.5, -1e-9]))


def mostly(valid: st.SearchStrategy[Any], tricky: st.SearchStrategy[Any]) -> Any:
    """``valid`` 19 times in 20, else ``tricky`` (which may or may not be valid)."""
    return st.integers(0, 19).flatmap(lambda i: tricky if i == 0 else valid)


ID = mostly(st.text(min_size=1, max_size=30), TRICKY_TEXT)
MODEL_ID = mostly(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), TRICKY_TEXT)
NONNEG = mostly(st.one_of(st.floats(0, 1e12), st.integers(0, 2**40)), NUMBERISH)
SCALAR_OK = st.one_of(st.none(), st.booleans(), INT64, FLOATS, st.text(max_size=10))


def _valid_prediction() -> st.SearchStrategy[dict[str, Any]]:
    feature_value = mostly(SCALAR_OK, st.sampled_from([[1], {"a": 1}]))
    feature_name = mostly(SHORT_TEXT, st.sampled_from(["k" * 128, "k" * 129]))
    llm = st.fixed_dictionaries(
        {},
        optional={
            "prompt_version": mostly(st.text(max_size=20), st.one_of(TRICKY_TEXT, INT64)),
            "input_tokens": mostly(
                st.integers(0, 10**6), st.sampled_from([-2, 3.0, 3.5, "3", 1e300])
            ),
            "output_tokens": st.integers(0, 5000),
            "retrieval_hits": st.integers(0, 10),
            "flags": st.dictionaries(
                SHORT_TEXT, mostly(st.booleans(), st.integers(0, 1)), max_size=3
            ),
        },
    )
    return st.fixed_dictionaries(
        {
            "event_id": ID,
            "model_id": MODEL_ID,
            "model_version": mostly(st.text(min_size=1, max_size=64), TRICKY_TEXT),
            "request_id": ID,
            "ts": mostly(NONNEG, st.sampled_from(["1", None, -1])),
            "features": mostly(
                st.dictionaries(feature_name, feature_value, max_size=5), st.sampled_from([[], 1])
            ),
            "prediction": mostly(st.one_of(st.booleans(), INT64, FLOATS, SHORT_TEXT), JSON_ANY),
        },
        optional={
            "score": mostly(st.one_of(FLOATS, st.none()), st.just("0.5")),
            "latency_ms": NONNEG,
            "cost_usd": mostly(NONNEG, st.just(True)),
            "slice": mostly(
                st.dictionaries(SHORT_TEXT, st.text(max_size=20), max_size=3),
                st.one_of(
                    st.dictionaries(SHORT_TEXT, st.one_of(TRICKY_TEXT, INT64), max_size=3),
                    st.just("eu"),
                ),
            ),
            "llm": mostly(llm, st.one_of(st.just([]), st.just({"extra": 1}))),
        },
    )


def _mutate(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    d = dict(base)
    op = draw(st.sampled_from(["none"] * 6 + ["drop", "replace", "add"]))
    if op == "add":
        d[draw(st.sampled_from(["unexpected", "label", "event_id"]))] = draw(JSON_ANY)
    elif op == "drop" and d:
        d.pop(draw(st.sampled_from(sorted(d))))
    elif op == "replace" and d:
        d[draw(st.sampled_from(sorted(d)))] = draw(JSON_ANY)
    return d


@st.composite
def predictions(draw: st.DrawFn) -> Any:
    doc = _mutate(draw, draw(_valid_prediction()))
    return draw(mostly(st.just(doc), JSON_ANY))


@st.composite
def labels(draw: st.DrawFn) -> Any:
    base = draw(
        st.fixed_dictionaries(
            {
                "event_id": TRICKY_TEXT,
                "model_id": TRICKY_TEXT,
                "request_id": TRICKY_TEXT,
                "ts": NUMBERISH,
                "label": JSON_SCALAR,
            },
            optional={"extra": JSON_ANY},
        )
    )
    return _mutate(draw, base)


def _schema_accepts(validator: Any, doc: Any) -> bool:
    try:
        validator(doc)
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


def _decoder_accepts(kind: str, raw: bytes) -> bool:
    dec = Decoder(kind, None, max_future_s=math.inf)  # type: ignore[arg-type]
    ok, bad = dec.decode(raw, now=0.0)
    assert len(ok) + len(bad) == 1
    return bool(ok)


SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(predictions())
def test_prediction_validator_matches_json_schema(doc: Any) -> None:
    expected = _schema_accepts(PRED_SCHEMA, orjson.loads(orjson.dumps(doc)))
    # as a one-element array message, and bare (a bare list is an array message itself)
    assert _decoder_accepts("prediction", orjson.dumps([doc])) == expected, doc
    if not isinstance(doc, list):
        assert _decoder_accepts("prediction", orjson.dumps(doc)) == expected, doc


@SETTINGS
@given(labels())
def test_label_validator_matches_json_schema(doc: Any) -> None:
    expected = _schema_accepts(LABEL_SCHEMA, orjson.loads(orjson.dumps(doc)))
    # as a one-element array message, and bare (a bare list is an array message itself)
    assert _decoder_accepts("label", orjson.dumps([doc])) == expected, doc
    if not isinstance(doc, list):
        assert _decoder_accepts("label", orjson.dumps(doc)) == expected, doc


def test_corpus_exercises_both_outcomes() -> None:
    """Guard against a generator that (almost) only produces valid or invalid events."""
    outcomes: list[bool] = []

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(predictions())
    def collect(doc: Any) -> None:
        outcomes.append(_schema_accepts(PRED_SCHEMA, orjson.loads(orjson.dumps(doc))))

    collect()
    share = sum(outcomes) / len(outcomes)
    assert 0.08 < share < 0.9, share
