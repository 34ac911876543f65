"""Hostile input at volume on the real worker, real Kafka and real Redis (issue 7).

* poison at volume: thousands of good seeded predictions and labels on two partitions,
  interleaved with malformed JSON, non-object JSON, wrong schemas, NaN/Infinity, future
  timestamps, a 10 MB message and a flood of 20,000 random model ids: every good event is
  counted exactly once, every bad one is on the dead-letter topic with the right reason
  (count per reason equal to what was injected), both partitions advance to their end, and
  the worker's metrics never carry a flooded model id (bounded series);
* labels at volume: duplicate labels (same event id in one batch, across batches, after a
  worker restart, and with new event ids), early labels (before their prediction), late
  labels (after the label horizon) and replayed label batches: every pair joined once, the
  duplicates and early/late labels counted as the join contract (``stream/store.py``) says;
* kill-switch requests at volume: every manual request sent four times (at once, replayed
  later, replayed again after a worker restart): one state transition and one control
  command per request id, the Redis mirror agrees, duplicates counted;
* an output the broker refuses as too large (a summaries topic with a tiny
  ``max.message.bytes``) becomes a dead-letter record (``output_too_large``) and the stage
  keeps going, instead of being retried forever.

Each test prints one ``hostile ...`` line with its numbers (the table of the issue's
closing note).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from stream.config import MonitorConfig, Topics
from stream.partitioner import murmur2_partition
from stream.profile import Profile
from stream.scenario import generate
from stream.worker import Worker, manual_request
from tests.fixtures.services import TopicFactory
from tests.fixtures.worker_harness import (
    TopicReader,
    WorkerEnv,
    counted,
    interleaved,
    produce,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

PARTITIONS = 2
BIG = 10 << 20  # the 10 MB payload
FLOOD = 20_000  # random model ids
FLOOD_PER_MSG = 500


def _make_env(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    prefix: str,
    **configs: dict[str, str],
) -> WorkerEnv:
    """:func:`tests.fixtures.worker_harness.make_env` with per-topic configs
    (``predictions={"max.message.bytes": ...}``)."""

    def make(kind: str, partitions: int, **extra: str) -> str:
        config = {**extra, **configs.get(kind, {})}
        return topic_factory(partitions, name=f"{prefix}-{unique_id}-{kind}", config=config)

    topics = Topics(
        predictions=make("predictions", PARTITIONS),
        labels=make("labels", PARTITIONS),
        summaries=make("summaries", PARTITIONS),
        alerts=make("alerts", 1),
        control=make("control", 1, **{"cleanup.policy": "compact"}),
        deadletter=make("deadletter", 1),
    )
    return WorkerEnv(kafka_bootstrap, redis_url, topics, unique_id, prefix)


def _with_horizon(cfg: MonitorConfig, horizon_s: float) -> MonitorConfig:
    fraud = dataclasses.replace(cfg.models["fraud"], label_horizon_s=horizon_s)
    return dataclasses.replace(cfg, models={**cfg.models, "fraud": fraud})


def _part(request_id: str) -> int:
    """The partition the SDK (murmur2 of the request id) puts a request on."""
    return murmur2_partition(request_id.encode(), PARTITIONS)


def _unique(values: Iterable[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for v in values:
        out.setdefault(v[key], v)
    return out


async def _scrape(worker: Worker) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{worker.web_port}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def _samples(body: str) -> Iterator[tuple[str, str, dict[str, str], float]]:
    """(family, sample name, labels, value) of a Prometheus exposition."""
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            yield fam.name, s.name, s.labels, s.value


def _sample(body: str, name: str, **labels: str) -> float:
    return sum(
        v
        for _, n, lab, v in _samples(body)
        if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


async def _end_offsets(worker: Worker, topics: Iterable[str]) -> dict[TopicPartition, int]:
    consumer = worker.stages[0].consumer
    assert consumer is not None
    tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
    ends = await consumer.end_offsets(tps)
    return {tp: int(off) for tp, off in ends.items()}


def _assert_alive(*workers: Worker) -> None:
    for w in workers:
        assert all(s.task is not None and not s.task.done() for s in w.stages), "a stage died"
        c = w.stats.counters
        assert c["ingest_batch_errors"] == c["detect_batch_errors"] == 0, dict(c)


# --------------------------------------------------------------------------- 1. poison


def _poison(
    now: float, pred: dict[str, Any], label: dict[str, Any], rng: np.random.Generator
) -> list[tuple[str, bytes, str, int]]:
    """Bad messages: (kind, value, expected reason, rejected events in it)."""
    bad: list[tuple[str, bytes, str, int]] = []

    def add(kind: str, value: bytes, reason: str, n: int = 1) -> None:
        bad.append((kind, value, reason, n))

    def p(i: str, **kw: Any) -> dict[str, Any]:
        return {**pred, "event_id": f"bad-{i}", "request_id": f"bad-req-{i}", **kw}

    for i in range(100):
        add("prediction", b'{"event_id": "x%d", "model_id": "fraud"' % i, "not_json")
        add("prediction", b"\xff\xfe garbage %d" % i, "not_json")
        add("label", b"not json at all %d" % i, "not_json")
    for i, v in enumerate([b"42", b'"a string"', b"null", b"true", b"[7]"] * 40):
        add("prediction" if i % 2 else "label", v, "not_object")
    for i in range(60):
        add("prediction", orjson.dumps(p(f"ts{i}", ts="yesterday")), "schema:ts")
        add("prediction", orjson.dumps(p(f"pr{i}", prediction={"x": 1})), "schema:prediction")
        no_feat = {k: v for k, v in p(f"nf{i}").items() if k != "features"}
        add("prediction", orjson.dumps(no_feat), "schema:features")
        add("prediction", orjson.dumps(p(f"ux{i}", pwned=True)), "schema:unexpected_field")
        add("prediction", orjson.dumps(p(f"mi{i}", model_id="x" * 300)), "schema:model_id")
        no_model = {k: v for k, v in p(f"nm{i}").items() if k != "model_id"}
        add("prediction", orjson.dumps(no_model), "missing_model_id")
        add("label", orjson.dumps({**label, "event_id": f"bl{i}", "label": [1]}), "schema:label")
    for i in range(60):  # NaN / Infinity outside the features (Python's json emits them)
        add("prediction", json.dumps(p(f"ns{i}", score=float("nan"))).encode(), "non_finite")
        add("prediction", json.dumps(p(f"it{i}", ts=float("inf"))).encode(), "non_finite")
        lab = {**label, "event_id": f"ln{i}", "label": float("-inf")}
        add("label", json.dumps(lab).encode(), "non_finite")
        add("prediction", orjson.dumps(p(f"fu{i}", ts=now + 86_400.0)), "future_timestamp")
    add("prediction", orjson.dumps(p("huge", pad="x" * BIG)), "too_large")
    ids = rng.integers(0, 2**62, size=FLOOD)
    for start in range(0, FLOOD, FLOOD_PER_MSG):
        msg = [
            p(f"flood{start + j}", model_id=f"m{ids[start + j]:x}") for j in range(FLOOD_PER_MSG)
        ]
        add("prediction", orjson.dumps(msg), "unknown_model", FLOOD_PER_MSG)
    return bad


def test_poison_at_volume_dead_lettered_partitions_flow_metrics_bounded(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    demo: tuple[MonitorConfig, Profile],
) -> None:
    cfg, profile = demo
    env = _make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "hostile",
                    predictions={"max.message.bytes": str(BIG + (2 << 20))})  # fmt: skip
    now = time.time()
    preds, labels = generate(rate=12.0, seed=71, start=now - 400.0)
    # good events with NaN in a feature: data, not an error (counted as nan per feature)
    nan_preds = preds[:60]
    rest = preds[60:]
    dup_of = rest[:100]  # re-sent with the same event id and key: duplicate_event_id
    rng = np.random.default_rng(71)
    bad = _poison(now, preds[0], labels[0], rng)
    bad += [("prediction", orjson.dumps(ev), "duplicate_event_id", 1) for ev in dup_of]
    expected: Counter[str] = Counter()
    for _, _, reason, n in bad:
        expected[reason] += n
    order = rng.permutation(len(bad))
    bad = [bad[i] for i in order]
    good = list(interleaved(rest, labels))
    chunks = 5

    def send_bad(part: list[tuple[str, bytes, str, int]], offset: int) -> None:
        producer = Producer({"bootstrap.servers": env.bootstrap, "message.max.bytes": BIG * 2,
                             "linger.ms": 5})  # fmt: skip
        for i, (kind, value, reason, _) in enumerate(part):
            topic = env.topics.predictions if kind == "prediction" else env.topics.labels
            if reason == "duplicate_event_id":  # same partition as the original
                part_no = _part(orjson.loads(value)["request_id"])
            else:
                part_no = (offset + i) % PARTITIONS
            producer.produce(topic, value=value, key=f"bad-{offset + i}".encode(),
                             partition=part_no)  # fmt: skip
            producer.poll(0)
        for ev in nan_preds if offset == 0 else ():
            raw = json.dumps({**ev, "features": {**ev["features"], "amount": float("nan")}})
            rid = ev["request_id"]
            producer.produce(env.topics.predictions, value=raw.encode(), key=rid.encode(),
                             partition=_part(rid))  # fmt: skip
        assert producer.flush(60) == 0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(), env.opts(), profiles={"fraud": profile})
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        dead = TopicReader(env.bootstrap, env.topics.deadletter)
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            t0 = time.perf_counter()
            per = -(-len(good) // chunks)
            bper = -(-len(bad) // chunks)
            for c in range(chunks):
                await loop.run_in_executor(None, produce, env, iter(good[c * per : (c + 1) * per]))
                await loop.run_in_executor(None, send_bad, bad[c * bper : (c + 1) * bper], c * bper)
            total_bad = sum(expected.values())
            await until(
                "every bad event dead-lettered",
                lambda: len(_unique(dead.values, "deadletter_id")) >= total_bad,
                90,
                dead.poll,
            )
            want = (len(preds), len(labels))
            await until("every good event counted", lambda: counted(summaries.values)[:2] >= want,
                        60, summaries.poll)  # fmt: skip
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # a double count or a late dead letter would show now
            await loop.run_in_executor(None, summaries.poll, 1.0)
            await loop.run_in_executor(None, dead.poll, 1.0)
            n_pred, n_lab, n_sum = counted(summaries.values)
            assert (n_pred, n_lab) == want
            records = _unique(dead.values, "deadletter_id")
            got = Counter(d["reason"] for d in records.values())
            assert got == expected, {r: (got[r], expected[r]) for r in expected | got
                                     if got[r] != expected[r]}  # fmt: skip
            assert {d["partition"] for d in records.values()} == set(range(PARTITIONS))
            assert {d["topic"] for d in records.values()} == {
                env.topics.predictions, env.topics.labels,
            }  # fmt: skip
            huge = next(d for d in records.values() if d["reason"] == "too_large")
            assert huge["size"] > BIG and huge["raw_truncated"] is True
            flood = [d for d in records.values() if d["reason"] == "unknown_model"]
            # one event per record, not the message's head once per event
            one = orjson.loads(base64.b64decode(flood[0]["raw_b64"]))
            assert one["model_id"] == flood[0]["model_id"] != "fraud"
            dl_bytes = sum(len(orjson.dumps(d)) for d in records.values())
            # both partitions of both input topics checkpointed up to their end
            ends = await _end_offsets(worker, [env.topics.predictions, env.topics.labels])
            ingest = worker.stages[0]
            await until("every partition checkpointed to its end",
                        lambda: all(ingest._checkpointed.get(tp) == end
                                    for tp, end in ends.items()), 30)  # fmt: skip
            assert all(end > 0 for end in ends.values()), ends
            # metrics: model labels come from the config, never from input
            body = await _scrape(worker)
            allowed = set(cfg.models) | {"other"}
            model_series: Counter[str] = Counter()
            for fam, _, lab, _ in _samples(body):
                if "model" in lab:
                    assert lab["model"] in allowed, (fam, lab)
                    model_series[fam] += 1
            flood_ids = [d["model_id"] for d in flood[:50]]
            assert not any(i in body for i in flood_ids), "a flooded model id became a label"
            n_series = sum(1 for _ in _samples(body))
            assert n_series < 3000, n_series
            assert _sample(body, "driftline_events_rejected_total", reason="unknown_model") == FLOOD
            assert _sample(body, "driftline_events_rejected_total") == total_bad
            assert _sample(body, "driftline_events_accepted_total") == len(preds) + len(labels)
            _assert_alive(worker)
            print(
                f"\nhostile poison: produced {len(preds)} predictions + {len(labels)} labels "
                f"(good) and {len(bad)} bad messages holding {total_bad} bad events "
                f"({dict(sorted(expected.items()))}); counted {n_pred} + {n_lab} in {n_sum} "
                f"summaries; lost {len(preds) - n_pred} + {len(labels) - n_lab}; dead-lettered "
                f"{len(records)} ({dl_bytes / 1e6:.1f} MB of records); partitions at end "
                f"{ {f'{tp.topic[-6:]}/{tp.partition}': e for tp, e in sorted(ends.items())} }; "
                f"metric series {n_series} (with a model label: {sum(model_series.values())}); "
                f"{elapsed:.1f} s"
            )
        finally:
            summaries.close()
            dead.close()
            await worker.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- 2. labels


def test_duplicate_early_late_and_replayed_labels_are_joined_once(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    demo: tuple[MonitorConfig, Profile],
) -> None:
    """The join contract (``stream/store.py``): a pair forms once per request; a label for a
    joined request is ``duplicate``; a label without a parked prediction (before it, or
    after its TTL = label horizon) is ``early``; an event id seen again on the same
    partition is dead-lettered (``duplicate_event_id``) while the worker remembers it, and
    after a restart it reaches the join and is counted ``duplicate``."""
    cfg, profile = demo
    horizon = 15.0
    cfg = _with_horizon(cfg, horizon)
    env = _make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "hostile")
    now = time.time()
    preds, _ = generate(rate=10.0, seed=72, start=now - 300.0)
    preds = preds[:1200]
    rng = np.random.default_rng(72)
    groups = np.array_split(rng.permutation(len(preds)), 4)
    joined_, dup_, early_, late_ = ([preds[i] for i in g] for g in groups)

    def label(p: dict[str, Any], tag: str = "") -> dict[str, Any]:
        return {"event_id": f"lab-{p['request_id']}{tag}", "model_id": "fraud",
                "request_id": p["request_id"], "ts": p["ts"] + 2.0,
                "label": int(p["score"] > 0.5)}  # fmt: skip

    def events(kind: str, evs: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        return [(kind, e) for e in evs]

    j_labels = [label(p) for p in joined_]
    d_labels = [label(p) for p in dup_]
    d_new_ids = [label(p, "-again") for p in dup_]
    e_labels = [label(p) for p in early_]
    l_labels = [label(p) for p in late_]
    n = {k: len(v) for k, v in (("J", joined_), ("D", dup_), ("E", early_), ("L", late_))}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        dead = TopicReader(env.bootstrap, env.topics.deadletter)
        settings, opts = env.settings(), env.opts()
        workers = [Worker(cfg, settings, opts, profiles={"fraud": profile})]

        def join(outcome: str) -> float:
            labels = {"model": "fraud", "outcome": outcome}
            return sum(w.registry.get_sample_value("driftline_label_join_total", labels) or 0.0
                       for w in workers)  # fmt: skip

        def accepted() -> int:
            return sum(w.stats.counters["events_accepted"] for w in workers)

        async def send(evs: list[tuple[str, dict[str, Any]]], want_accepted: int) -> None:
            await loop.run_in_executor(None, produce, env, iter(evs))
            await until(f"{want_accepted} events accepted", lambda: accepted() >= want_accepted,
                        30)  # fmt: skip

        await workers[0].start()
        try:
            await asyncio.wait_for(workers[0].wait_assigned(), 60)
            # A: predictions J, D, L parked; labels E before their predictions (early)
            t_park = time.monotonic()
            a = events("prediction", joined_ + dup_ + late_) + events("label", e_labels)
            await send(a, len(a))
            # B: E's predictions (pair with the early label), labels of J and D, then D's
            # labels again with the same event ids in the same batch...
            b = events("prediction", early_) + events("label", j_labels + d_labels + d_labels)
            await send(b, len(a) + len(b) - n["D"])
            # ... across batches (same ids again) and with new event ids (a second label)
            c = events("label", d_labels + d_new_ids)
            await send(c, len(a) + len(b) - n["D"] + n["D"])
            await until("dead letters of the same-id duplicates",
                        lambda: len(_unique(dead.values, "deadletter_id")) >= 2 * n["D"], 30,
                        dead.poll)  # fmt: skip
            await workers[0].stop()
            # restart: the new worker's duplicate window is empty; replay D's labels and the
            # whole batch of J's labels (same messages again)
            workers.append(Worker(cfg, settings, opts, profiles={"fraud": profile}))
            await workers[1].start()
            await asyncio.wait_for(workers[1].wait_assigned(), 60)
            replay = events("label", d_labels + j_labels)
            before = accepted()
            await send(replay, before + len(replay))
            assert time.monotonic() - t_park < horizon - 1.0, "too slow for the horizon"
            # late: L's labels after their predictions' TTL (the label horizon)
            await asyncio.sleep(max(0.0, t_park + horizon + 1.5 - time.monotonic()))
            await send(events("label", l_labels), before + len(replay) + n["L"])
            want_joined = n["E"] + n["J"] + n["D"]
            want = {
                "joined": want_joined,
                "duplicate": n["D"] + n["D"] + n["J"],  # new ids; after the restart: D, J
                "early": n["E"] + n["L"],
            }

            def outcomes() -> Counter[str]:
                c: Counter[str] = Counter()
                for s in _unique(summaries.values, "summary_id").values():
                    c.update(s["labels"]["outcomes"])
                return c

            await until("the join outcomes in the summaries",
                        lambda: all(outcomes()[k] >= v for k, v in want.items()), 60,
                        summaries.poll)  # fmt: skip
            await asyncio.sleep(2.0)
            await loop.run_in_executor(None, summaries.poll, 1.0)
            await loop.run_in_executor(None, dead.poll, 1.0)
            got = outcomes()
            assert {k: got[k] for k in want} == want, got
            assert got["duplicate_request"] == 0, got
            for outcome, v in want.items():  # the metrics agree (summed over both workers)
                assert join(outcome) == v, (outcome, join(outcome), v)
            records = _unique(dead.values, "deadletter_id")
            assert Counter(d["reason"] for d in records.values()) == {
                "duplicate_event_id": 2 * n["D"]
            }
            n_pred, n_lab, n_sum = counted(summaries.values)
            label_events = (n["E"] + n["J"] + n["D"] + n["D"]) + len(replay) + n["L"]
            assert (n_pred, n_lab) == (len(preds), label_events)
            _assert_alive(workers[1])
            print(
                f"\nhostile labels: produced {len(preds)} predictions and "
                f"{label_events + 2 * n['D']} labels (J {n['J']} normal, D {n['D']} x5: "
                f"same id in the batch and across batches, new id, same id after a restart; "
                f"E {n['E']} early; L {n['L']} after the {horizon:.0f} s horizon; J replayed "
                f"after the restart); pairs joined {got['joined']} (want {want_joined}); "
                f"duplicate {got['duplicate']}; early {got['early']}; dead-lettered "
                f"duplicate_event_id {len(records)}; counted {n_pred} + {n_lab} in {n_sum} "
                f"summaries; lost 0"
            )
        finally:
            summaries.close()
            dead.close()
            await workers[-1].stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- 3. control


def test_duplicate_and_replayed_killswitch_requests_apply_once(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    demo: tuple[MonitorConfig, Profile],
) -> None:
    """Manual kill-switch requests (``driftline killswitch`` / the HTTP API put them on the
    summaries topic) sent twice at once, replayed, and replayed again after a restart:
    stage 2 applies each request id once."""
    cfg, profile = demo
    env = _make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "hostile")
    unique = 60
    actions = ["rollback", "release", "fallback", "release", "throttle", "release"]
    requests = [
        manual_request(
            "fraud",
            actions[i % len(actions)],
            reason=f"hostile {i}",
            target_version="v1" if actions[i % len(actions)] == "rollback" else None,
            issued_at=1_800_000_000.0 + i,
        )
        for i in range(unique)
    ]
    ids = [orjson.loads(r)["request_id"] for r in requests]
    trips = sum(1 for i in range(unique) if actions[i % len(actions)] != "release")

    def send(values: Iterable[bytes]) -> None:
        producer = Producer({"bootstrap.servers": env.bootstrap, "linger.ms": 5})
        for v in values:
            producer.produce(env.topics.summaries, value=v, key=b"fraud")
        assert producer.flush(30) == 0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        control = TopicReader(env.bootstrap, env.topics.control)
        opts = env.opts(stages=("detect",))
        workers = [Worker(cfg, env.settings(), opts, profiles={"fraud": profile})]

        def stat(name: str) -> int:
            return sum(w.stats.counters[name] for w in workers)

        def requests_counted(outcome: str) -> float:
            labels = {"model": "fraud", "outcome": outcome}
            return sum(w.registry.get_sample_value("driftline_killswitch_requests_total",
                                                   labels) or 0.0 for w in workers)  # fmt: skip

        await workers[0].start()
        try:
            await asyncio.wait_for(workers[0].wait_assigned(), 60)
            # each request twice in a row, then the whole sequence replayed
            await loop.run_in_executor(None, send, [r for r in requests for _ in range(2)])
            await loop.run_in_executor(None, send, requests)
            await until("every request read", lambda: stat("manual_applied")
                        + stat("manual_duplicates") >= 3 * unique, 30)  # fmt: skip
            await workers[0].stop()
            workers.append(Worker(cfg, env.settings(), opts, profiles={"fraud": profile}))
            await workers[1].start()
            await asyncio.wait_for(workers[1].wait_assigned(), 60)
            await loop.run_in_executor(None, send, requests)  # replayed after the restart
            await until("the replay read", lambda: stat("manual_applied")
                        + stat("manual_duplicates") >= 4 * unique, 30)  # fmt: skip
            await until("the commands on the control topic",
                        lambda: len(_unique(control.values, "command_id")) >= unique, 30,
                        control.poll)  # fmt: skip
            await asyncio.sleep(1.0)
            await loop.run_in_executor(None, control.poll, 1.0)
            commands = _unique(control.values, "command_id")
            assert len(commands) == unique, len(commands)
            assert [c["action"] for c in commands.values()] == [
                actions[i % len(actions)] for i in range(unique)
            ]
            assert all(c["mode"] == "manual" for c in commands.values())
            assert stat("manual_applied") == unique
            assert stat("manual_duplicates") == 3 * unique
            assert requests_counted("applied") == unique
            assert requests_counted("duplicate") == 3 * unique
            raw = await workers[1].store.get_killswitch("fraud")
            assert raw is not None
            mirror = orjson.loads(raw)
            assert (mirror["trips"], mirror["releases"]) == (trips, unique - trips), mirror
            assert mirror["active"] is False
            _assert_alive(workers[1])
            print(
                f"\nhostile control: {unique} unique kill-switch requests sent 4x each "
                f"({4 * unique} messages: twice at once, replayed, replayed after a restart); "
                f"applied {stat('manual_applied')}, duplicates dropped "
                f"{stat('manual_duplicates')}; control commands {len(commands)} "
                f"({len(control.values)} messages); mirror trips {mirror['trips']} releases "
                f"{mirror['releases']} (ids {len(set(ids))} unique)"
            )
        finally:
            control.close()
            await workers[-1].stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- 4. publish


@pytest.mark.parametrize(
    ("limit", "known_limit"),
    [(1024, False), (2300, True)],
    ids=["all-refused-by-the-broker", "some-too-large-known-limit"],
)
def test_output_refused_as_too_large_is_dead_lettered_and_the_stage_continues(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    demo: tuple[MonitorConfig, Profile],
    limit: int,
    known_limit: bool,
) -> None:
    """Summaries larger than their topic's ``max.message.bytes``; before the fix the
    publish of a summary the broker refused was retried forever and stage 1 stalled.

    * 1 KiB, below every summary, limit unknown to the publisher: the broker refuses each
      one; each becomes a dead-letter record (``output_too_large``), the producer is
      replaced (a refusal breaks the idempotent producer's sequence numbers) once per newly
      learned smaller size, and input dead letters sent after the refusals still arrive;
    * 2300 B, below some summaries (~1.9-2.7 KB here), limit read at start: the too-large
      ones are dead-lettered before sending, the others published in order (stage 2 applies
      every one of them: none dropped as out of order)."""
    cfg, profile = demo
    env = _make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "hostile",
                    summaries={"max.message.bytes": str(limit)})  # fmt: skip
    now = time.time()
    preds, _ = generate(rate=5.0, seed=73, start=now - 200.0)
    preds = preds[:600]
    half = len(preds) // 2

    def send_bad(tag: str, n: int) -> None:
        producer = Producer({"bootstrap.servers": env.bootstrap})
        for i in range(n):
            producer.produce(env.topics.predictions, value=b"not json %s %d" % (tag.encode(), i),
                             partition=i % PARTITIONS)  # fmt: skip
        assert producer.flush(30) == 0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(), env.opts(), profiles={"fraud": profile})
        dead = TopicReader(env.bootstrap, env.topics.deadletter)
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            # the worker read the topic's limit at start; forgetting it exercises the path
            # where the broker refuses (no DescribeConfigs permission, limit lowered later)
            assert worker.publisher.limits[env.topics.summaries] == limit
            if not known_limit:
                worker.publisher.limits.clear()

            def too_large() -> list[dict[str, Any]]:
                return [d for d in _unique(dead.values, "deadletter_id").values()
                        if d["reason"] == "output_too_large"]  # fmt: skip

            await loop.run_in_executor(
                None, produce, env, (("prediction", p) for p in preds[:half])
            )
            await loop.run_in_executor(None, send_bad, "a", 20)
            await until("a summary dead-lettered as too large", lambda: len(too_large()) > 0, 30,
                        dead.poll)  # fmt: skip
            # after the refusals: more input, more bad input
            await loop.run_in_executor(
                None, produce, env, (("prediction", p) for p in preds[half:])
            )
            await loop.run_in_executor(None, send_bad, "b", 20)
            ends = await _end_offsets(worker, [env.topics.predictions])
            ingest = worker.stages[0]
            await until("every input checkpointed",
                        lambda: all(ingest._checkpointed.get(tp) == e for tp, e in ends.items()),
                        30)  # fmt: skip
            body = await _scrape(worker)

            def emitted() -> float:
                v = worker.registry.get_sample_value("driftline_summaries_emitted_total")
                return v or 0.0

            def published_summaries() -> int:
                return len(_unique(summaries.values, "summary_id"))

            # the idle flush closes the last ticks within tick + lateness (3 s) of wall time
            await asyncio.sleep(3.5)
            last = [-1.0]

            def settled() -> bool:  # every emitted summary accounted for, emission stopped
                e = emitted()
                done = len(too_large()) + published_summaries() == e > 0 and e == last[0]
                last[0] = e
                return done

            await until("every emitted summary published or dead-lettered", settled, 30,
                        lambda: (dead.poll(), summaries.poll()))  # fmt: skip
            body = await _scrape(worker)
            records = _unique(dead.values, "deadletter_id")
            reasons = Counter(d["reason"] for d in records.values())
            big = too_large()
            n_emitted = int(_sample(body, "driftline_summaries_emitted_total"))
            assert reasons["not_json"] == 40, reasons
            n_published = published_summaries()
            assert len(big) + n_published == n_emitted > 0, (len(big), n_published, n_emitted)
            assert len(big) > 0 and (n_published > 0) == (limit > 1024)
            assert _sample(body, "driftline_output_too_large_total", topic="summaries",
                           outcome="dead_lettered") == len(big)  # fmt: skip
            assert _sample(body, "driftline_messages_published_total", topic="summaries") == (
                n_published
            )
            for d in big:  # the limit counts the record batch's overhead too
                assert d["topic"] == env.topics.summaries and d["size"] > limit - 200
                assert d["deadletter_id"].startswith("output:")
                head = base64.b64decode(d["raw_b64"])
                assert head.startswith(b"{") and b"summary_id" in head
            big_ids = {d["deadletter_id"].removeprefix("output:") for d in big}
            assert not big_ids & set(_unique(summaries.values, "summary_id"))

            # stage 2 applied every published summary: none arrived out of order
            def consumed() -> dict[str, float]:
                return {o: worker.registry.get_sample_value("driftline_summaries_consumed_total",
                                                            {"outcome": o}) or 0
                        for o in ("applied", "duplicate", "invalid")}  # fmt: skip

            try:
                await until("stage 2 to read the published summaries",
                            lambda: sum(consumed().values()) >= n_published, 30)  # fmt: skip
            except AssertionError:
                pub = list(_unique(summaries.values, "summary_id").values())
                order = [(s["partition"], s["seq"]) for s in summaries.values]
                raise AssertionError(
                    f"{consumed()} of {n_published}; {order}; {worker.stats.counters}; {len(pub)}"
                ) from None
            await asyncio.sleep(1.0)
            assert consumed() == {"applied": n_published, "duplicate": 0, "invalid": 0}, consumed()
            if known_limit:  # nothing was ever sent that the broker would refuse
                assert worker.publisher.resets == 0
            else:  # one producer per newly learned smaller refused size, not per message
                assert 1 <= worker.publisher.resets < max(10, n_emitted // 4), (
                    worker.publisher.resets
                )
            assert worker.stats.counters["events_accepted"] == len(preds)
            _assert_alive(worker)
            print(
                f"\nhostile publish too large ({limit} B topic limit): {len(preds)} predictions "
                f"+ 40 bad inputs; {n_emitted} summaries emitted, {n_published} published and "
                f"applied by stage 2 (0 out of order), {len(big)} dead-lettered as "
                f"output_too_large (sizes {min(d['size'] for d in big)}-"
                f"{max(d['size'] for d in big)} B); input dead letters {reasons['not_json']}/40; "
                f"producer replaced {worker.publisher.resets}x; stage alive, inputs "
                "checkpointed to the end"
            )
        finally:
            dead.close()
            summaries.close()
            await worker.stop()

    asyncio.run(main())
