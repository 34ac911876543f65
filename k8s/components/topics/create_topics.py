"""Create driftline's Kafka topics from ``topics.yaml`` (idempotent).

Run by the ``driftline-create-topics`` Job with the driftline image (``python
create_topics.py topics.yaml``), using the worker's own connection settings
(``DRIFTLINE_KAFKA_*`` environment, SASL/TLS included). Missing topics are created;
existing ones are checked: fewer partitions than specified, or predictions and labels with
different partition counts, is an error (partitions are never changed here — growing them
moves keys, see docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stream.config import TOPIC_DEFAULTS, ConfigError, ServiceSettings


@dataclass(frozen=True)
class TopicSpec:
    """One topic as it should exist."""

    key: str
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]


def load_specs(text: str, settings: ServiceSettings) -> list[TopicSpec]:
    """Parse ``topics.yaml``; names resolve through the settings (``DRIFTLINE_TOPIC_*``)."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("topics"), dict):
        raise ConfigError("topics.yaml: expected a mapping with 'topics'")
    rf = doc.get("replication_factor", 3)
    if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
        raise ConfigError(f"topics.yaml: replication_factor: {rf!r} must be an integer >= 1")
    out = []
    for key, raw in doc["topics"].items():
        if key not in TOPIC_DEFAULTS:
            raise ConfigError(
                f"topics.yaml: topics.{key}: unknown topic; valid keys: {', '.join(TOPIC_DEFAULTS)}"
            )
        parts = raw.get("partitions") if isinstance(raw, dict) else None
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ConfigError(f"topics.yaml: topics.{key}.partitions: {parts!r} must be >= 1")
        cfg = raw.get("config") or {}
        out.append(
            TopicSpec(
                key=key,
                name=getattr(settings.topics, key),
                partitions=parts,
                replication_factor=rf,
                config={str(k): str(v) for k, v in cfg.items()},
            )
        )
    missing = sorted(set(TOPIC_DEFAULTS) - {s.key for s in out})
    if missing:
        raise ConfigError(f"topics.yaml: topics: missing {', '.join(missing)}")
    by_key = {s.key: s for s in out}
    if by_key["predictions"].partitions != by_key["labels"].partitions:
        raise ConfigError(
            "topics.yaml: topics.labels.partitions must equal topics.predictions.partitions "
            "(labels join predictions by request_id in the same partition)"
        )
    return out


def plan(specs: list[TopicSpec], existing: Mapping[str, int]) -> tuple[list[TopicSpec], list[str]]:
    """Topics to create, and problems with existing ones (``existing``: name → partitions)."""
    create = [s for s in specs if s.name not in existing]
    problems = [
        f"topic {s.name!r} has {existing[s.name]} partitions, fewer than the {s.partitions} "
        "specified (add partitions deliberately, see docs/deploy.md)"
        for s in specs
        if s.name in existing and existing[s.name] < s.partitions
    ]
    by_key = {s.key: s.name for s in specs}
    counts = {k: existing.get(by_key[k]) for k in ("predictions", "labels")}
    if None not in counts.values() and counts["predictions"] != counts["labels"]:
        problems.append(
            f"topics {by_key['predictions']!r} ({counts['predictions']} partitions) and "
            f"{by_key['labels']!r} ({counts['labels']}) must have the same partition count"
        )
    return create, problems


async def apply(specs: list[TopicSpec], settings: ServiceSettings) -> int:
    """Create what is missing; return 0, or 1 when an existing topic does not fit."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from stream.worker import kafka_client_kwargs

    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        # List every topic first and describe only those that exist: a Metadata request
        # naming a missing topic makes a broker with auto.create.topics.enable=true create
        # it with the broker's default partition count.
        names = set(await admin.list_topics())
        wanted = [s.name for s in specs if s.name in names]
        described: list[dict[str, Any]] = await admin.describe_topics(wanted) if wanted else []
        existing = {
            d["topic"]: len(d["partitions"])
            for d in described
            if not d.get("error_code") and d.get("partitions")
        }
        create, problems = plan(specs, existing)
        failed: set[str] = set()
        if create:
            resp = await admin.create_topics(
                [
                    NewTopic(
                        s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config)
                    )
                    for s in create
                ]
            )
            for err in resp.topic_errors:  # (topic, error_code[, error_message])
                if err[1] != 0:
                    failed.add(err[0])
                    msg = err[2] if len(err) > 2 else ""
                    problems.append(f"creating {err[0]!r} failed: error code {err[1]} {msg}")
        for s in create:
            if s.name not in failed:
                print(f"created {s.name}: {s.partitions} partitions, {dict(s.config)}")
        for s in specs:
            if s.name in existing:
                print(f"exists  {s.name}: {existing[s.name]} partitions")
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1 if problems else 0
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "topics.yaml")
    try:
        settings = ServiceSettings.from_env()
        specs = load_specs(path.read_text(encoding="utf-8"), settings)
    except (ConfigError, OSError) as err:
        print(f"create_topics: error: {err}", file=sys.stderr)
        return 2
    return asyncio.run(apply(specs, settings))


if __name__ == "__main__":
    sys.exit(main())
