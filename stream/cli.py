"""The ``driftline`` command line.

* ``driftline demo`` — four incidents from the field replayed through the real engine in
  embedded mode (no services); timeline on the terminal, HTML/PNG report in
  ``demo-report/``. With ``--kafka BOOTSTRAP --redis URL`` the same scenario runs through
  the Kafka + Redis worker;
* ``driftline replay LOGS... --config monitors.yaml [--report DIR]`` — which alerts would
  have fired on historical prediction/label logs (JSONL or Parquet), and when;
* ``driftline baseline SNAPSHOT --config monitors.yaml --model M -o profile.json`` — build a
  reference profile from a training snapshot (CSV, Parquet or JSONL).

Service commands (``driftline worker``, ``driftline killswitch``) are registered through
:data:`SERVICE_COMMANDS` (see :func:`add_service_commands`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from stream.config import ConfigError, load_config
from stream.profile import ProfileError

Registrar = Callable[[Any], None]
"""A function adding subcommands to the CLI's subparsers; each parser it adds must set
``func`` (``parser.set_defaults(func=...)``), which ``main`` calls with the parsed args and
whose return value is the exit code."""


def add_service_commands(subparsers: Any, registrars: Sequence[Registrar]) -> None:
    """Wiring point for the service's subcommands.

    The Kafka worker's commands come from :func:`_service_registrars`.
    """
    for register in registrars:
        register(subparsers)


def _service_registrars() -> list[Registrar]:
    """Registrars of ``driftline worker`` / ``driftline killswitch``.

    The embedded commands (demo, replay, baseline) keep working where the service's
    Kafka/Redis stack cannot be imported; ``demo --kafka`` then says what is missing.
    """
    try:
        from stream.worker import add_worker_commands
    except ImportError:
        return []
    return [add_worker_commands]


def _positive(v: str) -> float:
    x = float(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{v!r} must be > 0")
    return x


def _parser(registrars: Sequence[Registrar]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="four incidents from the field through the real engine (embedded, or --kafka)",
        description="Replay a seeded scenario of four models and four incidents (rescaled "
        "feature, costly new version, prompt edit of an LLM, adapted fraudsters) through "
        "the engine; print the alert and kill-switch timeline and write an HTML report.",
    )
    demo.add_argument(
        "--scale", type=_positive, default=1.0, help="traffic multiplier (1 = ~390 predictions/s)"
    )
    demo.add_argument("--seed", type=int, default=11)
    demo.add_argument(
        "--report", default="demo-report", metavar="DIR", help="report directory (demo-report)"
    )
    demo.add_argument("--no-report", action="store_true", help="skip the HTML/PNG report")
    demo.add_argument(
        "--kafka", metavar="BOOTSTRAP", help="run through the Kafka + Redis worker (needs --redis)"
    )
    demo.add_argument("--redis", metavar="URL", help="Redis URL for --kafka, e.g. redis://h:6379/0")
    demo.add_argument(
        "--speed",
        type=_positive,
        default=30.0,
        help="--kafka only: event-time seconds produced per wall second (30)",
    )
    demo.add_argument(
        "--timeout", type=_positive, default=120.0, help="--kafka only: seconds to wait for alerts"
    )
    rep = sub.add_parser("replay", help="replay prediction/label logs (JSONL or Parquet)")
    rep.add_argument("logs", nargs="+", help="prediction and label logs")
    rep.add_argument("--config", required=True, help="monitors.yaml")
    rep.add_argument("--report", default=None, metavar="DIR", help="write an HTML/PNG report")
    rep.add_argument("--partitions", type=int, default=2)
    rep.add_argument("--tick", type=_positive, default=1.0, help="tick seconds")
    rep.add_argument("--lateness", type=float, default=2.0, help="allowed lateness seconds")
    base = sub.add_parser("baseline", help="build a reference profile from a training snapshot")
    base.add_argument("snapshot", help="CSV, Parquet or JSONL file")
    base.add_argument("--config", required=True, help="monitors.yaml")
    base.add_argument("--model", required=True, help="model id in the config")
    base.add_argument("-o", "--output", required=True, help="profile JSON to write")
    add_service_commands(sub, registrars)
    return parser


def _demo(args: argparse.Namespace) -> int:
    report = None if args.no_report else args.report
    if args.kafka or args.redis:
        if not (args.kafka and args.redis):
            missing = "--redis" if args.kafka else "--kafka"
            print(
                f"driftline demo: error: {missing} is required with --kafka/--redis",
                file=sys.stderr,
            )
            return 2
        from stream.demo import run_demo_kafka

        res = run_demo_kafka(
            args.kafka,
            args.redis,
            scale=args.scale,
            seed=args.seed,
            report_dir=report,
            speed=args.speed,
            timeout_s=args.timeout,
            out=sys.stdout,
            progress=sys.stderr,
        )
        return 0 if res.ok else 1
    from stream.demo import run_demo

    res = run_demo(
        scale=args.scale, seed=args.seed, report_dir=report, out=sys.stdout, progress=sys.stderr
    )
    return 0 if res.ok else 1


def main(argv: list[str] | None = None, *, registrars: Sequence[Registrar] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 demo expectations not met, 2 error)."""
    args = _parser(_service_registrars() if registrars is None else registrars).parse_args(argv)
    from stream.demo import DemoUnavailable

    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "replay":
            from stream.demo import run_replay

            cfg = load_config(args.config)
            run_replay(
                cfg,
                args.logs,
                partitions=args.partitions,
                tick_s=args.tick,
                lateness_s=args.lateness,
                report_dir=args.report,
                out=sys.stdout,
                progress=sys.stderr,
            )
            return 0
        if args.command == "baseline":
            from stream.embedded import model_config
            from stream.profile import baseline

            cfg = load_config(args.config)
            doc = baseline(args.snapshot, model_config(cfg, args.model), args.output)
            print(f"wrote {args.output}: profile {doc['id']} from {doc['rows']} rows")
            return 0
        func = getattr(args, "func", None)
        if func is not None:
            return int(func(args))
    except DemoUnavailable as err:
        print(f"driftline {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, ProfileError, ValueError, OSError) as err:
        print(f"driftline {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
