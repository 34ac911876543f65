"""The ``driftline`` command line (placeholder until the service lands)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="driftline")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo scenario on the embedded engine")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("driftline demo: not built yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
