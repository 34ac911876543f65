"""Embedded mode: replay of the shipped sample logs (JSONL, gzipped JSONL, Parquet), the
bus, and crash/restart without loss or duplicates. The four-story demo: test_demo.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from stream.cli import main
from stream.embedded import Bus, EmbeddedRunner, partition_for, read_events
from stream.scenario import START
from stream.store import OutMessage
from tests.fixtures.embedded_feed import Feed

ROOT = Path(__file__).resolve().parents[3]


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
    from stream.embedded import replay

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


def test_replay_parquet_with_llm_structs_gives_the_same_alerts(tmp_path: Path) -> None:
    """Struct columns (slice, llm, llm.flags) get the union of all rows' keys in Parquet;
    read_events turns their nulls back into absent keys, so alerts are identical."""
    import gzip

    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stream.config import load_config
    from stream.demo import run_replay

    ex = ROOT / "examples" / "stories"
    evs = [e for e in read_events(ex / "predictions.jsonl.gz") if e["model_id"] == "support_triage"]
    assert any(e["llm"]["flags"] for e in evs) and any(not e["llm"]["flags"] for e in evs)
    jsonl = tmp_path / "triage.jsonl.gz"
    with gzip.open(jsonl, "wb") as fh:
        fh.writelines(orjson.dumps(e) + b"\n" for e in evs)
    pq.write_table(pa.Table.from_pylist(evs), tmp_path / "triage.parquet")
    back = read_events(tmp_path / "triage.parquet")
    assert back == evs
    cfg = load_config(ex / "monitors.yaml")
    a = run_replay(cfg, [jsonl]).result.alerts
    b = run_replay(cfg, [tmp_path / "triage.parquet"]).result.alerts
    assert a and a == b
    assert {x["feature"] for x in a} >= {"llm.output_tokens", "llm.flags.refusal"}


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
        feed = Feed(preds, labels)
        step = START
        while step < START + END:
            step += 10.0
            feed.produce_before(runner, step)
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
