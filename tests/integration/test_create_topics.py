"""The topic-creation Job's script (k8s/components/topics/create_topics.py) on a real Kafka:
it creates every topic with the specified partitions and configs, is idempotent, and
reports an existing topic that does not fit instead of changing it.

Topic names are made unique through ``DRIFTLINE_TOPIC_*`` (the same variables the worker
reads); the replication factor is lowered to 1 for the single test broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from stream.config import TOPIC_DEFAULTS, ServiceSettings

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "k8s" / "components" / "topics"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "driftline_create_topics_it", SCRIPT / "create_topics.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def env(kafka_bootstrap: str, unique_id: str) -> Iterator[dict[str, str]]:
    e = {"DRIFTLINE_KAFKA_BOOTSTRAP": kafka_bootstrap}
    e.update({f"DRIFTLINE_TOPIC_{k.upper()}": f"ct-{unique_id}.{k}" for k in TOPIC_DEFAULTS})
    yield e
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.delete_topics([e[f"DRIFTLINE_TOPIC_{k.upper()}"] for k in TOPIC_DEFAULTS])
    for f in futures.values():
        with contextlib.suppress(Exception):  # best effort cleanup
            f.result(timeout=30)


def _describe(bootstrap: str, names: list[str]) -> dict[str, tuple[int, dict[str, str]]]:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import ConfigResource
    from confluent_kafka.admin._resource import ResourceType

    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(timeout=30).topics
    out: dict[str, tuple[int, dict[str, str]]] = {}
    for name in names:
        res = ConfigResource(ResourceType.TOPIC, name)
        configs: Any = admin.describe_configs([res])[res].result(timeout=30)
        out[name] = (len(meta[name].partitions), {k: v.value for k, v in configs.items()})
    return out


def test_creates_topics_idempotently(
    env: dict[str, str], kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = _module()
    doc = yaml.safe_load((SCRIPT / "topics.yaml").read_text(encoding="utf-8"))
    doc["replication_factor"] = 1
    for t in doc["topics"].values():
        t["partitions"] = min(t["partitions"], 3)
        t["config"].pop("min.insync.replicas", None)
    settings = ServiceSettings.from_env(env)
    specs = mod.load_specs(yaml.safe_dump(doc), settings)

    assert asyncio.run(mod.apply(specs, settings)) == 0
    out = capsys.readouterr().out
    assert out.count("created ") == len(TOPIC_DEFAULTS)
    got = _describe(kafka_bootstrap, [s.name for s in specs])
    for s in specs:
        partitions, configs = got[s.name]
        assert partitions == s.partitions, s.name
        for k, v in s.config.items():
            assert configs[k] == v, (s.name, k)
    assert got[settings.topics.control][1]["cleanup.policy"] == "compact"

    # Second run: nothing to create, nothing wrong.
    assert asyncio.run(mod.apply(specs, settings)) == 0
    assert "created " not in capsys.readouterr().out

    # A spec asking for more partitions than exist is reported, not applied.
    summaries = settings.topics.summaries
    before = got[summaries][0]
    doc["topics"]["summaries"]["partitions"] = before + 2
    grown = mod.load_specs(yaml.safe_dump(doc), settings)
    assert asyncio.run(mod.apply(grown, settings)) == 1
    assert "fewer than" in capsys.readouterr().err
    assert _describe(kafka_bootstrap, [summaries])[summaries][0] == before
