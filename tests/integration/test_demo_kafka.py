"""``driftline demo --kafka --redis``: the four stories through the real worker (Kafka +
Redis), read back from the alerts and control topics."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from stream.demo import run_demo_kafka
from stream.report import PNG_SIGNATURE

pytestmark = pytest.mark.integration


def test_demo_through_kafka_and_redis(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    out = io.StringIO()
    res = run_demo_kafka(
        kafka_bootstrap, redis_url, report_dir=tmp_path, speed=40.0, timeout_s=120.0, out=out
    )
    for sr in res.stories:
        assert sr.quiet_alerts == [], (sr.story.model, sr.quiet_alerts)
        for d in sr.detections:
            assert d.alert is not None, (sr.story.model, d.expect)
            assert d.ok, (sr.story.model, d.expect.detector, d.events_after)
    trips = [c for c in res.result.commands if c["action"] != "release"]
    assert [(c["model_id"], c["action"], c["target_version"], c["mode"]) for c in trips] == [
        ("fraud", "rollback", "v1", "automatic")
    ]
    assert res.release is not None and res.release["mode"] == "manual"
    assert res.ok and "KILL-SWITCH rollback fraud -> v1" in out.getvalue()
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in pngs)
    assert all(p.name in (tmp_path / "index.html").read_text(encoding="utf-8") for p in pngs)
