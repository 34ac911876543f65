"""Regenerate the small sample files in examples/ (seeded, deterministic).

    .venv/bin/python scripts/make_sample_data.py

Writes examples/monitors.yaml, examples/reference.csv (training snapshot of v1),
examples/profile-fraud.json (its baseline profile), and examples/predictions.jsonl +
examples/labels.jsonl (the demo scenario at 10 predictions/s) for `driftline replay`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.config import load_config  # noqa: E402
from stream.profile import baseline  # noqa: E402
from stream.scenario import MONITORS_YAML, generate, reference_rows  # noqa: E402


def main() -> None:
    out = ROOT / "examples"
    out.mkdir(exist_ok=True)
    (out / "monitors.yaml").write_text(MONITORS_YAML, encoding="utf-8")
    rows = reference_rows(n=5000)
    with (out / "reference.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: "" if v is None else repr(v) if isinstance(v, float) else v
                    for k, v in r.items()
                }
            )
    cfg = load_config(out / "monitors.yaml")
    baseline(out / "reference.csv", cfg.models["fraud"], out / "profile-fraud.json", progress=None)
    preds, labels = generate(rate=10.0, seed=5)
    for name, events in (("predictions.jsonl", preds), ("labels.jsonl", labels)):
        with (out / name).open("wb") as fh:
            for ev in events:
                fh.write(orjson.dumps(ev) + b"\n")
    print(f"wrote {out}: {len(preds)} predictions, {len(labels)} labels")


if __name__ == "__main__":
    main()
