"""Reference profiles: what "normal" looks like for one model, built from a training snapshot.

A profile is versioned JSON (``schema: 1``) with a content-hash ``id`` (SHA-256 of the
canonical JSON of everything except ``id`` and ``source``), so the same data gives the same id
whatever file format or path it came from. It holds, per numeric feature, the reference
quantile bin edges and shares (the same bins stage 1 counts into and PSI compares against,
see :mod:`detectors.psi`), moments and the missing rate; per categorical feature the top-K
category shares plus "other"; the score distribution; the label distribution (and positive
rate); and the reference error rate when the snapshot has both predictions and labels.

Snapshots are CSV, Parquet (pyarrow) or JSONL. Columns are feature names plus optional
``score``, ``prediction`` and ``label``; JSONL rows may instead nest features under
``"features"`` like prediction events do.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import numpy.typing as npt
import orjson

from detectors.psi import PSISpec
from stream.config import ModelConfig

PROFILE_SCHEMA: Final = 1
MAX_CATEGORIES: Final = 50


class ProfileError(ValueError):
    """The snapshot or a stored profile is unusable; the message names the column/field."""


def norm_target(v: object) -> str:
    """Canonical string of a prediction/label value, so ``1``, ``1.0``, ``True``, ``"1"`` agree.

    >>> [norm_target(x) for x in (1, 1.0, True, "1", 0.5, "fraud", False)]
    ['1', '1', '1', '1', '0.5', 'fraud', '0']
    """
    t = type(v)
    if t is bool:
        return "1" if v else "0"
    if t is float:
        f: float = v  # type: ignore[assignment]
        return str(int(f)) if f.is_integer() else repr(f)
    if t is int:
        return str(v)
    return str(v)


@dataclass(frozen=True)
class NumericRef:
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    n: int
    missing_rate: float
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class CategoricalRef:
    categories: tuple[str, ...]
    proportions: tuple[float, ...]  # one per category, then "other"
    n: int
    missing_rate: float


@dataclass(frozen=True)
class Profile:
    """A loaded reference profile (see the module docstring for the JSON layout)."""

    id: str
    model_id: str
    numeric: Mapping[str, NumericRef]
    categorical: Mapping[str, CategoricalRef]
    score: NumericRef | None
    labels: CategoricalRef | None
    positive_rate: float | None
    error_rate: float | None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Profile:
        """Load a profile document; errors name the field."""
        if doc.get("schema") != PROFILE_SCHEMA:
            raise ProfileError(
                f"schema: {doc.get('schema')!r} is not supported "
                f"(this build reads {PROFILE_SCHEMA})"
            )
        try:
            numeric: dict[str, NumericRef] = {}
            categorical: dict[str, CategoricalRef] = {}
            for name, f in doc["features"].items():
                if f["type"] == "numeric":
                    numeric[name] = _numeric_ref(f)
                else:
                    categorical[name] = _categorical_ref(f)
            score = _numeric_ref(doc["score"]) if doc.get("score") else None
            labels = _categorical_ref(doc["labels"]) if doc.get("labels") else None
            return cls(
                id=str(doc["id"]),
                model_id=str(doc["model_id"]),
                numeric=numeric,
                categorical=categorical,
                score=score,
                labels=labels,
                positive_rate=doc.get("positive_rate"),
                error_rate=doc.get("error_rate"),
            )
        except (KeyError, TypeError) as err:
            raise ProfileError(f"profile: missing or malformed field {err}") from None

    def psi_spec(self, ref: NumericRef | CategoricalRef, **params: Any) -> PSISpec:
        """The PSI spec comparing a window against ``ref`` (a feature, score or labels)."""
        if isinstance(ref, NumericRef):
            return PSISpec(edges=ref.edges, reference=ref.proportions, reference_n=ref.n, **params)
        return PSISpec(
            categories=ref.categories, reference=ref.proportions, reference_n=ref.n, **params
        )


def _numeric_ref(f: Mapping[str, Any]) -> NumericRef:
    return NumericRef(
        edges=tuple(f["edges"]),
        proportions=tuple(f["proportions"]),
        n=int(f["n"]),
        missing_rate=float(f["missing_rate"]),
        mean=float(f["mean"]),
        std=float(f["std"]),
        min=float(f["min"]),
        max=float(f["max"]),
    )


def _categorical_ref(f: Mapping[str, Any]) -> CategoricalRef:
    return CategoricalRef(
        categories=tuple(f["categories"]),
        proportions=tuple(f["proportions"]),
        n=int(f["n"]),
        missing_rate=float(f["missing_rate"]),
    )


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON file."""
    p = Path(path)
    try:
        doc = orjson.loads(p.read_bytes())
    except OSError as err:
        raise ProfileError(f"{p}: cannot read: {err.strerror}") from None
    except orjson.JSONDecodeError as err:
        raise ProfileError(f"{p}: not valid JSON: {err}") from None
    return Profile.from_dict(doc)


def profile_for(model: ModelConfig) -> Profile | None:
    """The model's reference profile (path or inline), or None when it has none."""
    if model.reference_inline is not None:
        return Profile.from_dict(orjson.loads(model.reference_inline))
    if model.reference_path is not None:
        return load_profile(model.reference_path)
    return None


# --------------------------------------------------------------------------- snapshots

Columns = dict[str, list[Any]]


def read_snapshot(path: str | Path) -> Columns:
    """Columns of a CSV, Parquet or JSONL snapshot (format from the file extension)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(
            p, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        )
        return {name: table.column(name).to_pylist() for name in table.column_names}
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        return {name: table.column(name).to_pylist() for name in table.column_names}
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_jsonl(p)
    raise ProfileError(
        f"{p}: unknown snapshot format {suffix!r}; valid: .csv, .tsv, .parquet, .jsonl"
    )


def _read_jsonl(p: Path) -> Columns:
    rows: list[dict[str, Any]] = []
    with p.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise ProfileError(f"{p}:{lineno}: not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ProfileError(f"{p}:{lineno}: expected a JSON object per line")
            if isinstance(row.get("features"), dict):
                flat = dict(row["features"])
                for k in ("score", "prediction", "label"):
                    if k in row:
                        flat[k] = row[k]
                row = flat
            rows.append(row)
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    return {n: [r.get(n) for r in rows] for n in names}


# --------------------------------------------------------------------------- building


def _to_float_array(values: Sequence[Any]) -> tuple[npt.NDArray[np.float64], int]:
    """Floats with NaN for missing/non-numeric; also the count of non-numeric values."""
    out = np.full(len(values), np.nan, dtype=np.float64)
    bad = 0
    for i, v in enumerate(values):
        t = type(v)
        if t is float or t is int:
            out[i] = v
        elif v is None or v == "":
            continue
        elif t is bool:
            out[i] = float(v)
        else:
            bad += 1
    return out, bad


def _numeric_doc(values: Sequence[Any], bins: int) -> dict[str, Any]:
    arr, _bad = _to_float_array(values)
    n_total = arr.shape[0]
    finite = arr[np.isfinite(arr)]
    if finite.shape[0] == 0:
        raise ProfileError("has no finite numeric values")
    spec = PSISpec.from_reference_sample(finite, bins=bins)
    return {
        "type": "numeric",
        "n": int(finite.shape[0]),
        "missing_rate": float(1.0 - finite.shape[0] / n_total),
        "edges": list(spec.edges or ()),
        "proportions": list(spec.reference),
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.shape[0] > 1 else 0.0,
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def _missing_value(v: object) -> bool:
    return v is None or v == "" or (type(v) is float and math.isnan(v))


def _categorical_doc(values: Sequence[Any], max_categories: int) -> dict[str, Any]:
    present = [norm_target(v) for v in values if not _missing_value(v)]
    if not present:
        raise ProfileError("has no values")
    spec = PSISpec.from_reference_categories(present, max_categories=max_categories)
    return {
        "type": "categorical",
        "n": len(present),
        "missing_rate": float(1.0 - len(present) / len(values)),
        "categories": list(spec.categories or ()),
        "proportions": list(spec.reference),
    }


def _progress(out: TextIO | None) -> Callable[[int, int, str], None]:
    def show(i: int, n: int, what: str) -> None:
        if out is None:
            return
        width = 30
        done = int(width * i / max(n, 1))
        out.write(f"\rbaseline [{'#' * done}{'.' * (width - done)}] {i}/{n} {what:<24}")
        if i == n:
            out.write("\n")
        out.flush()

    return show


def build_profile(
    columns: Columns,
    model: ModelConfig,
    *,
    source: str | None = None,
    max_categories: int = MAX_CATEGORIES,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Build the profile document for ``model`` from snapshot ``columns``.

    Errors name the missing or unusable column. ``progress`` (default stderr; None = quiet)
    gets a one-line progress bar.
    """
    if not columns:
        raise ProfileError("snapshot: has no columns")
    n_rows = len(next(iter(columns.values())))
    if n_rows == 0:
        raise ProfileError("snapshot: has no rows")
    bins = model.detectors.bins
    steps = [f.name for f in model.features] + ["score", "labels"]
    show = _progress(progress)
    features: dict[str, Any] = {}
    for i, f in enumerate(model.features):
        show(i, len(steps), f.name)
        if f.name not in columns:
            valid = ", ".join(sorted(columns))
            raise ProfileError(
                f"snapshot: column {f.name!r} (feature) is missing; columns: {valid}"
            )
        try:
            if f.type == "numeric":
                features[f.name] = _numeric_doc(columns[f.name], bins)
            else:
                features[f.name] = _categorical_doc(columns[f.name], max_categories)
        except ProfileError as err:
            raise ProfileError(f"snapshot: column {f.name!r} {err}") from None
    show(len(model.features), len(steps), "score")
    score_col = columns.get("score")
    if score_col is None and "prediction" in columns:
        arr, bad = _to_float_array(columns["prediction"])
        score_col = columns["prediction"] if bad == 0 and np.isfinite(arr).any() else None
    score = _numeric_doc(score_col, bins) if score_col is not None else None
    show(len(model.features) + 1, len(steps), "labels")
    labels = positive_rate = error_rate = None
    if "label" in columns:
        labels = _categorical_doc(columns["label"], max_categories)
        lab = [norm_target(v) for v in columns["label"]]
        present = [x for x, v in zip(lab, columns["label"], strict=True) if v is not None]
        if model.task == "binary" and present:
            positive_rate = sum(x == model.positive_label for x in present) / len(present)
        if "prediction" in columns:
            pairs = [
                (norm_target(p), norm_target(y))
                for p, y in zip(columns["prediction"], columns["label"], strict=True)
                if p is not None and y is not None
            ]
            if pairs and model.task != "regression":
                error_rate = sum(p != y for p, y in pairs) / len(pairs)
    show(len(steps), len(steps), "done")
    body: dict[str, Any] = {
        "schema": PROFILE_SCHEMA,
        "kind": "driftline.profile",
        "model_id": model.model_id,
        "rows": n_rows,
        "bins": bins,
        "features": features,
        "score": score,
        "labels": labels,
        "positive_rate": positive_rate,
        "error_rate": error_rate,
    }
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {"id": f"ref-{digest[:16]}", **body, "source": source}


def baseline(
    snapshot: str | Path,
    model: ModelConfig,
    output: str | Path,
    *,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """``driftline baseline``: read a snapshot, build the profile, write it as JSON."""
    cols = read_snapshot(snapshot)
    doc = build_profile(cols, model, source=str(snapshot), progress=progress)
    Path(output).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return doc
