"""Regenerate the sample files in examples/ (seeded, deterministic: same bytes every run).

    .venv/bin/python scripts/make_sample_data.py

``examples/stories/`` — the four stories of ``driftline demo`` (:mod:`stream.scenario`)
for ``driftline replay``::

    driftline replay examples/stories/predictions.jsonl.gz examples/stories/labels.jsonl.gz \\
        --config examples/stories/monitors.yaml --report replay-report

  * ``monitors.yaml`` — the four models' monitors;
  * ``reference-<model>.csv`` — a training/evaluation snapshot per model and
    ``profile-<model>.json`` its baseline profile (``driftline baseline``);
  * ``predictions.jsonl.gz`` + ``labels.jsonl.gz`` — the scenario's traffic at
    ``STORIES_SCALE`` of the demo's rate (gzip: ~0.7 MB instead of ~4 MB).

``examples/`` top level — the single-model service scenario (``fraud``), which the k8s
example overlay (``k8s/sync_generated.py``) and the config tests use: ``monitors.yaml``,
``reference.csv``, ``profile-fraud.json``, ``predictions.jsonl``, ``labels.jsonl``.
"""

from __future__ import annotations

import csv
import gzip
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.config import load_config  # noqa: E402
from stream.profile import baseline  # noqa: E402
from stream.scenario import (  # noqa: E402
    MONITORS_YAML,
    RATES,
    STORIES_YAML,
    generate,
    generate_stories,
    reference_rows,
    story_reference_rows,
)

STORIES_SCALE = 0.1
STORIES_SEED = 5
STORIES_REFERENCE_ROWS = 2000


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: "" if v is None else repr(v) if isinstance(v, float) else v
                    for k, v in r.items()
                }
            )


def _write_jsonl(path: Path, events: Iterable[Mapping[str, Any]]) -> None:
    data = b"".join(orjson.dumps(ev) + b"\n" for ev in events)
    if path.suffix == ".gz":
        # mtime=0 and no file name in the header: the same events give the same bytes
        with (
            path.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fh,
        ):
            fh.write(data)
    else:
        path.write_bytes(data)


def service_example(out: Path) -> str:
    """The single-model example (unchanged format; the k8s overlay copies it)."""
    (out / "monitors.yaml").write_text(MONITORS_YAML, encoding="utf-8")
    _write_csv(out / "reference.csv", reference_rows(n=5000))
    cfg = load_config(out / "monitors.yaml")
    baseline(out / "reference.csv", cfg.models["fraud"], out / "profile-fraud.json", progress=None)
    preds, labels = generate(rate=10.0, seed=5)
    _write_jsonl(out / "predictions.jsonl", preds)
    _write_jsonl(out / "labels.jsonl", labels)
    return f"{out}: {len(preds)} predictions, {len(labels)} labels (fraud)"


def stories_example(out: Path) -> str:
    """The four stories for ``driftline replay``."""
    out.mkdir(exist_ok=True)
    (out / "monitors.yaml").write_text(STORIES_YAML, encoding="utf-8")
    cfg = load_config(out / "monitors.yaml")
    for model in RATES:
        path = out / f"reference-{model}.csv"
        _write_csv(path, story_reference_rows(model, n=STORIES_REFERENCE_ROWS))
        baseline(path, cfg.models[model], out / f"profile-{model}.json", progress=None)
    preds, labels = generate_stories(scale=STORIES_SCALE, seed=STORIES_SEED)
    _write_jsonl(out / "predictions.jsonl.gz", preds)
    _write_jsonl(out / "labels.jsonl.gz", labels)
    return f"{out}: {len(preds)} predictions, {len(labels)} labels ({', '.join(RATES)})"


def main() -> None:
    # the service example keeps its absolute snapshot path (the committed profile and its
    # k8s copy carry it); the stories use relative paths, so their profiles' "source" does
    # not depend on where the checkout lives
    print("wrote", service_example(ROOT / "examples"))
    os.chdir(ROOT)
    print("wrote", stories_example(Path("examples") / "stories"))


if __name__ == "__main__":
    main()
