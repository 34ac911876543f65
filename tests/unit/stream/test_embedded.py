"""The demo scenario in embedded mode, replay of the shipped sample logs, the bus."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import fastjsonschema
import pytest

from stream.cli import main
from stream.demo import DemoResult, run_demo
from stream.embedded import Bus, EmbeddedRunner, partition_for
from stream.events import load_schema
from stream.scenario import START
from stream.store import OutMessage

ROOT = Path(__file__).resolve().parents[3]

# Detection budgets (events of the affected version/slice between change and alert)
MAX_EVENTS_AFTER = {
    "scale break 0-1 -> 0-100": 500,  # contract break: at once (≈1-2 ticks at 150/s)
    "cost jump on new version": 1000,  # needs budgets.min_count=200 requests in the window
    "concept flip in apac": 2500,  # labels arrive 5-30 s late, half the requests labelled
}


@pytest.fixture(scope="module")
def demo() -> DemoResult:
    return run_demo(rate=150.0, seed=11, out=io.StringIO())


def test_stationary_period_is_quiet(demo: DemoResult) -> None:
    assert demo.stationary_alerts == []


def test_each_change_caught_by_the_intended_detector(demo: DemoResult) -> None:
    for c in demo.caught:
        assert c.alert is not None, f"missed: {c.change.name}"
        a = c.alert
        assert a["kind"] in c.change.kinds and a["model_version"] == c.change.version
        if c.change.feature:
            assert a["feature"] == c.change.feature
        if c.change.slice:
            assert a["slice"] == c.change.slice
        assert c.events_after is not None and c.events_after <= MAX_EVENTS_AFTER[c.change.name], (
            c.change.name,
            c.events_after,
        )


def test_scale_break_alerts_as_data_quality_at_once(demo: DemoResult) -> None:
    c = demo.caught[0]
    assert c.alert is not None and c.alert["detector"] == "quality.out_of_range"
    assert c.alert["detected_at"] - (START + c.change.at) <= 3.0


def test_kill_switch_trips_for_the_concept_flip_and_releases_manually(demo: DemoResult) -> None:
    cmds = demo.result.commands
    control = fastjsonschema.compile(load_schema("control"))
    for c in cmds:
        control(c)
    trips = [c for c in cmds if c["action"] != "release"]
    assert len(trips) == 1
    (trip,) = trips
    concept = demo.caught[2].alert
    assert concept is not None
    assert trip["action"] == "rollback" and trip["target_version"] == "v1"
    assert trip["mode"] == "automatic" and trip["reason_alert_ids"] == [concept["alert_id"]]
    assert trip["issued_at"] == concept["detected_at"]
    assert cmds[-1] == demo.release and demo.release["action"] == "release"
    assert demo.release["mode"] == "manual"


def test_all_alerts_match_the_schema(demo: DemoResult) -> None:
    schema = fastjsonschema.compile(load_schema("alert"))
    for a in demo.result.alerts:
        schema(a)
    assert len({a["alert_id"] for a in demo.result.alerts}) == len(demo.result.alerts)


def test_replay_of_sample_logs(capsys: pytest.CaptureFixture[str]) -> None:
    ex = ROOT / "examples"
    rc = main(
        [
            "replay",
            str(ex / "predictions.jsonl"),
            str(ex / "labels.jsonl"),
            "--config",
            str(ex / "monitors.yaml"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "data_quality" in out and "seller_quality_score" in out
    assert "cost" in out and "concept_drift" in out and "KILL-SWITCH rollback" in out


def test_bus_partitions_like_kafka() -> None:
    bus = Bus()
    bus.create("t", 6)
    p, off = bus.produce("t", b"req-1", b"a")
    assert p == partition_for(b"req-1", 6) and off == 0
    assert bus.produce("t", b"req-1", b"b") == (p, 1)  # same key, same partition, in order
    assert [r.value for r in bus.read("t", p, 0, 10)] == [b"a", b"b"]


def test_replay_parquet_logs_gives_the_same_alerts(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stream.config import load_config
    from stream.embedded import read_events, replay

    ex = ROOT / "examples"
    for name in ("predictions", "labels"):
        pq.write_table(
            pa.Table.from_pylist(read_events(ex / f"{name}.jsonl")), tmp_path / f"{name}.parquet"
        )
    cfg = load_config(ex / "monitors.yaml")
    from_jsonl = replay(cfg, [ex / "predictions.jsonl", ex / "labels.jsonl"], quiet=True)
    from_parquet = replay(
        cfg, [tmp_path / "predictions.parquet", tmp_path / "labels.parquet"], quiet=True
    )
    assert from_jsonl.alerts and from_parquet.alerts == from_jsonl.alerts
    assert from_parquet.deadletters == 0


def test_detector_names_are_bounded(demo: DemoResult) -> None:
    from stream.detect import DETECTOR_NAMES

    for a in demo.result.alerts:
        assert a["detector"] in DETECTOR_NAMES or a["detector"].startswith("latency_p")


def runner_clock(runner: EmbeddedRunner) -> Callable[[], float]:
    return lambda: runner.clock


def _published(bus: Bus, topic: str) -> list[dict[str, object]]:
    """Messages of a topic as a consumer sees them: duplicates (same id) dropped."""
    import orjson

    seen: set[str] = set()
    out = []
    for part in bus.logs[topic]:
        for rec in part:
            doc = orjson.loads(rec.value)
            key = str(doc.get("alert_id") or doc.get("summary_id") or doc.get("command_id"))
            if key not in seen:
                seen.add(key)
                out.append(doc)
    return out


@pytest.mark.parametrize("crash_after_commits", [5, 23, 61])
def test_worker_crash_and_restart_loses_and_duplicates_nothing(crash_after_commits: int) -> None:
    """Crash after a commit but before publishing; a new runner on the same store and bus
    claims, restores, republishes the outbox and continues: consumers see the same alerts,
    summaries and commands as an uninterrupted run (one partition: a fixed merge order)."""
    import asyncio

    from stream.demo import demo_config
    from stream.scenario import END, generate

    cfg, prof = demo_config()
    preds, labels = generate(rate=20.0, seed=3)

    class Crash(Exception):
        pass

    crashed: list[float] = []

    async def run(crash_at: int | None) -> Bus:
        kw = {"partitions": 1, "batch_size": 150, "max_future_s": float("inf")}
        runner = EmbeddedRunner(cfg, {"fraud": prof}, **kw)  # type: ignore[arg-type]
        await runner.start()
        store, bus = runner.store, runner.bus
        if crash_at is not None:
            real = runner._publish

            async def publish(stage: str, p: int, gen: int, msgs: Sequence[OutMessage]) -> None:
                if store.commits >= crash_at:
                    raise Crash
                await real(stage, p, gen, msgs)

            runner._publish = publish  # type: ignore[method-assign]
        t = runner.topics
        i = j = 0
        step = START
        while step < START + END:
            step += 10.0
            while i < len(preds) and preds[i]["ts"] < step:
                runner.produce(t.predictions, [preds[i]])
                i += 1
            while j < len(labels) and labels[j]["ts"] < step:
                runner.produce(t.labels, [labels[j]])
                j += 1
            try:
                await runner.drain(now=step)
            except Crash:
                crashed.append(step)
                runner = EmbeddedRunner(cfg, {"fraud": prof}, store=store, bus=bus, **kw)  # type: ignore[arg-type]
                runner.clock = step
                store.clock = runner_clock(runner)  # the new worker keeps the TTL clock
                await runner.start()
                await runner.drain(now=step)
        await runner.finish(START + END + 10.0)
        return bus

    ref = asyncio.run(run(None))
    got = asyncio.run(run(crash_after_commits))
    for topic in ("driftline.summaries", "driftline.alerts", "driftline.control"):
        want = _published(ref, topic)
        assert want or topic == "driftline.control"
        assert _published(got, topic) == want, topic
    assert len(_published(ref, "driftline.alerts")) >= 3
    assert len(crashed) == 1
