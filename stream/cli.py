"""The ``driftline`` command line.

* ``driftline demo`` — the seeded incident scenario on the embedded engine (no services);
* ``driftline replay LOGS... --config monitors.yaml`` — which alerts would have fired, and when;
* ``driftline baseline SNAPSHOT --config monitors.yaml --model M -o profile.json`` — build a
  reference profile from a training snapshot (CSV, Parquet or JSONL).
"""

from __future__ import annotations

import argparse
import sys

from stream.config import ConfigError, load_config
from stream.profile import ProfileError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the seeded incident scenario on the embedded engine")
    demo.add_argument("--rate", type=float, default=300.0, help="predictions per second")
    demo.add_argument("--seed", type=int, default=11)
    rep = sub.add_parser("replay", help="replay prediction/label logs (JSONL or Parquet)")
    rep.add_argument("logs", nargs="+", help="prediction and label logs")
    rep.add_argument("--config", required=True, help="monitors.yaml")
    rep.add_argument("--partitions", type=int, default=2)
    rep.add_argument("--tick", type=float, default=1.0, help="tick seconds")
    rep.add_argument("--lateness", type=float, default=2.0, help="allowed lateness seconds")
    base = sub.add_parser("baseline", help="build a reference profile from a training snapshot")
    base.add_argument("snapshot", help="CSV, Parquet or JSONL file")
    base.add_argument("--config", required=True, help="monitors.yaml")
    base.add_argument("--model", required=True, help="model id in the config")
    base.add_argument("-o", "--output", required=True, help="profile JSON to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from stream.demo import run_demo

            res = run_demo(rate=args.rate, seed=args.seed)
            return 0 if all(c.alert is not None for c in res.caught) else 1
        if args.command == "replay":
            from stream.embedded import replay

            cfg = load_config(args.config)
            replay(
                cfg,
                args.logs,
                partitions=args.partitions,
                tick_s=args.tick,
                lateness_s=args.lateness,
            )
            return 0
        if args.command == "baseline":
            from stream.embedded import model_config
            from stream.profile import baseline

            cfg = load_config(args.config)
            doc = baseline(args.snapshot, model_config(cfg, args.model), args.output)
            print(f"wrote {args.output}: profile {doc['id']} from {doc['rows']} rows")
            return 0
    except (ConfigError, ProfileError, ValueError, OSError) as err:
        print(f"driftline {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
