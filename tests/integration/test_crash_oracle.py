"""Crashes against an oracle, a 30 s Redis outage, and lost state detected and repaired.

* **Crash oracle** — a seeded stream (predictions of :func:`stream.scenario.generate`: a
  0–1 → 0–100 scale break and a costly new version, nine alerts) goes through a
  ``driftline worker`` process that is SIGKILLed mid-stream and replaced, and through the
  embedded runner (:class:`stream.embedded.EmbeddedRunner`, the oracle: same engine,
  in-process bus, no crash). The alert ids are the same set, a repeated alert is a
  byte-identical copy of its first publication, every summary (``model``, ``tick``) has the
  oracle's contents and stage 2's final detector state equals the oracle's.
* **Redis unavailable for 30 s** under load: the worker retries with backoff (counted),
  never crashes, and the totals are exact once Redis is back.
* **Lost state** (``StageRunner._verify_checkpoint``): the Redis checkpoint is compared with
  the group's Kafka-committed offsets on every claim. Keys deleted while the worker is
  stopped → replay from offset 0 (exact: same summaries, same final state); keys deleted and
  the log truncated (``delete_records``) → fresh state from the committed offsets and a
  ``state_reset`` alert; an older copy of the keys restored (DUMP/RESTORE) → WARNING, replay
  from the older checkpoint, same final state; keys deleted while the worker *runs* → its
  next commits find no generation, it re-claims (not fenced) and replays exactly.

Determinism: one partition per topic (stage 2 applies summaries in arrival order, so with
several stage-1 partitions the interleaving of their summaries — and what the sequential
detectors see — depends on timing), predictions only (predictions and labels are separate
topics whose fetch interleaving is timing-dependent too), all input produced before the
worker starts, and idle flushes (wall-clock tick closing) only on caught-up partitions
(``IngestRunner._caught_up``), so every tick closes on event time while a backlog is read.
Float sums are compared to 1e-9 relative: the engine sums per batch, so different batch
boundaries agree to rounding.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, KafkaError
from confluent_kafka import TopicPartition as CTopicPartition
from confluent_kafka.admin import AdminClient

from scripts.services import REPO_ROOT, RedisService
from stream.config import MonitorConfig, Topics, load_config
from stream.embedded import EmbeddedRunner
from stream.events import load_schema
from stream.profile import Profile
from stream.redis_store import RedisStore
from stream.scenario import generate
from stream.worker import Worker
from tests.fixtures.services import TopicFactory
from tests.fixtures.worker_harness import (
    TopicReader,
    WorkerEnv,
    counted,
    interleaved,
    make_env,
    produce,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REL = 1e-9


@pytest.fixture
def env(
    kafka_bootstrap: str, redis_url: str, topic_factory: TopicFactory, unique_id: str
) -> WorkerEnv:
    return make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "crash", partitions=1)


# --------------------------------------------------------------------------- helpers


def _preds(seed: int, rate: float, span_s: float) -> list[dict[str, Any]]:
    """Predictions of the first ``span_s`` seconds of the scenario, 400 s in the past."""
    start = time.time() - 400.0
    preds, _ = generate(rate=rate, seed=seed, start=start)
    return [p for p in preds if p["ts"] < start + span_s]


def assert_close(a: Any, b: Any, where: str = "$") -> None:
    """``a == b`` with floats compared to :data:`REL` (relative) — else an error naming the
    first differing path."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), f"{where}: {a!r} {b!r}"
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class RawReader:
    """A topic read from the beginning, keeping every message's value bytes in order."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"raw-{topic}-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])
        self.values: list[bytes] = []

    def poll(self, seconds: float = 0.2) -> list[bytes]:
        for msg in self.consumer.consume(num_messages=1000, timeout=seconds):
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise AssertionError(f"consume error: {err}")
            if err is None:
                self.values.append(msg.value() or b"")
        return self.values

    def docs(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for v in self.values]

    def close(self) -> None:
        self.consumer.close()


def first_by_id(docs: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        out.setdefault(str(d[key]), d)
    return out


def end_offset(bootstrap: str, topic: str, partition: int = 0) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{time.monotonic_ns()}"})
    try:
        _, high = c.get_watermark_offsets(CTopicPartition(topic, partition), timeout=10)
        return int(high)
    finally:
        c.close()


def stored_state(client: redis.Redis, prefix: str, stage: str, p: int = 0) -> dict[str, Any]:
    raw = client.get(f"{prefix}:{{{stage}:{p}}}:state")
    assert raw is not None, f"no {stage}/{p} state under {prefix!r}"
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


def partition_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    """Every key of the test's stage partitions (state, offsets, outbox, … and join
    buffer), not the kill-switch mirrors."""
    return sorted(k for k in client.scan_iter(match=f"{prefix}:{{*", count=1000))


async def oracle(
    cfg: MonitorConfig, profiles: Mapping[str, Profile | None] | None, preds: list[dict[str, Any]],
    topics: Topics,
) -> EmbeddedRunner:  # fmt: skip
    """The same predictions through the embedded runner, in 5 s event-time slices."""
    runner = EmbeddedRunner(
        cfg, profiles, partitions=1, tick_s=1.0, lateness_s=2.0, topics=topics
    )  # fmt: skip
    await runner.start()
    i = 0
    while i < len(preds):
        j = i
        while j < len(preds) and preds[j]["ts"] < preds[i]["ts"] + 5.0:
            j += 1
        runner.produce(topics.predictions, preds[i:j])
        i = j
        await runner.drain(now=preds[i - 1]["ts"])
    await runner.finish(preds[-1]["ts"] + 3600.0)
    return runner


def oracle_summaries(runner: EmbeddedRunner) -> dict[str, dict[str, Any]]:
    log = runner.bus.logs[runner.topics.summaries][0]
    return first_by_id([orjson.loads(r.value) for r in log], "summary_id")


def by_tick(summaries: dict[str, dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    out = {(s["model_id"], int(s["tick"])): s for s in summaries.values()}
    assert len(out) == len(summaries), "two summaries for one (model, tick)"
    return out


# --------------------------------------------------------------------------- (a) crash oracle


def test_sigkilled_worker_matches_the_uncrashed_oracle(
    env: WorkerEnv, tmp_path: Path, unique_id: str
) -> None:
    """``driftline worker`` SIGKILLed mid-stream (after several checkpoints) and replaced:
    same alert ids as the oracle, repeats byte-identical, summaries and final stage-2 state
    equal to the oracle's."""
    cfg = load_config(REPO_ROOT / "examples" / "monitors.yaml")
    preds = _preds(seed=5, rate=40.0, span_s=200.0)
    runner = asyncio.run(oracle(cfg, None, preds, env.topics))  # the configured references
    want_alerts = {a["alert_id"]: a for a in runner.result.alerts}
    want_summaries = oracle_summaries(runner)
    want_state = orjson.loads(runner.detect[0].snapshot())
    assert len(want_alerts) >= 5, f"the scenario should alert several times: {want_alerts}"

    port = _free_port()
    prefix = f"proc{unique_id}"
    t = env.topics
    child_env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DRIFTLINE_KAFKA_BOOTSTRAP": env.bootstrap,
        "DRIFTLINE_REDIS_URL": env.redis_url,
        "DRIFTLINE_REDIS_PREFIX": prefix,
        "DRIFTLINE_GROUP_PREFIX": f"proc-{unique_id}",
        "DRIFTLINE_INSTANCE_ID": f"pod-{unique_id}",
        "DRIFTLINE_WEB_BIND": f"127.0.0.1:{port}",
        "DRIFTLINE_TICK_S": "1",
        "DRIFTLINE_ALLOWED_LATENESS_S": "2",
        "DRIFTLINE_BATCH_SIZE": "20",
        "DRIFTLINE_BATCH_WITHIN_S": "0.05",
        **{f"DRIFTLINE_TOPIC_{k.upper()}": getattr(t, k) for k in Topics.__dataclass_fields__},
    }

    def spawn(log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "stream.worker", "worker", "--config",
             str(REPO_ROOT / "examples" / "monitors.yaml")],
            cwd=REPO_ROOT, env=child_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def checkpoints(stage: str) -> float:
        return _sample(_http(port, "/metrics")[1], "driftline_checkpoint_duration_seconds_count",
                       stage=stage)  # fmt: skip

    # all input is in Kafka before the first worker starts: ticks close on event time only
    produce(env, (("prediction", p) for p in preds), 4)
    summaries = RawReader(env.bootstrap, t.summaries)
    alerts = RawReader(env.bootstrap, t.alerts)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = spawn(log_a)
    b: subprocess.Popen[bytes] | None = None
    client = redis.Redis.from_url(env.redis_url)
    try:
        _wait_for("A's checkpoints", lambda: checkpoints("ingest") >= 10
                  and checkpoints("detect") >= 2, 90, log_a)  # fmt: skip
        a.send_signal(signal.SIGKILL)
        assert a.wait(10) == -signal.SIGKILL
        summaries.poll(1.0)
        before = counted([orjson.loads(v) for v in summaries.values])[0]
        assert before < len(preds), "A finished before the kill: not a mid-stream crash"
        b = spawn(log_b)
        summaries_topic = t.summaries

        def done() -> bool:
            summaries.poll()
            if counted([orjson.loads(v) for v in summaries.values])[0] < len(preds):
                return False
            state = client.get(f"{prefix}:{{detect:0}}:state")
            if state is None:
                return False
            nxt = orjson.loads(state)["next_offset"].get(summaries_topic, 0)
            return bool(nxt == end_offset(env.bootstrap, summaries_topic))

        _wait_for("B to process everything", done, 120, log_b)
        time.sleep(1.0)
        alerts.poll(1.0)
        summaries.poll(0.5)
        print(f"\ncrash oracle: {len(preds)} predictions; killed A after "
              f"{before} counted; {len(summaries.values)} summary messages for "
              f"{len(want_summaries)} ids; {len(alerts.values)} alert messages for "
              f"{len(want_alerts)} ids")  # fmt: skip

        # alerts: same ids, repeats byte-identical, contents equal the oracle's
        first: dict[str, bytes] = {}
        for raw in alerts.values:
            aid = str(orjson.loads(raw)["alert_id"])
            assert first.setdefault(aid, raw) == raw, f"alert {aid} re-published changed"
        assert set(first) == set(want_alerts)
        for aid, raw in first.items():
            assert_close(orjson.loads(raw), want_alerts[aid], aid)
        # summaries: per (model, tick), equal to the oracle's (ids and contents)
        got = [orjson.loads(v) for v in summaries.values]
        got_first = first_by_id(got, "summary_id")
        for s in got:
            assert_close(s, got_first[s["summary_id"]], f"copy of {s['summary_id']}")
        assert_close(by_tick(got_first), by_tick(want_summaries), "summaries")
        # stage 2's final state (its input offset differs: re-published copies)
        # ``duplicates`` counts the re-published copies stage 2 skipped: the oracle saw none
        state = stored_state(client, prefix, "detect")
        copies = len(got) - len(got_first)
        for model_id, model in state["models"].items():
            assert want_state["models"][model_id]["duplicates"] == 0
            want_state["models"][model_id]["duplicates"] = model["duplicates"]
        assert sum(m["duplicates"] for m in state["models"].values()) == copies
        assert_close(state["models"], want_state["models"], "detect state")
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0, log_b.read_text()[-3000:]
    finally:
        client.close()
        summaries.close()
        alerts.close()
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), ""
    except OSError:
        return 0, ""


def _sample(body: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _wait_for(what: str, check: Callable[[], bool], limit_s: float, log: Path) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- (b) 30 s outage


def test_redis_unavailable_for_30_s_under_load(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], redis_service: RedisService
) -> None:
    """Redis SIGKILLed (AOF everysec) while the SDK sends, kept down for 30 s, restarted: the
    worker retries with capped backoff (counted), its stages never die, nothing is counted
    twice or lost. Readiness (``/readyz``) covers the store: not ready while Redis is
    down (after the first failed request), ready again once it answers."""
    cfg, profile = demo
    start = time.time() - 400.0
    preds, labels = generate(rate=40.0, seed=9, start=start)
    preds = [p for p in preds if p["ts"] < start + 90.0]
    labels = [lab for lab in labels if lab["ts"] < start + 90.0]
    events = list(interleaved(preds, labels))
    third = len(events) // 3

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(batch_size=20), env.opts(), profiles={"fraud": profile})
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        await worker.start()
        store = worker.store
        assert isinstance(store, RedisStore)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, events[:third], 10)
            await until("the first third committed",
                        lambda: worker.stats.counters["commits"] >= 5, 60)  # fmt: skip
            await asyncio.sleep(1.5)  # the claims are older than AOF's everysec window
            sending = loop.run_in_executor(None, produce, env, events[third:], 10)
            commits = worker.stats.counters["commits"]
            await until("commits under load",
                        lambda: worker.stats.counters["commits"] >= commits + 3, 30)  # fmt: skip
            redis_service.kill()
            down = time.monotonic()
            retries0 = store.retries
            ready_seen: set[bool] = set()
            while time.monotonic() - down < 30.0:
                await asyncio.sleep(1.0)
                assert all(s.task is not None and not s.task.done() for s in worker.stages)
                ready_seen.add(worker.ready)
            during = store.retries - retries0
            assert ready_seen == {False}, f"readiness during the outage: {ready_seen}"
            # backoff doubles from 0.05 s to a 5 s cap: >= 6 retries in 30 s, not thousands
            assert 6 <= during <= 200, f"{during} retries in 30 s"
            commits_down = worker.stats.counters["commits"]
            redis_service.start()  # main thread: the child dies with the thread that forked it
            up = time.monotonic()
            await asyncio.wait_for(sending, 60)
            want = (len(preds), len(labels))
            await until("every event counted after the outage",
                        lambda: counted(summaries.values)[:2] >= want, 90,
                        summaries.poll)  # fmt: skip
            caught_up = time.monotonic() - up
            await asyncio.sleep(2.0)
            await loop.run_in_executor(None, summaries.poll, 1.0)
            assert counted(summaries.values)[:2] == want  # nothing counted twice
            await worker.report()
            from prometheus_client import generate_latest

            body = generate_latest(worker.registry).decode()
            assert _sample(body, "driftline_store_retries_total") >= during
            c = worker.stats.counters
            assert c["commits"] > commits_down
            assert c["ingest_batch_errors"] == c["detect_batch_errors"] == 0, dict(c)
            assert c["ingest_fenced"] == c["detect_fenced"] == 0, dict(c)
            assert all(s.task is not None and not s.task.done() for s in worker.stages)
            assert worker.ready and store.failing_since is None
            print(f"\nredis down 30 s under load: {during} store retries while down "
                  f"(total {store.retries}), ready reported {sorted(ready_seen)}, caught up "
                  f"{caught_up:.1f} s after the restart; {want[0]} predictions + {want[1]} "
                  f"labels counted exactly; rollbacks {c['ingest_state_rollbacks']}")  # fmt: skip
        finally:
            summaries.close()
            await worker.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- (c) lost state


class Run:
    """An in-process :class:`Worker` on the test's topics and Redis prefix, and what the
    topics and Redis hold (all read from the beginning)."""

    def __init__(self, env: WorkerEnv, demo: tuple[MonitorConfig, Profile]) -> None:
        self.env = env
        self.cfg, self.profile = demo
        self.prefix = env.opts().redis_prefix
        self.client = redis.Redis.from_url(env.redis_url)
        self.summaries = RawReader(env.bootstrap, env.topics.summaries)
        self.alerts = RawReader(env.bootstrap, env.topics.alerts)

    def worker(self) -> Worker:
        return Worker(
            self.cfg,
            self.env.settings(batch_size=20, batch_within_s=0.05),
            self.env.opts(kafka_commit_interval_s=0.3),
            profiles={"fraud": self.profile},
        )

    def state(self, stage: str) -> dict[str, Any] | None:
        raw = self.client.get(f"{self.prefix}:{{{stage}:0}}:state")
        return None if raw is None else dict(orjson.loads(raw))

    def caught_up(self, n_preds: int) -> bool:
        """Every prediction counted (unique summary ids), stage 1 at the end of its input
        with every tick emitted, and stage 2 at the end of the summaries topic."""
        self.summaries.poll()
        t = self.env.topics
        ing, det = self.state("ingest"), self.state("detect")
        if ing is None or det is None:
            return False
        if counted([orjson.loads(v) for v in self.summaries.values])[0] < n_preds:
            return False
        return bool(
            ing["next_offset"].get(t.predictions) == end_offset(self.env.bootstrap, t.predictions)
            and not ing.get("open")
            and not ing.get("pending")
            and det["next_offset"].get(t.summaries) == end_offset(self.env.bootstrap, t.summaries)
        )

    def describe(self) -> str:
        """What the topics and Redis hold now (for timeout messages)."""
        t = self.env.topics
        ing, det = self.state("ingest") or {}, self.state("detect") or {}
        return (
            f"{len(self.summaries.values)} summary messages, counted "
            f"{counted([orjson.loads(v) for v in self.summaries.values])}; ingest at "
            f"{ing.get('next_offset')} of {end_offset(self.env.bootstrap, t.predictions)} "
            f"(seq {ing.get('seq')}, {len(ing.get('open', []))} open, "
            f"{len(ing.get('pending', []))} pending ticks); detect at {det.get('next_offset')} "
            f"of {end_offset(self.env.bootstrap, t.summaries)}"
        )

    def close(self) -> None:
        self.summaries.close()
        self.alerts.close()
        self.client.close()


async def _run_until(run: Run, worker: Worker, what: str, check: Callable[[], bool]) -> None:
    await worker.start()
    try:
        await asyncio.wait_for(worker.wait_assigned(), 60)
        try:
            await until(what, check, 90)
        except AssertionError as err:
            raise AssertionError(
                f"{err}: {run.describe()}; worker counters {dict(worker.stats.counters)}"
            ) from None
        await asyncio.sleep(0.5)  # the last publishes and acks
    finally:
        # commits the Kafka offsets (informational mirror) once more; bounded so that a
        # failure above is reported instead of hanging the test
        await asyncio.wait_for(worker.stop(), 60)


def _alert_copies(values: list[bytes]) -> dict[str, bytes]:
    """First publication of every alert id; a later copy must be byte-identical."""
    first: dict[str, bytes] = {}
    for raw in values:
        aid = str(orjson.loads(raw)["alert_id"])
        assert first.setdefault(aid, raw) == raw, f"alert {aid} re-published changed"
    return first


def _metric(worker: Worker, name: str, **labels: str) -> float:
    from prometheus_client import generate_latest

    return _sample(generate_latest(worker.registry).decode(), name, **labels)


def test_deleted_state_is_replayed_from_offset_zero(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis keys of both stages deleted while no worker runs, the log intact since offset
    0: the next worker sees committed Kafka offsets without state, logs ERROR, replays from
    offset 0 and ends with the same summaries, alerts and stage-2 state."""
    preds = _preds(seed=6, rate=15.0, span_s=130.0)
    produce(env, (("prediction", p) for p in preds), 4)
    run = Run(env, demo)
    try:
        a = run.worker()
        asyncio.run(_run_until(run, a, "A caught up", lambda: run.caught_up(len(preds))))
        n_first = len(run.summaries.values)
        first_summaries = first_by_id(run.summaries.docs(), "summary_id")
        run.alerts.poll(1.0)
        first_alerts = _alert_copies(run.alerts.values)
        state_a = run.state("detect")
        assert state_a is not None and first_alerts, "the scenario should alert"
        keys = partition_keys(run.client, run.prefix)
        assert any(k.endswith(b"{ingest:0}:state") for k in keys), keys
        assert run.client.delete(*keys) == len(keys)

        caplog.set_level(logging.WARNING, logger="driftline.worker")
        b = run.worker()

        def replayed() -> bool:  # every summary emitted a second time, all applied
            return run.caught_up(len(preds)) and len(run.summaries.values) >= 2 * n_first

        asyncio.run(_run_until(run, b, "B replayed everything", replayed))
        c = b.stats.counters
        assert c["ingest_state_replays"] == c["detect_state_replays"] == 1, dict(c)
        assert c["ingest_state_resets"] == c["ingest_state_rollbacks"] == 0, dict(c)
        for stage in ("ingest", "detect"):
            assert _metric(b, "driftline_state_recoveries_total", stage=stage,
                           outcome="replay") == 1  # fmt: skip
        lost = [r.getMessage() for r in caplog.records if "STATE LOST" in r.getMessage()]
        assert {r.levelname for r in caplog.records if "STATE LOST" in r.getMessage()} == {"ERROR"}
        assert any("ingest/0" in m for m in lost) and any("detect/0" in m for m in lost), lost
        got = run.summaries.docs()
        assert set(first_by_id(got, "summary_id")) == set(first_summaries)
        for s in got:  # the replay re-emitted every summary with its id and contents
            assert_close(s, first_summaries[s["summary_id"]], s["summary_id"])
        run.alerts.poll(1.0)
        assert set(_alert_copies(run.alerts.values)) == set(first_alerts)
        assert len(run.alerts.values) == 2 * len(first_alerts)  # re-emitted, same bytes
        state_b = run.state("detect")
        assert state_b is not None
        assert_close(_counters_off(state_b), _counters_off(state_a), "detect state")
    finally:
        run.close()


def test_state_deleted_while_the_worker_runs_is_reclaimed_and_replayed(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis keys of both stages deleted while the worker runs (a FLUSHDB, say): its next
    commits find no generation at all, which is not another owner. It logs ERROR, re-claims
    the partitions instead of pausing them, the claim's check replays from offset 0 (the
    log is intact) and every prediction, before and after the loss, is counted once.

    The second half starts 200 s of event time after the first: a replay is exact only up
    to the wall-clock tick closes (idle flushes) of the run that lost its state. An event
    that arrived after its tick was idle-flushed was counted late into a newer tick; a
    replay closes ticks on event time, so it counts the event in its own tick, whose
    summary id stage 2 already has from the lost run."""
    preds = _preds(seed=8, rate=15.0, span_s=130.0)
    half = len(preds) // 2
    preds[half:] = [{**p, "ts": p["ts"] + 200.0} for p in preds[half:]]
    produce(env, (("prediction", p) for p in preds[:half]), 4)
    run = Run(env, demo)
    caplog.set_level(logging.WARNING, logger="driftline.worker")
    try:
        w = run.worker()

        def mirrored() -> bool:  # the Kafka copy of the checkpoints tells the claim what was lost
            return all(
                st._kafka_committed.get(tp) == off
                for st in w.stages
                for tp, off in st._checkpointed.items()
            )

        async def main() -> None:
            await w.start()
            try:
                await asyncio.wait_for(w.wait_assigned(), 60)
                await until("the first half caught up", lambda: run.caught_up(half), 90)
                await until("the checkpoints mirrored to Kafka", mirrored, 30)
                keys = partition_keys(run.client, run.prefix)
                assert any(k.endswith(b"{detect:0}:gen") for k in keys), keys
                assert run.client.delete(*keys) == len(keys)
                rest = (("prediction", p) for p in preds[half:])
                await asyncio.get_running_loop().run_in_executor(None, produce, env, rest, 4)
                try:
                    await until("every prediction counted after the loss",
                                lambda: run.caught_up(len(preds)), 90)  # fmt: skip
                except AssertionError as err:
                    state = f"{run.describe()}; {dict(w.stats.counters)}"
                    raise AssertionError(f"{err}: {state}") from None
                c = w.stats.counters
                for stage in ("ingest", "detect"):
                    assert c[f"{stage}_state_lost_running"] >= 1, dict(c)
                    assert c[f"{stage}_state_replays"] >= 1, dict(c)
                    assert c[f"{stage}_fenced"] == c[f"{stage}_claim_errors"] == 0, dict(c)
                assert not any(st.fenced for st in w.stages)
            finally:
                await asyncio.wait_for(w.stop(), 60)

        asyncio.run(main())
        assert counted(run.summaries.docs())[0] == len(preds)  # once each, none lost
        lost = [r for r in caplog.records if "STATE LOST WHILE RUNNING" in r.getMessage()]
        assert {r.levelname for r in lost} == {"ERROR"}, lost
        assert any("ingest/0" in r.getMessage() for r in lost)
        assert any("detect/0" in r.getMessage() for r in lost)
    finally:
        run.close()


def _counters_off(state: dict[str, Any]) -> dict[str, Any]:
    """A stage-2 state's models without the count of duplicate summaries dropped (a replay
    reads every re-emitted copy once more)."""
    return {m: {k: v for k, v in doc.items() if k != "duplicates"}
            for m, doc in state["models"].items()}  # fmt: skip


def test_deleted_state_with_a_truncated_log_resets_and_alerts(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    """Keys deleted and the predictions log truncated (``delete_records``): stage 1 cannot
    rebuild its state, so it resumes from the committed offset with fresh state, publishes
    a ``state_reset`` alert (schema-valid, naming stage, partition and offsets) and logs
    CRITICAL; its new summaries are applied by stage 2 (their sequence restarts above the
    lost ones). Stage 2's own input still starts at 0: it replays exactly."""
    import fastjsonschema

    all_preds = _preds(seed=7, rate=15.0, span_s=80.0)
    cut = all_preds[-1]["ts"] - 15.0
    preds = [p for p in all_preds if p["ts"] < cut]
    later = [p for p in all_preds if p["ts"] >= cut]
    produce(env, (("prediction", p) for p in preds), 4)
    run = Run(env, demo)
    t = env.topics
    try:
        a = run.worker()
        asyncio.run(_run_until(run, a, "A caught up", lambda: run.caught_up(len(preds))))
        end = end_offset(env.bootstrap, t.predictions)
        admin = AdminClient({"bootstrap.servers": env.bootstrap})
        for fut in admin.delete_records([CTopicPartition(t.predictions, 0, end // 2)]).values():
            fut.result(30)
        keys = partition_keys(run.client, run.prefix)
        assert run.client.delete(*keys) == len(keys)
        old_summaries = len(run.summaries.values)

        caplog.set_level(logging.WARNING, logger="driftline.worker")
        b = run.worker()
        validate = fastjsonschema.compile(load_schema("alert"))

        async def main() -> None:
            await b.start()
            try:
                await asyncio.wait_for(b.wait_assigned(), 60)
                summaries_end = end_offset(env.bootstrap, t.summaries)
                await until("stage 2 replayed", lambda: (run.state("detect") or {}).get(
                    "next_offset", {}).get(t.summaries) == summaries_end, 60)  # fmt: skip
                await asyncio.get_running_loop().run_in_executor(
                    None, produce, env, [("prediction", p) for p in later], 4
                )
                await until("the new predictions counted",
                            lambda: run.caught_up(len(preds) + len(later)), 60)  # fmt: skip
                await asyncio.sleep(0.5)
            finally:
                await b.stop()

        asyncio.run(main())
        c = b.stats.counters
        assert c["ingest_state_resets"] == 1 and c["detect_state_replays"] == 1, dict(c)
        assert _metric(b, "driftline_state_recoveries_total", stage="ingest", outcome="reset") == 1
        crit = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
        assert any("ingest/0" in m and "STATE RESET" in m for m in crit), crit
        run.alerts.poll(1.0)
        resets = [d for d in run.alerts.docs() if d["kind"] == "state_reset"]
        assert len(resets) == 1, resets
        validate(resets[0])
        detail = resets[0]["detail"]
        assert (detail["stage"], detail["partition"]) == ("ingest", 0)
        assert detail["offsets"][t.predictions] == {
            "log_start": end // 2, "committed": end, "resumed_at": end
        }  # fmt: skip
        assert resets[0]["model_id"] == "fraud" and resets[0]["severity"] == "critical"
        # the new summaries: seq above the lost state's, all applied by stage 2
        new = [d for d in run.summaries.docs()[old_summaries:] if d["seq"] > 10**12]
        assert sum(g["n"] for s in new for g in s["groups"] if g["slice"] == "*") == len(later)
        det = run.state("detect")
        assert det is not None
        src = f"{t.predictions}:0"
        assert det["models"]["fraud"]["applied"][src] == max(s["seq"] for s in new)
    finally:
        run.close()


def test_an_older_checkpoint_restored_is_detected_and_replayed(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    """An older copy of every key restored (DUMP mid-stream in one transaction, RESTORE
    after the run: what an old RDB or a lost AOF tail leaves): the next worker sees Redis
    behind the committed Kafka offsets, logs WARNING, counts a rollback, replays from the
    older checkpoint and ends with the same summaries, alerts and stage-2 state."""
    preds = _preds(seed=8, rate=20.0, span_s=130.0)
    produce(env, (("prediction", p) for p in preds), 4)
    run = Run(env, demo)
    t = env.topics
    try:
        a = run.worker()
        dumps: dict[bytes, bytes] = {}
        old_ingest: list[bytes] = []

        async def main() -> None:
            await a.start()
            try:
                await asyncio.wait_for(a.wait_assigned(), 60)
                await until("both stages checkpointed a few times",
                            lambda: a.stats.counters["commits"] >= 12
                            and (run.state("detect") or {}).get("next_offset", {}).get(
                                t.summaries, 0) >= 3, 60)  # fmt: skip
                keys = partition_keys(run.client, run.prefix)
                with run.client.pipeline(transaction=True) as tx:
                    for k in keys:
                        tx.dump(k)
                    tx.get(f"{run.prefix}:{{ingest:0}}:state")
                    *blobs, state = tx.execute()
                    dumps.update(zip(keys, blobs, strict=True))
                    old_ingest.append(state)
                await until("A caught up", lambda: run.caught_up(len(preds)), 60)
                await asyncio.sleep(0.5)
            finally:
                await a.stop()

        asyncio.run(main())
        old = orjson.loads(old_ingest[0])
        assert old["next_offset"][t.predictions] < end_offset(env.bootstrap, t.predictions)
        n_first = len(run.summaries.values)
        first_summaries = first_by_id(run.summaries.docs(), "summary_id")
        run.alerts.poll(1.0)
        first_alerts = _alert_copies(run.alerts.values)
        state_a = run.state("detect")
        assert state_a is not None
        with run.client.pipeline(transaction=True) as tx:
            for k, blob in dumps.items():
                tx.restore(k, 0, blob, replace=True)
            tx.execute()

        caplog.set_level(logging.WARNING, logger="driftline.worker")
        b = run.worker()
        replayed = sum(1 for s in first_summaries.values() if s["seq"] > old["seq"])
        asyncio.run(_run_until(run, b, "B replayed from the older checkpoint",
                               lambda: run.caught_up(len(preds))
                               and len(run.summaries.values) >= n_first + replayed))  # fmt: skip
        c = b.stats.counters
        assert c["ingest_state_rollbacks"] == c["detect_state_rollbacks"] == 1, dict(c)
        assert c["ingest_state_replays"] == c["ingest_state_resets"] == 0, dict(c)
        assert _metric(b, "driftline_state_recoveries_total", stage="ingest",
                       outcome="rollback") == 1  # fmt: skip
        warn = [r.getMessage() for r in caplog.records if "STATE ROLLBACK" in r.getMessage()]
        assert any("ingest/0" in m for m in warn) and any("detect/0" in m for m in warn), warn
        got = run.summaries.docs()
        assert len(got) >= n_first + replayed  # (+ outbox entries of the older checkpoint)
        assert set(first_by_id(got, "summary_id")) == set(first_summaries)
        for s in got:
            assert_close(s, first_summaries[s["summary_id"]], s["summary_id"])
        run.alerts.poll(1.0)
        assert set(_alert_copies(run.alerts.values)) == set(first_alerts)
        state_b = run.state("detect")
        assert state_b is not None
        assert_close(_counters_off(state_b), _counters_off(state_a), "detect state")
    finally:
        run.close()
