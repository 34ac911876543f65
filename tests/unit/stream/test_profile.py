"""Baseline profiles: CSV, Parquet and JSONL snapshots of the same data agree."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream.cli import main
from stream.config import load_config_text
from stream.profile import Profile, ProfileError, build_profile, load_profile, read_snapshot
from stream.scenario import MONITORS_YAML, reference_rows

CFG = load_config_text(MONITORS_YAML.replace("reference: profile-fraud.json", ""), "t.yaml")
MODEL = CFG.models["fraud"]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return reference_rows(n=3000, seed=3)


def write_all(rows: list[dict[str, Any]], d: Path) -> dict[str, Path]:
    paths = {"csv": d / "s.csv", "parquet": d / "s.parquet", "jsonl": d / "s.jsonl"}
    with paths["csv"].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: "" if v is None else repr(v) if isinstance(v, float) else v
                    for k, v in r.items()
                }
            )
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    # JSONL in the nested prediction-event layout
    with paths["jsonl"].open("wb") as fh:
        for r in rows:
            feats = {k: v for k, v in r.items() if k not in ("score", "prediction", "label")}
            fh.write(
                orjson.dumps(
                    {
                        "features": feats,
                        "score": r["score"],
                        "prediction": r["prediction"],
                        "label": r["label"],
                    }
                )
                + b"\n"
            )
    return paths


def test_three_formats_give_the_same_profile(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    paths = write_all(rows, tmp_path)
    docs = {fmt: build_profile(read_snapshot(p), MODEL, progress=None) for fmt, p in paths.items()}
    ids = {d["id"] for d in docs.values()}
    assert len(ids) == 1, {k: d["id"] for k, d in docs.items()}
    doc = docs["csv"]
    amount = doc["features"]["amount"]
    assert len(amount["edges"]) == 9 and len(amount["proportions"]) == 10
    assert abs(sum(amount["proportions"]) - 1) < 1e-9
    assert doc["features"]["account_age_days"]["missing_rate"] == pytest.approx(0.05, abs=0.015)
    country = doc["features"]["country"]
    assert (
        country["categories"][0] == "US"
        and len(country["proportions"]) == len(country["categories"]) + 1
    )
    assert doc["labels"]["categories"] == ["0", "1"] or doc["labels"]["categories"] == ["1", "0"]
    assert 0.1 < doc["error_rate"] < 0.4 and 0 < doc["positive_rate"] < 1
    p = Profile.from_dict(doc)
    assert p.numeric["amount"].mean == pytest.approx(sum(r["amount"] for r in rows) / len(rows))


def test_missing_column_is_named(rows: list[dict[str, Any]]) -> None:
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "merchant_risk"}
    with pytest.raises(
        ProfileError, match=r"column 'merchant_risk' \(feature\) is missing; columns: "
    ):
        build_profile(cols, MODEL, progress=None)


def test_progress_bar_goes_to_the_given_stream(rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    build_profile({k: [r[k] for r in rows] for k in rows[0]}, MODEL, progress=buf)
    assert "baseline [" in buf.getvalue() and "8/8" in buf.getvalue()


def test_cli_baseline_writes_a_loadable_profile(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    paths = write_all(rows[:500], tmp_path)
    cfg = tmp_path / "monitors.yaml"
    cfg.write_text(MONITORS_YAML)
    out = tmp_path / "profile.json"
    assert (
        main(
            [
                "baseline",
                str(paths["parquet"]),
                "--config",
                str(cfg),
                "--model",
                "fraud",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    prof = load_profile(out)
    assert prof.model_id == "fraud" and prof.id.startswith("ref-")
    assert (
        main(
            ["baseline", str(paths["csv"]), "--config", str(cfg), "--model", "nope", "-o", str(out)]
        )
        == 2
    )
