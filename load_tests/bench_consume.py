"""Consumer baselines side by side, in one run, on the same topics.

Run ``python -m load_tests.bench_consume [--quick]``; writes
``load_tests/results/consume.json`` and ``consume.md`` and prints the Markdown summary.
Kafka comes from ``DRIFTLINE_KAFKA_BOOTSTRAP`` (else the local Kafka 4.3.1 of
``scripts/services.py`` is started), Redis from ``DRIFTLINE_REDIS_URL`` (else a local
redis-server); whatever was started here is stopped at the end.

The same seeded events (about 400 bytes each) are produced to one topic per layout — one
event per Kafka message, and N events per message as JSON arrays (N defaults to the
producer SDK's batch size) — and every baseline consumes the whole topic from the beginning
in its own fresh process:

``aiokafka``      raw ``AIOKafkaConsumer.getmany`` + ``orjson.loads`` (the ceiling for an
                  asyncio worker; what ``stream.worker`` is built on)
``confluent``     raw ``confluent_kafka.Consumer.consume(num_messages=...)`` + orjson
``faust_take``    a faust agent doing ``stream.take(10000, within=0.2)`` and only parsing
``faust_naive``   a faust agent handling events one by one with one Redis call per event
                  (the anti-pattern: what a straightforward faust implementation does)

Rates: all events over the time from "ready" (raw clients: positioned at the beginning;
faust: partitions assigned) to the last delivery, so start-up and group joins do not count;
a steady-state rate excluding the first delivery is recorded too (see
:class:`load_tests.common.RateMeter`). Repetitions are interleaved
(the order of the baselines rotates each repetition) and the median is reported, with every
run's value and the ratios of the medians. Absolute numbers depend on the machine and its
load (the JSON records both); the ratios, measured side by side, are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from load_tests.common import (
    RESULTS_DIR,
    RateMeter,
    create_topics,
    delete_topics,
    machine_info,
    md_table,
    ratio,
    run_child,
    services,
    summarize_runs,
    unique,
    write_child_result,
    write_results,
)
from load_tests.generator import SDK_BATCH_EVENTS, GenConfig, generate, messages, produce

BASELINES = ("aiokafka", "confluent", "faust_take", "faust_naive")
MODULE = "load_tests.bench_consume"


def _count(doc: Any) -> int:
    return len(doc) if type(doc) is list else 1


# --------------------------------------------------------------------------- children


async def _child_aiokafka(a: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=a.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    tps = [TopicPartition(a.topic, p) for p in range(a.partitions)]
    consumer.assign(tps)
    await consumer.start()
    try:
        await consumer.seek_to_beginning(*tps)
        meter = RateMeter(a.expect_events)
        meter.mark_ready()
        loads = orjson.loads
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if not got:
                continue
            ev = ms = 0
            for recs in got.values():
                for r in recs:
                    ev += _count(loads(r.value))
                ms += len(recs)
            if meter.add(ev, ms):
                break
        return meter.result()
    finally:
        await consumer.stop()


def _child_confluent(a: argparse.Namespace) -> dict[str, Any]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": a.bootstrap,
            "group.id": unique("bench-ck"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.list_topics(a.topic, timeout=30)  # connect before the clock starts
    consumer.assign([TopicPartition(a.topic, p, OFFSET_BEGINNING) for p in range(a.partitions)])
    meter = RateMeter(a.expect_events)
    meter.mark_ready()
    loads = orjson.loads
    deadline = time.monotonic() + a.timeout
    try:
        while time.monotonic() < deadline:
            # consume() waits until num_messages arrived or the timeout: never ask for more
            # than the topic still holds, or the last call waits for the timeout
            want = max(1, min(10_000, a.expect_messages - meter.messages))
            msgs = consumer.consume(num_messages=want, timeout=1.0)
            if not msgs:
                continue
            ev = ms = 0
            for m in msgs:
                value = m.value()
                if m.error() is not None or value is None:
                    continue
                ev += _count(loads(value))
                ms += 1
            if ms and meter.add(ev, ms):
                break
        return meter.result()
    finally:
        consumer.close()


def _child_faust(a: argparse.Namespace, naive: bool) -> None:
    """Run a faust worker until the expected events were seen, then write and hard-exit."""
    import faust

    datadir = tempfile.mkdtemp(prefix="dl-bench-faust-")
    app = faust.App(
        unique("bench-faust"),
        broker=f"kafka://{a.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        datadir=datadir,
        topic_partitions=a.partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(a.topic, value_serializer="raw", key_serializer="raw")
    meter = RateMeter(a.expect_events)
    loads = orjson.loads

    def finish() -> None:
        doc = meter.result()
        doc["redis_calls"] = calls[0]
        write_child_result(a.child_result, doc)
        sys.stdout.flush()
        shutil.rmtree(datadir, ignore_errors=True)
        os._exit(0)  # faust's shutdown takes seconds and is not what is measured

    calls = [0]

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        if assigned:
            meter.mark_ready()

    if naive:
        import redis.asyncio as aioredis

        @app.agent(topic)
        async def naive_agent(stream: Any) -> None:
            client = aioredis.Redis.from_url(a.redis)
            key = unique("bench:naive")
            async for value in stream:
                doc = loads(value)
                evs = doc if type(doc) is list else [doc]
                for ev in evs:
                    # one round trip per event: the anti-pattern DESIGN.md names
                    await client.hincrby(key, ev["model_id"], 1)
                    calls[0] += 1
                if meter.add(len(evs), 1):
                    finish()

    else:

        @app.agent(topic)
        async def take_agent(stream: Any) -> None:
            async for values in stream.take(10_000, within=0.2):
                ev = 0
                for v in values:
                    ev += _count(loads(v))
                if meter.add(ev, len(values)):
                    finish()

    async def watchdog() -> None:
        await asyncio.sleep(a.timeout)
        doc = meter.result()
        doc["error"] = f"timeout after {a.timeout}s with {meter.events} events"
        write_child_result(a.child_result, doc)
        shutil.rmtree(datadir, ignore_errors=True)
        os._exit(3)

    background: list[asyncio.Future[None]] = []

    @app.task
    async def start_watchdog() -> None:
        background.append(asyncio.ensure_future(watchdog()))

    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.execute_from_commandline()


def child_main(a: argparse.Namespace) -> int:
    if a.child == "aiokafka":
        write_child_result(a.child_result, asyncio.run(_child_aiokafka(a)))
    elif a.child == "confluent":
        write_child_result(a.child_result, _child_confluent(a))
    elif a.child in ("faust_take", "faust_naive"):
        _child_faust(a, naive=a.child == "faust_naive")
    else:
        raise SystemExit(f"--child: {a.child!r} is not valid; valid values: {', '.join(BASELINES)}")
    return 0


def run_baseline(
    name: str,
    *,
    bootstrap: str,
    topic: str,
    events: int,
    messages: int,
    partitions: int,
    redis_url: str | None,
    timeout: float,
) -> dict[str, Any]:
    """One baseline in a fresh process (also used by ``bench_stage1 --e2e``)."""
    args = [
        "--child",
        name,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--expect-events",
        str(events),
        "--expect-messages",
        str(messages),
        "--partitions",
        str(partitions),
        "--timeout",
        str(timeout),
    ]
    if redis_url:
        args += ["--redis", redis_url]
    return run_child(MODULE, args, timeout=timeout + 60)


# --------------------------------------------------------------------------- driver


def run(a: argparse.Namespace) -> dict[str, Any]:
    layouts = [int(x) for x in a.events_per_message.split(",")]
    names = [b for b in a.baselines.split(",") if b]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise SystemExit(f"--baselines: {bad} not valid; valid values: {', '.join(BASELINES)}")
    machine = machine_info()
    gen = generate(GenConfig(n_events=a.events, seed=a.seed, rate=10_000.0))
    results: dict[str, Any] = {
        "config": {
            "events": gen.n_events,
            "events_per_message": layouts,
            "partitions": a.partitions,
            "reps": a.reps,
            "baselines": names,
            "mean_event_bytes": round(gen.mean_prediction_bytes(), 1),
            "generator": gen.info,
        },
        "machine": machine,
        "layouts": {},
    }
    need_redis = "faust_naive" in names
    with services(kafka=True, redis=need_redis) as svc:
        assert svc.kafka_bootstrap is not None
        results["services"] = svc.describe()
        topics: dict[int, str] = {}
        try:
            for epm in layouts:
                topic = unique(f"bench-consume-{epm}")
                create_topics(svc.kafka_bootstrap, [topic], a.partitions)
                topics[epm] = topic
                msgs = messages(gen, events_per_message=epm, partitions=a.partitions)
                prod = produce(svc.kafka_bootstrap, msgs, {"prediction": topic})
                results["layouts"][str(epm)] = {"topic": topic, "produce": prod, "runs": {}}
                print(f"produced {prod['events']} events in {prod['messages']} messages to {topic}")
            for rep in range(a.reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for epm in layouts:
                    for name in order:
                        res = run_baseline(
                            name,
                            bootstrap=svc.kafka_bootstrap,
                            topic=topics[epm],
                            events=gen.n_events,
                            messages=results["layouts"][str(epm)]["produce"]["messages"],
                            partitions=a.partitions,
                            redis_url=svc.redis_url,
                            timeout=a.timeout,
                        )
                        runs = results["layouts"][str(epm)]["runs"].setdefault(name, [])
                        runs.append(res)
                        print(
                            f"rep {rep + 1}/{a.reps} epm={epm:<4} {name:<12} "
                            f"{res.get('events_per_s') or 0:>12,.0f} events/s "
                            f"{res.get('messages_per_s') or 0:>10,.0f} msgs/s "
                            f"(cpu {res['child_cpu_s']:.1f}s)",
                            flush=True,
                        )
        finally:
            delete_topics(svc.kafka_bootstrap, list(topics.values()))
    _aggregate(results)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _aggregate(results: dict[str, Any]) -> None:
    for lay in results["layouts"].values():
        summary: dict[str, Any] = {}
        for name, runs in lay["runs"].items():
            summary[name] = {
                "events_per_s": summarize_runs([r["events_per_s"] or 0.0 for r in runs]),
                "events_per_s_at_90pct": summarize_runs(
                    [r.get("events_per_s_at_90pct") or 0.0 for r in runs]
                ),
                "messages_per_s": summarize_runs([r["messages_per_s"] or 0.0 for r in runs]),
                "cpu_us_per_event": summarize_runs(
                    [1e6 * r["child_cpu_s"] / max(1, r["events"]) for r in runs]
                ),
            }
        base = summary.get("aiokafka", {}).get("events_per_s", {}).get("median")
        for s in summary.values():
            s["ratio_to_aiokafka"] = ratio(s["events_per_s"]["median"], base)
        lay["summary"] = summary


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    m = results["machine"]
    lines = [
        "# Consumer baselines (load_tests/bench_consume.py)",
        "",
        f"{cfg['events']:,} events of ~{cfg['mean_event_bytes']:.0f} B, "
        f"{cfg['partitions']} partition(s), {cfg['reps']} interleaved repetition(s), median; "
        f"{m['cpu_count']} CPUs, load average {m['loadavg_at_start']} at start, "
        f"{results.get('loadavg_at_end')} at end. Kafka: {results['services']['kafka_source']}.",
        "",
    ]
    rows = []
    for epm, lay in results["layouts"].items():
        for name, s in lay["summary"].items():
            rows.append(
                [
                    epm,
                    name,
                    s["events_per_s"]["median"],
                    s["events_per_s_at_90pct"]["median"],
                    s["messages_per_s"]["median"],
                    s["cpu_us_per_event"]["median"],
                    s["ratio_to_aiokafka"],
                    ", ".join(f"{v:,.0f}" for v in s["events_per_s"]["runs"]),
                ]
            )
    lines += md_table(
        [
            "events/msg",
            "baseline",
            "events/s",
            "events/s to 90 %",
            "msgs/s",
            "CPU µs/event",
            "× aiokafka",
            "runs (events/s)",
        ],
        rows,
    )
    lines.append("")
    lines.append(
        "CPU µs/event is the child's whole-process CPU (start-up included) over all events."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few events, one repetition")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument(
        "--events-per-message",
        default=f"1,{SDK_BATCH_EVENTS}",
        help=f"comma-separated layouts (default 1,{SDK_BATCH_EVENTS})",
    )
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=240.0, help="per child (s)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "consume.json")
    # child-process mode (internal)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--topic", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--expect-events", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--expect-messages", type=int, default=10_000, help=argparse.SUPPRESS)
    ap.add_argument("--redis", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a)
    if a.events is None:
        a.events = 6_000 if a.quick else 60_000
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    results = run(a)
    path = write_results("consume", results, a.out)
    md = markdown(results)
    path.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
