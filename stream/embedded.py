"""Embedded mode: the real engine over an in-process bus and :class:`MemoryStore`.

``driftline demo`` and ``driftline replay`` run here, with no Kafka or Redis. The bus has
topics with partitions and Kafka's default key partitioner (murmur2), so predictions and
labels with the same ``request_id`` meet in the same stage-1 partition exactly as they do
on a real cluster. The runner does what the faust agents will do — claim, process, commit
(with the join ops), absorb the joined pairs, publish the outbox, ack — so the consistency
protocol is exercised end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import orjson

from stream.config import ModelConfig, MonitorConfig, Topics
from stream.engine import Detect, DetectOutput, Ingest, IngestOutput, compile_plans, tune_gc
from stream.events import RawMessage
from stream.partitioner import murmur2_partition
from stream.policy import Finding
from stream.profile import Profile, profile_for
from stream.store import JoinOp, JoinResult, MemoryStore, OutMessage

if TYPE_CHECKING:
    from stream.metrics import Metrics

partition_for = murmur2_partition
"""Kafka's default partition of a keyed message (the producer SDK's partitioner)."""


class BusRecord(NamedTuple):
    offset: int
    key: bytes
    value: bytes
    order: int  # global produce order (to merge two topics in arrival order)


class Bus:
    """In-process topics with partitions (append-only logs)."""

    def __init__(self) -> None:
        self.logs: dict[str, list[list[BusRecord]]] = {}
        self._order = 0

    def create(self, topic: str, partitions: int) -> None:
        if topic not in self.logs:
            self.logs[topic] = [[] for _ in range(partitions)]

    def partitions(self, topic: str) -> int:
        return len(self.logs[topic])

    def produce(self, topic: str, key: bytes, value: bytes) -> tuple[int, int]:
        parts = self.logs[topic]
        p = partition_for(key, len(parts))
        self._order += 1
        parts[p].append(BusRecord(len(parts[p]), key, value, self._order))
        return p, len(parts[p]) - 1

    def read(self, topic: str, partition: int, offset: int, limit: int) -> list[BusRecord]:
        return self.logs[topic][partition][offset : offset + limit]


@dataclass
class RunResult:
    """Everything a run published (alerts and commands in publish order)."""

    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    summaries: int = 0
    deadletters: int = 0
    accepted: int = 0
    commits: int = 0
    findings: list[tuple[str, Finding]] = field(default_factory=list)
    """Every stage-2 evaluation ``(model_id, finding)``, kept only with ``keep_findings``."""


class EmbeddedRunner:
    """Drives stage 1 and stage 2 over the bus with a :class:`MemoryStore`."""

    def __init__(
        self,
        config: MonitorConfig,
        profiles: Mapping[str, Profile | None] | None = None,
        *,
        partitions: int = 2,
        tick_s: float = 1.0,
        lateness_s: float = 2.0,
        batch_size: int = 2000,
        topics: Topics | None = None,
        max_future_s: float = 300.0,
        store: MemoryStore | None = None,
        bus: Bus | None = None,
        keep_findings: bool = False,
        on_detect: Callable[[Detect, DetectOutput], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``store`` / ``bus`` may be shared with an earlier runner: a new runner over the
        same store and bus is a restarted worker (claim, restore, republish, continue).

        ``keep_findings`` keeps every stage-2 evaluation in ``result.findings`` (reports);
        ``on_detect(detect, output)`` is called after each committed stage-2 batch (e.g. to
        sample the sequential detectors' running statistics).

        ``metrics`` (a :class:`stream.metrics.Metrics`) is fed exactly as the Kafka worker
        feeds it: batches, checkpoints, ingest/join/detect outputs after each commit,
        published messages, detector states, and after every drain the partitions, the
        consumer lag (bus end − committed offset), readiness and the join-buffer size."""
        tune_gc()
        self.metrics = metrics
        self.keep_findings = keep_findings
        self.on_detect = on_detect
        self.config = config
        if profiles is None:
            profiles = {m: profile_for(cfg) for m, cfg in config.models.items()}
        self.plans = compile_plans(config, profiles)
        self.topics = topics or Topics()
        self.tick_s = tick_s
        self.batch_size = batch_size
        self.clock = 0.0  # event time: the newest input timestamp seen
        self.store = store if store is not None else MemoryStore(clock=lambda: self.clock)
        self.bus = bus if bus is not None else Bus()
        t = self.topics
        for name in (t.predictions, t.labels, t.summaries, t.alerts, t.control, t.deadletter):
            self.bus.create(name, partitions)
        self.partitions = partitions
        self.ingest = [
            Ingest(
                config,
                self.plans,
                p,
                topics=t,
                tick_s=tick_s,
                lateness_s=lateness_s,
                max_future_s=max_future_s,
            )
            for p in range(partitions)
        ]
        self.detect = [
            Detect(config, self.plans, p, topics=t, tick_s=tick_s) for p in range(partitions)
        ]
        self.gen_ingest = [0] * partitions
        self.gen_detect = [0] * partitions
        self.result = RunResult()
        self._claimed = False

    async def start(self) -> None:
        """Claim every partition and restore its state (fresh stores start empty)."""
        for p in range(self.partitions):
            c = await self.store.claim("ingest", p, "embedded")
            self.gen_ingest[p] = c.generation
            self.ingest[p].restore(c.state, c.inbox)
            self._publish_now(c.outbox)
            c2 = await self.store.claim("detect", p, "embedded")
            self.gen_detect[p] = c2.generation
            self.detect[p].restore(c2.state)
            self._publish_now(c2.outbox)
            if self.metrics is not None:
                self.metrics.observe_detector_state(self.detect[p])
        self._claimed = True
        self.report()

    # ----------------------------------------------------------------- metrics

    def _batch(self, stage: str, n: int) -> contextlib.AbstractContextManager[None]:
        m = self.metrics
        return m.batch(stage, n) if m is not None else contextlib.nullcontext()

    def _checkpoint(self, stage: str) -> contextlib.AbstractContextManager[None]:
        m = self.metrics
        return m.checkpoint(stage) if m is not None else contextlib.nullcontext()

    def _observe_ingest(self, out: IngestOutput, result: JoinResult) -> None:
        if self.metrics is not None:
            self.metrics.observe_ingest(out)
            self.metrics.observe_join(result)
            self.metrics.set_join_pending(self.store.join_size())

    def _observe_detect(self, det: Detect, out: DetectOutput) -> None:
        if self.metrics is not None:
            self.metrics.observe_detect(out)
            self.metrics.observe_detector_state(det, out.models)

    def report(self) -> None:
        """The periodic gauges of the worker: owned partitions, readiness, consumer lag
        (messages on the bus after the committed offset) and the join-buffer size."""
        m = self.metrics
        if m is None:
            return
        m.set_assigned_partitions("ingest", self.partitions if self._claimed else 0)
        m.set_assigned_partitions("detect", self.partitions if self._claimed else 0)
        m.set_ready(self._claimed)
        m.set_join_pending(self.store.join_size())
        t = self.topics
        for p in range(self.partitions):
            for topic in (t.predictions, t.labels):
                done = self.ingest[p].next_offset.get(topic, 0)
                m.set_consumer_lag(topic, p, len(self.bus.logs[topic][p]) - done)
            done = self.detect[p].next_offset.get(t.summaries, 0)
            m.set_consumer_lag(t.summaries, p, len(self.bus.logs[t.summaries][p]) - done)

    def produce(self, topic: str, events: Iterable[Mapping[str, Any]]) -> None:
        """Publish events (one per message, key = request_id)."""
        for ev in events:
            # orjson's result keeps a ~4 KiB allocation; the bus retains every message, so
            # keep an exact-size copy (12x less memory for the demo's 166k events)
            value = bytes(memoryview(orjson.dumps(ev)))
            self.bus.produce(topic, str(ev.get("request_id", "")).encode(), value)

    def produce_raw(self, topic: str, key: bytes, value: bytes) -> None:
        self.bus.produce(topic, key, value)

    def _publish_now(self, msgs: Sequence[OutMessage]) -> None:
        for m in msgs:
            self.bus.produce(m.topic, m.key, m.value)
            if m.topic == self.topics.summaries:
                self.result.summaries += 1
            elif m.topic == self.topics.deadletter:
                self.result.deadletters += 1
        if msgs and self.metrics is not None:
            self.metrics.observe_published(msgs)  # the bus "acknowledged" them

    async def _publish(self, stage: str, p: int, gen: int, msgs: Sequence[OutMessage]) -> None:
        self._publish_now(msgs)
        if msgs:
            await self.store.ack_outbox(stage, p, gen, [m.id for m in msgs])

    def _next_input(self, p: int) -> list[RawMessage]:
        t = self.topics
        off = self.ingest[p].next_offset
        preds = self.bus.read(t.predictions, p, off.get(t.predictions, 0), self.batch_size)
        labs = self.bus.read(t.labels, p, off.get(t.labels, 0), self.batch_size)
        merged = sorted(
            [(r.order, t.predictions, r) for r in preds] + [(r.order, t.labels, r) for r in labs]
        )[: self.batch_size]
        return [RawMessage(topic, p, r.offset, r.value) for _, topic, r in merged]

    async def step_ingest(self, p: int, now: float) -> int:
        """One stage-1 batch on partition ``p``; returns the number of input messages."""
        msgs = self._next_input(p)
        if not msgs:
            return 0
        with self._batch("ingest", len(msgs)):
            ing = self.ingest[p]
            out = ing.process_raw(msgs, now)
            self.clock = max(self.clock, ing.watermark)
            result = await self._commit_ingest(p, ing, out, out.join_ops)
            ing.absorb(result)
            self._observe_ingest(out, result)
            self.result.accepted += out.accepted
            self.result.commits += 1
            await self._publish("ingest", p, self.gen_ingest[p], out.messages)
        return len(msgs)

    async def flush_ingest(self, p: int, now: float | None) -> None:
        ing = self.ingest[p]
        out = ing.flush(now)
        if not out.messages:
            return
        result = await self._commit_ingest(p, ing, out)
        self._observe_ingest(out, result)
        self.result.commits += 1
        await self._publish("ingest", p, self.gen_ingest[p], out.messages)

    async def _commit_ingest(
        self, p: int, ing: Ingest, out: IngestOutput, join_ops: Sequence[JoinOp] = ()
    ) -> JoinResult:
        """Stage 1's checkpoint of partition ``p``: state, offsets, outbox (+ join ops)."""
        with self._checkpoint("ingest"):
            return await self.store.commit(
                "ingest",
                p,
                self.gen_ingest[p],
                state=ing.snapshot(),
                next_offset=out.next_offset,
                outbox=out.messages,
                join_ops=join_ops,
            )

    async def step_detect(self, p: int) -> int:
        det = self.detect[p]
        off = det.next_offset.get(self.topics.summaries, 0)
        recs = self.bus.read(self.topics.summaries, p, off, self.batch_size)
        if not recs:
            return 0
        with self._batch("detect", len(recs)):
            out = det.process_raw((r.offset, r.value) for r in recs)
            await self._commit_detect(p, det, out, out.next_offset)
            self._detect_committed(p, det, out)
            await self._publish("detect", p, self.gen_detect[p], out.messages)
        return len(recs)

    async def _commit_detect(
        self, p: int, det: Detect, out: DetectOutput, next_offset: Mapping[str, int]
    ) -> None:
        """Stage 2's checkpoint of partition ``p`` (state, offsets, outbox, kill-switch
        states), then its metrics."""
        with self._checkpoint("detect"):
            await self.store.commit(
                "detect",
                p,
                self.gen_detect[p],
                state=det.snapshot(),
                next_offset=next_offset,
                outbox=out.messages,
                killswitch=out.killswitch,
            )
        self._observe_detect(det, out)

    def _detect_committed(self, p: int, det: Detect, out: DetectOutput) -> None:
        self.result.commits += 1
        self.result.alerts.extend(out.alerts)
        self.result.commands.extend(out.commands)
        if self.keep_findings:
            self.result.findings.extend(out.findings)
        if self.on_detect is not None:
            self.on_detect(det, out)

    async def drain(self, now: float, on_progress: Callable[[], None] | None = None) -> None:
        """Process everything on the bus (stage 1 on all partitions, then stage 2)."""
        if not self._claimed:
            await self.start()
        while True:
            moved = 0
            for p in range(self.partitions):
                moved += await self.step_ingest(p, now)
            for p in range(self.partitions):
                moved += await self.step_detect(p)
            if on_progress is not None:
                on_progress()
            if not moved:
                self.report()
                return

    async def finish(self, now: float) -> None:
        """Idle flush: close every tick up to ``now`` and run stage 2 over the rest."""
        self.clock = max(self.clock, now)
        for p in range(self.partitions):
            await self.flush_ingest(p, now)
        await self.drain(now)

    async def manual(self, model_id: str, action: str, now: float, **kw: Any) -> dict[str, Any]:
        """Manual kill-switch operation on the stage-2 partition owning ``model_id``."""
        p = partition_for(model_id.encode(), self.partitions)
        det = self.detect[p]
        out = det.manual(model_id, action, now, **kw)
        await self._commit_detect(p, det, out, det.next_offset)
        self.result.commands.extend(out.commands)
        await self._publish("detect", p, self.gen_detect[p], out.messages)
        return out.commands[0]


# --------------------------------------------------------------------------- replay


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Events from a JSONL (optionally gzipped: ``.jsonl.gz``) or Parquet log.

    Parquet: flat columns, ``features`` / ``slice`` / ``llm`` structs. Parquet has no
    "absent": a null value (top level, or inside ``slice``, ``llm`` and ``llm.flags`` —
    struct columns get the union of all rows' keys) means the field was absent.
    """
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        rows = []
        for row in pq.read_table(p).to_pylist():
            ev = {k: v for k, v in row.items() if v is not None}
            for key in ("slice", "llm"):
                if isinstance(ev.get(key), dict):
                    ev[key] = {k: v for k, v in ev[key].items() if v is not None}
            flags = ev.get("llm", {}).get("flags")
            if isinstance(flags, dict):
                ev["llm"]["flags"] = {k: v for k, v in flags.items() if v is not None}
            rows.append(ev)
        return rows
    out = []
    with gzip.open(p, "rb") if p.suffix.lower() == ".gz" else p.open("rb") as fh:
        for line in fh:
            if line.strip():
                out.append(orjson.loads(line))
    return out


def _is_label(ev: Mapping[str, Any]) -> bool:
    return "label" in ev and "features" not in ev


async def replay_async(
    config: MonitorConfig,
    logs: Sequence[str | Path],
    *,
    partitions: int = 2,
    tick_s: float = 1.0,
    lateness_s: float = 2.0,
    batch_size: int = 2000,
    out: TextIO | None = None,
    quiet: bool = False,
) -> RunResult:
    """Replay prediction/label logs in event-time order through the embedded service.

    Prints progress to stderr and the timeline to ``out`` (default stdout) unless ``quiet``.
    """
    if out is None and not quiet:
        out = sys.stdout
    events: list[dict[str, Any]] = []
    for log in logs:
        events.extend(read_events(log))
    events.sort(key=lambda e: float(e.get("ts", 0.0)))
    runner = EmbeddedRunner(
        config,
        partitions=partitions,
        tick_s=tick_s,
        lateness_s=lateness_s,
        batch_size=batch_size,
        max_future_s=float("inf"),
    )
    await runner.start()
    t = runner.topics
    t0 = float(events[0].get("ts", 0.0)) if events else 0.0
    step = 5.0 * tick_s  # feed in event-time slices so that partitions progress together
    i = 0
    last_ts = t0
    while i < len(events):
        until = float(events[i].get("ts", 0.0)) + step
        while i < len(events) and float(events[i].get("ts", 0.0)) < until:
            ev = events[i]
            runner.produce(t.labels if _is_label(ev) else t.predictions, [ev])
            last_ts = max(last_ts, float(ev.get("ts", 0.0)))
            i += 1
        await runner.drain(now=last_ts)
        if out is not None:
            print(
                f"\rreplay: {i}/{len(events)} events, {len(runner.result.alerts)} alerts",
                end="",
                file=sys.stderr,
                flush=True,
            )
    await runner.finish(last_ts + 3600.0)
    if out is not None:
        print(file=sys.stderr)
        print(f"t = seconds after the first event (ts {t0})", file=out)
        print_timeline(runner.result, out=out, t0=t0)
    return runner.result


def replay(config: MonitorConfig, logs: Sequence[str | Path], **kw: Any) -> RunResult:
    return asyncio.run(replay_async(config, logs, **kw))


def print_timeline(
    result: RunResult,
    *,
    out: TextIO,
    t0: float | None = None,
    after_change: Callable[[Mapping[str, Any]], str] | None = None,
) -> None:
    """Alert and kill-switch timeline, one line each."""
    rows: list[tuple[float, str]] = []
    for a in result.alerts:
        where = a.get("feature") or a.get("slice") or "-"
        rel = a["detected_at"] - t0 if t0 is not None else a["detected_at"]
        extra = f"  {after_change(a)}" if after_change else ""
        rows.append(
            (
                a["detected_at"],
                f"t={rel:8.1f}s  ALERT {a['severity']:<8} {a['kind']:<16} {a['model_id']} "
                f"{a['model_version']:<3} {where:<22} {a['detector']:<22} "
                f"stat={a['statistic']:.4g} thr={a['threshold']:.4g}{extra}",
            )
        )
    for c in result.commands:
        rel = c["issued_at"] - t0 if t0 is not None else c["issued_at"]
        rows.append(
            (
                c["issued_at"],
                f"t={rel:8.1f}s  KILL-SWITCH {c['action']:<8} {c['model_id']} "
                f"target={c.get('target_version')} mode={c['mode']} "
                f"reasons={','.join(c['reason_alert_ids']) or '-'}",
            )
        )
    if not rows:
        print("no alerts", file=out)
    for _, line in sorted(rows, key=lambda r: r[0]):
        print(line, file=out)


def first_alert_for(
    alerts: Sequence[Mapping[str, Any]],
    *,
    after: float,
    kinds: Sequence[str],
    version: str,
    feature: str | None = None,
    slice_key: str | None = None,
) -> Mapping[str, Any] | None:
    """The first alert at or after ``after`` matching kind/version/feature/slice."""
    for a in sorted(alerts, key=lambda a: a["detected_at"]):
        if a["detected_at"] < after or a["kind"] not in kinds or a["model_version"] != version:
            continue
        if feature is not None and a.get("feature") != feature:
            continue
        if slice_key is not None and a.get("slice") != slice_key:
            continue
        return a
    return None


def model_config(config: MonitorConfig, model_id: str) -> ModelConfig:
    try:
        return config.models[model_id]
    except KeyError:
        valid = ", ".join(sorted(config.models))
        raise ValueError(
            f"--model: {model_id!r} is not in the config; valid values: {valid}"
        ) from None


def wall() -> float:
    return time.perf_counter()
