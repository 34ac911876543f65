"""The worker as a service: alert latency, 2-worker scale-out, consumer batching A/B.

Every contender is the real worker process (``python -m stream.worker worker --config …``,
both stages, faust App, RedisStore) configured by ``DRIFTLINE_*`` environment variables,
on fresh topics and a fresh consumer group / Redis prefix per run. Kafka and Redis come from
``DRIFTLINE_KAFKA_BOOTSTRAP`` / ``DRIFTLINE_REDIS_URL`` or are started locally
(``load_tests.common.services``). Three modes::

    python -m load_tests.bench_service latency    # -> results/latency.{json,md}
    python -m load_tests.bench_service scaleout   # -> results/scaleout.{json,md}
    python -m load_tests.bench_service batching   # -> results/batching.{json,md}
    python -m load_tests.bench_service memory     # -> results/memory.{json,md}

Progress is read from the workers' durable checkpoints (the ``…:{ingest:<p>}:offsets`` keys
in Redis, polled every 20 ms), never from the workers themselves, so measuring costs them
nothing; offsets map to events exactly because the messages are known. CPU is read from
``/proc`` for every worker process, the Kafka broker and redis-server (found by their
listening ports), this benchmark process and the whole machine (``/proc/stat``), so the
JSON shows where the cores went (``rest_of_machine`` = other jobs on the box).

**throughput** (shared by the three modes): N worker processes start together in one
consumer group on an empty topic; once every worker answers ``/readyz`` and owns its share
of the ingest partitions (so no rebalance falls inside the measurement), ``--events``
pre-rendered stationary events of ``--models`` models (500 per message, partitioned by
``request_id`` like the SDK, event times = the recent past) are produced as fast as the
client goes (~0.5 s for 300k, faster than any worker consumes), and the run ends when every
partition's checkpoint reached the end. Rate = events / (start of production → all
checkpointed).

**latency**: a maximum sustainable rate from a throughput run of the same workload, then a
real-time producer (event ``ts`` = wall clock, one message per partition every
``--linger-ms`` holding all events due) at each of ``--rate-fractions`` of it (default
0.5, 0.25) for ``--seconds``; from second 3 on, a different model every second gets the
``scale_break`` scenario (``seller_quality_score`` sent on 0–100 instead of 0–1). The
alerts and summaries topics are created with ``message.timestamp.type=LogAppendTime``, so
their timestamps are when the broker appended the record. An alert's triggering tick is its
``window.end`` (end of the newest tick the detector's window holds); its latency is the
alert's broker timestamp minus the wall time the last message holding an event of that
model in that tick was handed to the producer, split into production → summary (the
tick's last summary) and summary → alert.
The same at ``--low-rate`` events/s for comparison.

**scaleout**: ``--partitions`` (default 4) partitions, 1 worker vs 2 workers (same
group, each gets half), interleaved repetitions, ratio of medians, CPU per 100k events for
the workers, Kafka and Redis, and the projection for N workers.

**batching**: ``DRIFTLINE_FETCH_PARTITION_BYTES`` variants of one worker on the same
workload, interleaved (``records-1MiB`` = the previous default, 1 MiB per partition per
fetch); events/s and the worker's CPU seconds per 100k events.

**memory**: one worker process (both stages) monitoring ``--models`` (default 1,000) ×
``--features`` (default 20) streams is fed ``--events`` events spread over ``--span-s``
(default 150) s of event time, so every detector window (60 ticks in the example config)
fills; the run ends once stage 2 has checkpointed every summary. The worker's ``VmRSS``
when ready, its ``VmRSS`` after the data, its peak (``VmHWM``: checkpoints included), and
the checkpointed stage-2 state per stream in Redis (``STRLEN``, ``MEMORY USAGE``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from load_tests.common import (
    REPO_ROOT,
    RESULTS_DIR,
    delete_topics,
    machine_info,
    md_table,
    proc_status_kb,
    ratio,
    services,
    summarize_runs,
    unique,
    write_results,
)
from load_tests.generator import (
    SDK_BATCH_EVENTS,
    GenConfig,
    Message,
    generate,
    messages,
    model_ids,
    monitor_config,
    produce,
    reference_profile,
)
from stream.config import Topics

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BATCH_VARIANTS: tuple[str, ...] = ("records-1MiB", "records-8MiB", "records-32MiB")
"""Default consumer batching variants (``batching`` mode): ``records-<F>MiB`` =
``DRIFTLINE_FETCH_PARTITION_BYTES`` of F MiB; ``records-1MiB`` is the old default. (Byte-capped
batches, ``bytes<B>M-<F>MiB`` in ``results/batching.json``, were measured with a prototype
``DRIFTLINE_BATCH_MAX_BYTES`` that was dropped because it was slower.)"""


def batch_env(name: str) -> dict[str, str]:
    """The ``DRIFTLINE_*`` variables of a batching variant name.

    >>> batch_env("records-8MiB")
    {'DRIFTLINE_FETCH_PARTITION_BYTES': '8388608'}
    """
    m = re.fullmatch(r"records-(\d+)MiB", name)
    if m is None:
        raise ValueError(f"variant: {name!r} is not valid; valid form: records-<F>MiB")
    return {"DRIFTLINE_FETCH_PARTITION_BYTES": str(int(m.group(1)) << 20)}


# --------------------------------------------------------------------------- CPU accounting


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    busy = sum(vals[:8]) - idle
    return busy / CLK_TCK, idle / CLK_TCK


def pid_listening_on(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (Linux, same-user or root)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                        return int(pid)
    return None


def _port_of(addr: str) -> int | None:
    tail = addr.split(",", maxsplit=1)[0].rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass
class CpuSnap:
    """CPU seconds of the watched processes and of the machine at one instant."""

    t: float
    procs: dict[str, float | None]
    busy: float
    idle: float

    @classmethod
    def take(cls, pids: Mapping[str, int | None]) -> CpuSnap:
        busy, idle = machine_cpu_s()
        return cls(
            time.perf_counter(),
            {k: proc_cpu_s(p) if p else None for k, p in pids.items()},
            busy,
            idle,
        )


def cpu_between(a: CpuSnap, b: CpuSnap, events: int) -> dict[str, Any]:
    """Where the cores went between two snapshots: seconds per process group, the rest of
    the machine (other jobs, this benchmark), idle; and CPU seconds per 100k events."""
    wall = b.t - a.t
    out: dict[str, Any] = {"wall_s": round(wall, 3)}
    groups: dict[str, float] = defaultdict(float)
    for k, v in b.procs.items():
        v0 = a.procs.get(k)
        if v is None or v0 is None:
            continue
        groups[k.split("#", 1)[0]] += v - v0
    busy = b.busy - a.busy
    idle = b.idle - a.idle
    known = sum(groups.values())
    out["cpu_s"] = {k: round(v, 3) for k, v in groups.items()}
    out["cpu_s"]["rest_of_machine"] = round(max(0.0, busy - known), 3)
    out["cpu_s"]["idle"] = round(idle, 3)
    out["cores_used"] = {k: round(v / wall, 2) for k, v in groups.items()} if wall > 0 else {}
    out["machine_busy_fraction"] = round(busy / (busy + idle), 3) if busy + idle > 0 else None
    if events > 0:
        out["cpu_s_per_100k_events"] = {
            k: round(v * 100_000 / events, 3) for k, v in groups.items()
        }
    return out


# --------------------------------------------------------------------------- deployment


def write_monitors(path: Path, models: int, n_features: int, label_horizon: str) -> None:
    """The generator's monitor config (``load_tests.generator.monitor_config``) as a file
    the worker process loads: JSON, which is YAML; one inline profile per model."""
    gcfg = GenConfig(models=models, versions=1, n_features=n_features)
    monitor_config(gcfg, label_horizon=label_horizon)  # validates the same document
    import yaml

    from load_tests.generator import EXAMPLE_MONITORS, REGIONS, _features_doc

    tdoc = yaml.safe_load(EXAMPLE_MONITORS.read_text(encoding="utf-8"))
    base = dict(next(iter(tdoc["models"].values())))
    base.pop("reference", None)
    base.pop("kill_switch", None)  # one version: nothing to roll back to
    base["features"] = _features_doc(n_features)
    base["slices"] = {"region": {"values": list(REGIONS)}}
    base["label_horizon"] = label_horizon
    prof = reference_profile("template", n_features)
    doc = {
        "version": 1,
        "models": {m: {**base, "reference": {**prof, "model_id": m}} for m in model_ids(gcfg)},
    }
    path.write_bytes(orjson.dumps(doc))


def create_topic_set(
    bootstrap: str, prefix: str, partitions: int, *, predictions: str | None = None
) -> Topics:
    """Fresh topics for one run (the alerts topic with broker append timestamps)."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    names = {k: unique(f"{prefix}-{k}") for k in Topics.__dataclass_fields__}
    if predictions is not None:
        names["predictions"] = predictions
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = []
    for k, n in names.items():
        if k == "predictions" and predictions is not None:
            continue
        parts = partitions if k in ("predictions", "labels", "summaries") else 1
        appended = k in ("alerts", "summaries")  # timestamps = broker append time
        conf = {"message.timestamp.type": "LogAppendTime"} if appended else {}
        new.append(NewTopic(n, num_partitions=parts, replication_factor=-1, config=conf))
    for f in admin.create_topics(new, operation_timeout=30).values():
        f.result(timeout=30)
    deadline = time.monotonic() + 30
    for t in new:
        while True:
            meta = admin.list_topics(topic=t.topic, timeout=30).topics.get(t.topic)
            if (
                meta is not None
                and meta.error is None
                and len(meta.partitions) == t.num_partitions
                and all(p.leader >= 0 for p in meta.partitions.values())
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {t.topic}: no leader after 30 s")
            time.sleep(0.1)
    return Topics(**names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProc:
    """One ``python -m stream.worker worker`` process and its HTTP port."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), ""
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self.http("/readyz")[0] == 200

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                return self.popen.wait(10)
        return self.popen.returncode


@dataclass
class Deployment:
    """Settings shared by the worker processes of one run (one group, one Redis prefix)."""

    bootstrap: str
    redis_url: str
    topics: Topics
    config_path: Path
    workdir: Path
    tick_s: float = 1.0
    lateness_s: float = 0.25
    extra_env: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: unique("svc"))

    @property
    def redis_prefix(self) -> str:
        return f"b{self.run_id}"

    def env(self, name: str, port: int) -> dict[str, str]:
        t = self.topics
        return {
            **os.environ,
            # the caller's PYTHONPATH stays behind the repo (e.g. a sitecustomize for tracing)
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "DRIFTLINE_KAFKA_BOOTSTRAP": self.bootstrap,
            "DRIFTLINE_REDIS_URL": self.redis_url,
            "DRIFTLINE_REDIS_PREFIX": self.redis_prefix,
            "DRIFTLINE_GROUP_PREFIX": f"grp-{self.run_id}",
            "DRIFTLINE_INSTANCE_ID": f"{self.run_id}-{name}",
            "DRIFTLINE_WEB_BIND": f"127.0.0.1:{port}",
            "DRIFTLINE_TICK_S": f"{self.tick_s:g}",
            "DRIFTLINE_ALLOWED_LATENESS_S": f"{self.lateness_s:g}",
            "DRIFTLINE_START_FROM": "earliest",
            **{f"DRIFTLINE_TOPIC_{k.upper()}": getattr(t, k) for k in Topics.__dataclass_fields__},
            **self.extra_env,
        }

    def spawn(self, name: str, stages: str = "ingest,detect") -> WorkerProc:
        port = _free_port()
        log = self.workdir / f"{self.run_id}-{name}.log"
        cmd = ["worker", "--config", str(self.config_path), "--stages", stages]
        popen = subprocess.Popen(
            [sys.executable, "-m", "stream.worker", *cmd],
            cwd=REPO_ROOT,
            env=self.env(name, port),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        return WorkerProc(name, popen, port, log)

    def offsets(self, client: Any, partitions: int, stage: str = "ingest") -> list[int]:
        """Next offset of the stage's input topic per partition, from its checkpoints
        (predictions for ingest, summaries for detect)."""
        topic = self.topics.predictions if stage == "ingest" else self.topics.summaries
        keys = [f"{self.redis_prefix}:{{{stage}:{p}}}:offsets" for p in range(partitions)]
        out = []
        for raw in client.mget(keys):
            doc = orjson.loads(raw) if raw else {}
            out.append(int(doc.get(topic, 0)))
        return out

    def generations(self, client: Any, partitions: int) -> list[int]:
        """How often each ingest partition was claimed (1 = never handed over)."""
        keys = [f"{self.redis_prefix}:{{ingest:{p}}}:gen" for p in range(partitions)]
        return [int(x or 0) for x in client.mget(keys)]

    def cleanup(self, client: Any) -> None:
        for key in client.scan_iter(match=f"{self.redis_prefix}:*", count=1000):
            client.delete(key)


def wait_ready(workers: Sequence[WorkerProc], limit_s: float = 120.0) -> float:
    """Wait until every worker answers ``/readyz`` 200; return the perf_counter then."""
    deadline = time.monotonic() + limit_s
    pending = list(workers)
    while pending:
        for w in list(pending):
            if not w.alive():
                raise RuntimeError(f"worker {w.name} exited {w.popen.returncode}:\n{w.tail()}")
            if w.ready():
                pending.remove(w)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready: {[w.name for w in pending]}")
        time.sleep(0.05)
    return time.perf_counter()


# --------------------------------------------------------------------------- produced workload


@dataclass
class Workload:
    """Pre-rendered messages for a throughput run and, per partition, the number of events
    before each offset (messages are produced in list order onto a fresh topic)."""

    msgs: list[Message]
    partitions: int
    cum_events: list[np.ndarray[Any, np.dtype[np.int64]]]
    models: int

    @property
    def total_events(self) -> int:
        return int(sum(int(c[-1]) for c in self.cum_events))

    @property
    def end_offsets(self) -> list[int]:
        return [len(c) - 1 for c in self.cum_events]

    def events_done(self, offsets: Sequence[int]) -> int:
        return int(
            sum(int(c[min(o, len(c) - 1)]) for c, o in zip(self.cum_events, offsets, strict=True))
        )


def workload(*, events: int, models: int, partitions: int, seed: int = 1) -> Workload:
    """``events`` stationary predictions (event times ending now), 500 per message,
    partitioned by ``request_id`` like the SDK."""
    rate = 20_000.0
    gcfg = GenConfig(
        n_events=events, seed=seed, models=models, rate=rate, start=time.time() - events / rate
    )
    gen = generate(gcfg)
    msgs = messages(gen, events_per_message=SDK_BATCH_EVENTS, partitions=partitions)
    per: dict[int, list[int]] = defaultdict(list)
    for m in msgs:
        per[m.partition].append(m.n_events)
    cum = [np.concatenate([[0], np.cumsum(per[p])]).astype(np.int64) for p in range(partitions)]
    return Workload(msgs, partitions, cum, models)


def assigned_ingest(w: WorkerProc) -> int:
    """The worker's ``driftline_assigned_partitions{stage="ingest"}`` (0 when unreadable)."""
    for line in w.http("/metrics")[1].splitlines():
        if line.startswith('driftline_assigned_partitions{stage="ingest"}'):
            return int(float(line.split()[-1]))
    return 0


def wait_assignment(workers: Sequence[WorkerProc], partitions: int, limit_s: float = 90.0) -> None:
    """Wait until the ingest partitions are spread over every worker (rebalances done)."""
    deadline = time.monotonic() + limit_s
    want = min(len(workers), partitions)
    while True:
        counts = [assigned_ingest(w) for w in workers]
        if sum(counts) == partitions and sum(1 for c in counts if c) == want:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ingest partitions not spread over the workers: {counts}")
        time.sleep(0.2)


def throughput_run(
    svc_kafka: str,
    svc_redis: str,
    wl: Workload,
    *,
    workers: int,
    config_path: Path,
    workdir: Path,
    stages: str = "ingest,detect",
    extra_env: Mapping[str, str] | None = None,
    watch: Mapping[str, int | None] | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """N worker processes in one group on an empty topic; once every worker is ready and
    owns its share of the partitions, the workload is produced (pre-rendered, as fast as
    the client goes) and the run ends when every partition is checkpointed at its end.
    Events/s and CPU accounting over [start of production, all checkpointed]."""
    import redis

    from load_tests.common import create_topics

    topic = unique("svc-pred")
    create_topics(svc_kafka, [topic], wl.partitions)
    topics = create_topic_set(svc_kafka, "svc", wl.partitions, predictions=topic)
    dep = Deployment(
        svc_kafka, svc_redis, topics, config_path, workdir, extra_env=dict(extra_env or {})
    )
    client = redis.Redis.from_url(svc_redis)
    procs: list[WorkerProc] = []
    try:
        procs = [dep.spawn(f"w{i}", stages) for i in range(workers)]
        wait_ready(procs)
        wait_assignment(procs, wl.partitions)
        gens0 = dep.generations(client, wl.partitions)
        pids = {
            **{f"workers#{w.name}": w.popen.pid for w in procs},
            **(watch or {}),
            "bench": os.getpid(),
        }
        snap0 = CpuSnap.take(pids)
        t0 = snap0.t
        prod = produce(svc_kafka, wl.msgs, {"prediction": topic})
        t_produced = time.perf_counter() - t0
        end = wl.end_offsets
        deadline = time.monotonic() + timeout_s
        t_done = None
        samples: list[tuple[float, int]] = []
        while time.monotonic() < deadline:
            offs = dep.offsets(client, wl.partitions)
            now = time.perf_counter()
            samples.append((round(now - t0, 3), wl.events_done(offs)))
            if all(o >= e for o, e in zip(offs, end, strict=True)):
                t_done = now
                break
            for w in procs:
                if not w.alive():
                    raise RuntimeError(f"worker {w.name} exited:\n{w.tail()}")
            time.sleep(0.02)
        snap1 = CpuSnap.take(pids)
        if t_done is None:
            raise TimeoutError(f"not all events checkpointed after {timeout_s}s")
        span = t_done - t0
        gens = dep.generations(client, wl.partitions)
        return {
            "workers": workers,
            "stages": stages,
            "events": wl.total_events,
            "seconds": round(span, 3),
            "events_per_s": round(wl.total_events / span, 1) if span > 0 else None,
            "produce_seconds": round(t_produced, 3),
            "produce": prod,
            "claims_per_partition_before": gens0,
            "claims_per_partition_after": gens,
            "cpu": cpu_between(snap0, snap1, wl.total_events),
            "progress_samples": samples[:: max(1, len(samples) // 50)],
            "extra_env": dict(extra_env or {}),
        }
    finally:
        for w in procs:
            rc = w.stop()
            if rc not in (0, None):
                print(f"worker {w.name} exit code {rc}:\n{w.tail(1500)}", file=sys.stderr)
        dep.cleanup(client)
        client.close()
        delete_topics(svc_kafka, [getattr(topics, k) for k in Topics.__dataclass_fields__])


def service_pids(svc: Any) -> dict[str, int | None]:
    """The Kafka broker and redis-server processes, found by their listening ports."""
    from urllib.parse import urlsplit

    kport = _port_of(svc.kafka_bootstrap)
    rport = urlsplit(svc.redis_url).port or 6379
    return {
        "kafka": pid_listening_on(kport) if kport else None,
        "redis": pid_listening_on(rport),
    }


# --------------------------------------------------------------------------- real-time load


@dataclass
class EventPool:
    """Pre-rendered event bodies (everything after the envelope), healthy and broken."""

    healthy: list[bytes]
    broken: list[bytes]

    @classmethod
    def build(cls, n: int = 4096, seed: int = 3, n_features: int = 10) -> EventPool:
        gen = generate(GenConfig(n_events=n, seed=seed, n_features=n_features))
        healthy, broken = [], []
        for raw in gen.predictions:
            doc = orjson.loads(raw)
            for k in ("event_id", "model_id", "model_version", "request_id", "ts"):
                doc.pop(k)
            healthy.append(orjson.dumps(doc)[1:])
            f = doc["features"]
            f["seller_quality_score"] = round(f["seller_quality_score"] * 100.0, 1)
            broken.append(orjson.dumps(doc)[1:])
        return cls(healthy, broken)


@dataclass
class RealTimeLoad:
    """What a real-time run produced: per (model, tick) the wall time of the last
    ``produce()`` of a message holding one of its events; breaks per model."""

    last_prod: dict[tuple[str, int], float] = field(default_factory=dict)
    breaks: dict[str, float] = field(default_factory=dict)
    events: int = 0
    messages: int = 0
    seconds: float = 0.0
    behind_s_max: float = 0.0
    producer_cpu_s: float = 0.0


def produce_realtime(
    bootstrap: str,
    topic: str,
    *,
    partitions: int,
    models: Sequence[str],
    rate: float,
    seconds: float,
    tick_s: float,
    linger_s: float,
    break_first_s: float,
    break_every_s: float,
    pool: EventPool,
    seed: int = 5,
) -> RealTimeLoad:
    """Produce ``rate`` events/s for ``seconds`` with ``ts`` = wall clock: every
    ``linger_s`` one message per partition holding the events due (models drawn at
    random); model ``i`` is broken from ``break_first_s + i * break_every_s`` on."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": 1,
            "compression.type": "none",
            "message.max.bytes": 10_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    rng = np.random.default_rng(seed)
    out = RealTimeLoad()
    c0 = time.process_time()
    t0 = time.time()
    n_pool = len(pool.healthy)
    n_models = len(models)
    mbytes = [m.encode() for m in models]
    break_at = {
        i: t0 + break_first_s + i * break_every_s
        for i in range(n_models)
        if break_first_s + i * break_every_s < seconds - 3.0
    }
    out.breaks = {models[i]: t for i, t in break_at.items()}
    sent = 0
    seq = 0
    nxt = t0
    while True:
        now = time.time()
        if now - t0 >= seconds:
            break
        due = int(rate * (now - t0)) - sent
        if due > 0:
            tick = int(now // tick_s)
            ts = b"%.6f" % now
            who = rng.integers(0, n_models, due)
            body = rng.integers(0, n_pool, due)
            part_of = rng.integers(0, partitions, due)
            per_part: list[list[bytes]] = [[] for _ in range(partitions)]
            touched: list[set[int]] = [set() for _ in range(partitions)]
            for j in range(due):
                mi = int(who[j])
                src = pool.broken if mi in break_at and now >= break_at[mi] else pool.healthy
                p = int(part_of[j])
                per_part[p].append(
                    b'{"event_id":"e%d","model_id":"%s","model_version":"v1",'
                    b'"request_id":"r%d","ts":%s,%s' % (seq, mbytes[mi], seq, ts, src[int(body[j])])
                )
                touched[p].add(mi)
                seq += 1
            for p in range(partitions):
                evs = per_part[p]
                for k in range(0, len(evs), SDK_BATCH_EVENTS):
                    chunk = evs[k : k + SDK_BATCH_EVENTS]
                    while True:
                        try:
                            producer.produce(
                                topic, value=b"[" + b",".join(chunk) + b"]", partition=p
                            )
                            break
                        except BufferError:
                            producer.poll(0.01)
                    out.messages += 1
                handed = time.time()
                for mi in touched[p]:
                    out.last_prod[(models[mi], tick)] = handed
            sent += due
            producer.poll(0)
        out.behind_s_max = max(out.behind_s_max, time.time() - now)
        nxt += linger_s
        time.sleep(max(0.0, nxt - time.time()))
    producer.flush(30)
    out.events = sent
    out.seconds = time.time() - t0
    out.producer_cpu_s = time.process_time() - c0
    return out


class AlertReader:
    """Reads a topic in a thread: (broker timestamp, local receive time, document); with
    ``summaries=True`` only (model_id, tick) of each summary is kept, per partition."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int = 1, *, summaries: bool = False
    ) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.summaries = summaries
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("svc-alerts"),
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self.consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )
        self.rows: list[tuple[float, float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in self.consumer.consume(num_messages=500, timeout=0.05):
                if m.error() is not None:
                    continue
                recv = time.time()
                _, ts_ms = m.timestamp()
                doc = orjson.loads(m.value() or b"{}")
                if self.summaries:
                    doc = {"model_id": doc.get("model_id"), "tick": doc.get("tick")}
                self.rows.append((ts_ms / 1000.0, recv, doc))

    def close(self) -> list[tuple[float, float, dict[str, Any]]]:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()
        return list(self.rows)


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max/min (nearest rank on the sorted values) and the count.

    >>> percentiles([0.1 * i for i in range(1, 101)])
    {'n': 100, 'min': 0.1, 'p50': 5.0, 'p90': 9.0, 'p99': 9.9, 'max': 10.0}
    """
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[max(0, int(np.ceil(p * len(v))) - 1)], 3)

    return {"n": len(v), "min": round(v[0], 3), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": round(v[-1], 3)}  # fmt: skip


def alert_latencies(
    rows: Sequence[tuple[float, float, Mapping[str, Any]]],
    last_prod: Mapping[tuple[str, int], float],
    tick_s: float,
) -> list[dict[str, Any]]:
    """Per alert: its triggering tick (``window.end`` / tick − 1), the last production
    time of that model's events in that tick, and the broker-timestamp latency.

    >>> rows = [(105.4, 105.5, {"model_id": "m1", "window": {"end": 104.0}, "kind": "k",
    ...          "detector": "d", "feature": "f"})]
    >>> alert_latencies(rows, {("m1", 103): 103.98}, 1.0)[0]["latency_s"]
    1.42
    """
    out = []
    for ts, recv, a in rows:
        end = float((a.get("window") or {}).get("end") or a.get("detected_at") or 0.0)
        tick = round(end / tick_s) - 1
        prod = last_prod.get((str(a.get("model_id")), tick))
        out.append(
            {
                "model_id": a.get("model_id"),
                "kind": a.get("kind"),
                "detector": a.get("detector"),
                "feature": a.get("feature"),
                "tick": tick,
                "last_production": prod,
                "broker_ts": ts,
                "latency_s": None if prod is None else round(ts - prod, 3),
                "receive_latency_s": None if prod is None else round(recv - prod, 3),
            }
        )
    return out


def realtime_run(
    svc: Any,
    *,
    rate: float,
    seconds: float,
    models: int,
    partitions: int,
    config_path: Path,
    workdir: Path,
    tick_s: float,
    lateness_s: float,
    linger_s: float,
    pool: EventPool,
    watch: Mapping[str, int | None],
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One worker on fresh topics; real-time production with staggered breaks; alerts."""
    import redis

    topics = create_topic_set(svc.kafka_bootstrap, "rt", partitions)
    dep = Deployment(
        svc.kafka_bootstrap,
        svc.redis_url,
        topics,
        config_path,
        workdir,
        tick_s=tick_s,
        lateness_s=lateness_s,
        extra_env=dict(extra_env or {}),
    )
    client = redis.Redis.from_url(svc.redis_url)
    w = dep.spawn("rt")
    reader: AlertReader | None = None
    sreader: AlertReader | None = None
    try:
        wait_ready([w])
        reader = AlertReader(svc.kafka_bootstrap, topics.alerts)
        sreader = AlertReader(svc.kafka_bootstrap, topics.summaries, partitions, summaries=True)
        pids = {"workers#rt": w.popen.pid, **watch}
        snap0 = CpuSnap.take(pids)
        names = model_ids(GenConfig(models=models))
        load = produce_realtime(
            svc.kafka_bootstrap,
            topics.predictions,
            partitions=partitions,
            models=names,
            rate=rate,
            seconds=seconds,
            tick_s=tick_s,
            linger_s=linger_s,
            break_first_s=3.0,
            break_every_s=1.0,
            pool=pool,
        )
        snap1 = CpuSnap.take(pids)
        # lag right after the producer stopped: is the worker keeping up?
        from confluent_kafka import Consumer, TopicPartition

        probe = Consumer({"bootstrap.servers": svc.kafka_bootstrap, "group.id": unique("probe")})
        ends = [
            probe.get_watermark_offsets(TopicPartition(topics.predictions, p), timeout=10)[1]
            for p in range(partitions)
        ]
        probe.close()
        offs = dep.offsets(client, partitions)
        lag_at_stop = [e - o for e, o in zip(ends, offs, strict=True)]
        time.sleep(tick_s + lateness_s + 4.0)  # idle flush closes the last ticks
        rows = reader.close()
        srows = sreader.close()
        reader = None
        lats = alert_latencies(rows, load.last_prod, tick_s)
        split = stage_split(lats, srows)
        series = summary_latencies(srows, load.last_prod)
        broken = set(load.breaks)
        on_broken = [x for x in lats if x["model_id"] in broken]
        expected_hits = {
            x["model_id"]
            for x in on_broken
            if x["detector"] == "quality.out_of_range" and x["feature"] == "seller_quality_score"
        }
        first_alert: dict[str, float] = {}
        for x in on_broken:
            m = str(x["model_id"])
            first_alert[m] = min(first_alert.get(m, float("inf")), x["broker_ts"])
        break_to_alert = [first_alert[m] - t for m, t in load.breaks.items() if m in first_alert]
        valid = [x["latency_s"] for x in lats if x["latency_s"] is not None]
        return {
            "rate_target": rate,
            "rate_achieved": round(load.events / load.seconds, 1) if load.seconds else None,
            "seconds": round(load.seconds, 2),
            "events": load.events,
            "messages": load.messages,
            "producer_cpu_s": round(load.producer_cpu_s, 2),
            "producer_max_behind_s": round(load.behind_s_max, 3),
            "lag_messages_at_stop": lag_at_stop,
            "breaks": len(load.breaks),
            "alerts_seen": len(lats),
            "alerts_on_broken_models": len(on_broken),
            "alerts_on_other_models": len(lats) - len(on_broken),
            "broken_models_with_out_of_range_alert": len(expected_hits),
            "alerts_without_production_record": sum(1 for x in lats if x["latency_s"] is None),
            "latency_s": percentiles(valid),
            "stage1_s": percentiles(split["stage1"]),
            "stage2_s": percentiles(split["stage2"]),
            "summary_spread_s": percentiles(split["spread"]),
            "production_to_summary_s": percentiles([lat for _, lat in series]),
            "growth": latency_growth(series),
            "latency_s_broken_models": percentiles(
                [x["latency_s"] for x in on_broken if x["latency_s"] is not None]
            ),
            "receive_latency_s": percentiles(
                [x["receive_latency_s"] for x in lats if x["receive_latency_s"] is not None]
            ),
            "break_to_first_alert_s": percentiles(break_to_alert),
            "alerts_by_detector": dict(
                sorted(defaultdict_count(f"{x['kind']}/{x['detector']}" for x in lats).items())
            ),
            "cpu": cpu_between(snap0, snap1, load.events),
            "alerts": lats[:400],
        }
    finally:
        for r in (reader, sreader):
            if r is not None and r._thread.is_alive():
                r.close()
        rc = w.stop()
        if rc not in (0, None):
            print(f"worker exit code {rc}:\n{w.tail(1500)}", file=sys.stderr)
        dep.cleanup(client)
        client.close()
        delete_topics(
            svc.kafka_bootstrap, [getattr(topics, k) for k in Topics.__dataclass_fields__]
        )


def stage_split(
    lats: Sequence[Mapping[str, Any]], summaries: Sequence[tuple[float, float, Mapping[str, Any]]]
) -> dict[str, list[float]]:
    """Where an alert's latency went: ``stage1`` = last production of the tick → the last
    partition's summary of (model, tick) appended (tick closing: lateness, batching, stage 1,
    checkpoint, publish); ``stage2`` = that summary → the alert appended; ``spread`` = first
    to last partition's summary of the (model, tick).

    >>> lats = [{"model_id": "m", "tick": 7, "last_production": 7.9, "broker_ts": 9.0}]
    >>> summ = [(8.4, 0.0, {"model_id": "m", "tick": 7}), (8.6, 0.0, {"model_id": "m", "tick": 7})]
    >>> {k: [round(x, 2) for x in v] for k, v in stage_split(lats, summ).items()}
    {'stage1': [0.7], 'stage2': [0.4], 'spread': [0.2]}
    """
    first: dict[tuple[str, int], float] = {}
    last: dict[tuple[str, int], float] = {}
    for ts, _, d in summaries:
        key = (str(d.get("model_id")), int(d.get("tick") or 0))
        first[key] = min(first.get(key, ts), ts)
        last[key] = max(last.get(key, ts), ts)
    out: dict[str, list[float]] = {"stage1": [], "stage2": [], "spread": []}
    for x in lats:
        key = (str(x["model_id"]), int(x["tick"]))
        if key not in last or x.get("last_production") is None:
            continue
        out["stage1"].append(last[key] - float(x["last_production"]))
        out["stage2"].append(float(x["broker_ts"]) - last[key])
        out["spread"].append(last[key] - first[key])
    return out


def summary_latencies(
    summaries: Sequence[tuple[float, float, Mapping[str, Any]]],
    last_prod: Mapping[tuple[str, int], float],
) -> list[tuple[float, float]]:
    """``(broker time, production → summary latency)`` of every summary whose (model, tick)
    the producer saw — the event-time latency of the whole stream, hundreds of samples a
    second, where alerts give one or two.

    >>> summary_latencies([(8.5, 0.0, {"model_id": "m", "tick": 7}),
    ...                    (9.0, 0.0, {"model_id": "x", "tick": 7})], {("m", 7): 7.9})
    [(8.5, 0.6)]
    """
    out = []
    for ts, _, d in summaries:
        prod = last_prod.get((str(d.get("model_id")), int(d.get("tick") or 0)))
        if prod is not None:
            out.append((ts, round(ts - prod, 3)))
    return out


# A run is *sustainable* when its event-time latency does not keep growing (Karimov et al.,
# "Benchmarking Distributed Stream Data Processing Systems", ICDE 2018: the highest load a
# system handles "without a continuously increasing event-time latency"): the median
# production → summary latency of the last third of the run may exceed the first third's
# by at most this much (a worker 2 % short of the rate falls ≈ 0.4 s further behind between
# the thirds of a 30 s run).
GROWTH_LIMIT_S = 0.3


def latency_growth(series: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Median latency of the first and last third of ``series`` (by time), their difference
    and the verdict.

    >>> g = latency_growth([(t, 0.6) for t in range(30)])
    >>> g["growth_s"], g["sustainable"]
    (0.0, True)
    >>> latency_growth([(t, 0.6 + 0.1 * t) for t in range(30)])["sustainable"]
    False
    """
    if len(series) < 6:
        return {"first_p50_s": None, "last_p50_s": None, "growth_s": None, "sustainable": False}
    ts = sorted(series)
    t0, t1 = ts[0][0], ts[-1][0]
    third = (t1 - t0) / 3.0
    first = [lat for t, lat in ts if t <= t0 + third]
    last = [lat for t, lat in ts if t >= t1 - third]
    a, b = statistics.median(first), statistics.median(last)
    growth = round(b - a, 3)
    return {
        "first_p50_s": round(a, 3),
        "last_p50_s": round(b, 3),
        "growth_s": growth,
        "sustainable": growth <= GROWTH_LIMIT_S,
    }


def defaultdict_count(items: Iterator[str] | Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


# --------------------------------------------------------------------------- modes


@contextlib.contextmanager
def _setup(a: argparse.Namespace) -> Iterator[tuple[Any, Path, dict[str, int | None]]]:
    with (
        services(kafka=True, redis=True) as svc,
        tempfile.TemporaryDirectory(prefix="dl-svc-") as tmp,
    ):
        work = Path(tmp)
        cfg = work / "monitors.json"
        write_monitors(cfg, a.models, 10, a.label_horizon)
        yield svc, cfg, service_pids(svc)


def _workload(a: argparse.Namespace) -> Workload:
    return workload(events=a.events, models=a.models, partitions=a.partitions)


def mode_latency(a: argparse.Namespace) -> dict[str, Any]:
    with _setup(a) as (svc, cfg, watch):
        work = cfg.parent
        backlog: dict[str, Any] | None = None
        if not a.max_rate:
            backlog = throughput_run(
                svc.kafka_bootstrap,
                svc.redis_url,
                _workload(a),
                workers=1,
                config_path=cfg,
                workdir=work,
                watch=watch,
                extra_env={
                    "DRIFTLINE_TICK_S": f"{a.tick_s:g}",
                    "DRIFTLINE_ALLOWED_LATENESS_S": f"{a.lateness_s:g}",
                },
            )
            print(_line("backlog (throughput run)", backlog), flush=True)
        within_env = (
            {"DRIFTLINE_BATCH_WITHIN_S": f"{a.batch_within_s:g}"} if a.batch_within_s else {}
        )
        pool = EventPool.build()

        def run(rate: float, seconds: float) -> dict[str, Any]:
            return realtime_run(
                svc,
                rate=rate,
                seconds=seconds,
                models=a.models,
                partitions=a.partitions,
                config_path=cfg,
                workdir=work,
                tick_s=a.tick_s,
                lateness_s=a.lateness_s,
                linger_s=a.linger_ms / 1000.0,
                pool=pool,
                watch=watch,
                extra_env=within_env,
            )

        search: list[dict[str, Any]] = []
        if a.max_rate:
            max_rate = float(a.max_rate)
        else:
            assert backlog is not None
            max_rate = sustainable_rate(
                run, float(backlog["events_per_s"] or 0.0), a.search_start, a.search_step,
                a.search_seconds, search,
            )  # fmt: skip
        print(f"max sustainable (real time): {max_rate:,.0f} events/s", flush=True)
        runs: dict[str, Any] = {}
        plan = [(f"max_x{f:g}", round(max_rate * f)) for f in a.rate_fractions]
        low = [("low", a.low_rate)] if a.low_rate > 0 else []
        for label, rate in [*plan, *low]:
            res = run(rate, a.seconds)
            runs[label] = res
            print(
                f"{label}: {res['rate_achieved']:,.0f} events/s, alerts {res['alerts_seen']} "
                f"(broken models hit {res['broken_models_with_out_of_range_alert']}/"
                f"{res['breaks']}), latency {res['latency_s']}, growth {res['growth']}",
                flush=True,
            )
        return {
            "services": svc.describe(),
            "settings": {
                "tick_s": a.tick_s,
                "allowed_lateness_s": a.lateness_s,
                "batch_within_s": a.batch_within_s or 0.2,
                "linger_ms": a.linger_ms,
                "models": a.models,
                "features": 10,
                "partitions": a.partitions,
                "label_horizon": a.label_horizon,
                "seconds": a.seconds,
                "rate_fractions": a.rate_fractions,
                "events_max_run": a.events,
                "search_start": a.search_start,
                "search_step": a.search_step,
                "search_seconds": a.search_seconds,
                "growth_limit_s": GROWTH_LIMIT_S,
            },
            "backlog_run": backlog,
            "backlog_events_per_s": float(backlog["events_per_s"] or 0.0) if backlog else None,
            "search": search,
            "max_sustainable_method": "given" if a.max_rate else "real-time search",
            "max_sustainable_events_per_s": max_rate,
            "runs": runs,
        }


def sustainable_rate(
    run: Callable[[float, float], dict[str, Any]],
    backlog_rate: float,
    start: float,
    step: float,
    seconds: float,
    log: list[dict[str, Any]],
) -> float:
    """The highest real-time rate whose event-time latency does not grow
    (:func:`latency_growth`): from ``start`` × the backlog rate up by ``step`` while
    sustainable, or down until sustainable when the first is not; at most 12 steps. Each
    step is a fresh worker and ``seconds`` of load; ``log`` gets one row per step.

    The backlog rate is only the starting point, not a bound: a backlog packs more ticks
    (summaries for stage 2) into each second than real time does, so a real-time run can
    sustain more than a backlog drains."""
    rate = max(1000.0, backlog_rate * start)
    best: float | None = None
    going_up: bool | None = None
    for _ in range(12):
        if rate < 1000.0:
            break
        res = run(rate, seconds)
        g = res["growth"]
        log.append(
            {
                "rate_target": round(rate),
                "rate_achieved": res["rate_achieved"],
                **g,
                "production_to_summary_s": res["production_to_summary_s"],
                "latency_s": res["latency_s"],
                "lag_messages_at_stop": res["lag_messages_at_stop"],
                "cpu": res["cpu"],
            }
        )
        print(
            f"search {rate:,.0f}/s: {'sustainable' if g['sustainable'] else 'NOT sustainable'}"
            f" (p50 production → summary {g['first_p50_s']} → {g['last_p50_s']} s)",
            flush=True,
        )
        if going_up is None:
            going_up = bool(g["sustainable"])
        if g["sustainable"]:
            best = max(best or 0.0, float(res["rate_achieved"] or rate))
            if not going_up:
                break
            rate *= step
        else:
            if going_up:
                break
            rate /= step
    return best if best is not None else 1000.0


def mode_scaleout(a: argparse.Namespace) -> dict[str, Any]:
    with _setup(a) as (svc, cfg, watch):
        wl = _workload(a)
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        order = list(a.contenders)
        for rep in range(a.reps):
            for name in order[rep % len(order) :] + order[: rep % len(order)]:
                n = int(name.rstrip("i"))
                res = throughput_run(
                    svc.kafka_bootstrap,
                    svc.redis_url,
                    wl,
                    workers=n,
                    stages="ingest" if name.endswith("i") else "ingest,detect",
                    config_path=cfg,
                    workdir=cfg.parent,
                    watch=watch,
                )
                runs[name].append(res)
                print(_line(f"rep {rep + 1} workers={name}", res), flush=True)
        res = {
            "services": svc.describe(),
            "settings": {"models": a.models, "partitions": a.partitions, "events": a.events},
            "runs": runs,
        }
        return summarize_scaleout(res)


def summarize_scaleout(res: dict[str, Any]) -> dict[str, Any]:
    """Medians, the 2/1 ratio, CPU per 100k events and the N-worker projection."""
    runs = res["runs"]
    summ = {k: summarize_runs([r["events_per_s"] or 0.0 for r in v]) for k, v in runs.items()}
    per100k = _median_cpu(runs["1"])
    res["summary"] = summ
    res["ratio_2_over_1"] = ratio(summ["2"]["median"], summ["1"]["median"])
    res["cpu_s_per_100k_events_1_worker"] = per100k
    res["cpu_s_per_100k_events_2_workers"] = _median_cpu(runs["2"])
    if "1i" in runs:  # stage 1 alone: the difference is stage 2 (summaries -> detectors)
        res["cpu_s_per_100k_events_1_worker_ingest_only"] = _median_cpu(runs["1i"])
    res["projection"] = projection(per100k)
    return res


def mode_batching(a: argparse.Namespace) -> dict[str, Any]:
    with _setup(a) as (svc, cfg, watch):
        wl = _workload(a)
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        names = list(a.variants)
        for rep in range(a.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                res = throughput_run(
                    svc.kafka_bootstrap,
                    svc.redis_url,
                    wl,
                    workers=1,
                    config_path=cfg,
                    workdir=cfg.parent,
                    watch=watch,
                    extra_env=batch_env(name),
                )
                runs[name].append(res)
                print(_line(f"rep {rep + 1} {name}", res), flush=True)
        res = {
            "services": svc.describe(),
            "settings": {"models": a.models, "partitions": a.partitions, "events": a.events},
            "variants": {k: batch_env(k) for k in names},
            "runs": runs,
        }
        return summarize_batching(res)


def summarize_batching(res: dict[str, Any]) -> dict[str, Any]:
    """Median events/s and worker CPU s per 100k events per variant, ratios to the old
    behaviour (``records-1MiB``). CPU per event is the steadier number on a shared box:
    other jobs take cores away from the worker, not work from each event."""
    summ: dict[str, Any] = {}
    for k, v in res["runs"].items():
        summ[k] = summarize_runs([r["events_per_s"] or 0.0 for r in v])
        summ[k]["worker_cpu_s_per_100k"] = _median_cpu(v).get("workers")
    base = summ.get("records-1MiB", {})
    for s in summ.values():
        s["ratio_to_records_1MiB"] = ratio(s["median"], base.get("median"))
        s["cpu_ratio_to_records_1MiB"] = ratio(
            s["worker_cpu_s_per_100k"], base.get("worker_cpu_s_per_100k")
        )
    res["summary"] = summ
    return res


def _line(head: str, res: Mapping[str, Any]) -> str:
    cpu = res["cpu"]["cores_used"]
    return (
        f"{head:<24} {res['events_per_s'] or 0:>10,.0f} events/s over {res['seconds']:.1f}s "
        f"(claims {res['claims_per_partition_after']}, cores {cpu})"
    )


def _median_cpu(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    keys = {k for r in runs for k in r["cpu"].get("cpu_s_per_100k_events", {})}
    return {
        k: round(statistics.median(r["cpu"]["cpu_s_per_100k_events"].get(k, 0.0) for r in runs), 3)
        for k in sorted(keys)
    }


def projection(per100k: Mapping[str, float]) -> dict[str, Any]:
    """Events/s for N workers, each on its own core, from the CPU cost per 100k events:
    workers scale until Kafka or the single-threaded Redis runs out of its cores."""
    w = per100k.get("workers") or 0.0
    k = per100k.get("kafka") or 0.0
    r = per100k.get("redis") or 0.0
    if w <= 0:
        return {}
    per_worker = 100_000 / w
    out: dict[str, Any] = {
        "per_worker_core_events_per_s": round(per_worker),
        "kafka_cores_per_100k_events_per_s": round(k, 3),
        "redis_cores_per_100k_events_per_s": round(r, 3),
        "redis_single_thread_ceiling_events_per_s": round(100_000 / r) if r > 0 else None,
        "n_workers": {},
    }
    for n in (1, 2, 4, 8, 16):
        rate = n * per_worker
        if r > 0:
            rate = min(rate, 100_000 / r)
        out["n_workers"][str(n)] = {
            "events_per_s": round(rate),
            "cores_needed_total": round(rate * (w + k + r) / 100_000, 2),
        }
    return out


# --------------------------------------------------------------------------- Markdown


def md_latency(res: Mapping[str, Any]) -> str:
    s = res["settings"]
    m = res.get("backlog_run", res.get("max_sustainable"))  # older files: "max_sustainable"
    lines = [
        "# Production → alert latency (load_tests/bench_service.py latency)",
        "",
        f"One worker process (both stages), {s['models']} models × {s['features']} features, "
        f"{s['partitions']} partitions, tick {s['tick_s']} s, allowed lateness "
        f"{s['allowed_lateness_s']} s, batch_within {s['batch_within_s']} s, label horizon "
        f"{s['label_horizon']}, producer message every {s['linger_ms']} ms per partition. "
        f"Load average {res['machine']['loadavg_at_start']} at start.",
        "",
    ]
    if res.get("search"):
        lines += [
            f"Backlog rate (throughput run, {m['events']:,} events, large batches): "
            f"{res['backlog_events_per_s']:,.0f} events/s. Maximum sustainable rate = the "
            "highest real-time rate whose median production → summary latency grows by at "
            f"most {s['growth_limit_s']} s from the first to the last third of a "
            f"{s['search_seconds']:g} s run: **{res['max_sustainable_events_per_s']:,.0f} "
            "events/s**.",
            "",
        ]
        lines += md_table(
            ["search step events/s", "p50 first third s", "p50 last third s", "growth s",
             "sustainable", "worker cores", "lag at stop (msgs)"],
            [[r["rate_achieved"], r["first_p50_s"], r["last_p50_s"], r["growth_s"],
              "yes" if r["sustainable"] else "**no**", r["cpu"]["cores_used"].get("workers"),
              str(r["lag_messages_at_stop"])] for r in res["search"]],
        )  # fmt: skip
        lines.append("")
    else:
        lines += [
            "Maximum sustainable rate "
            + (f"(throughput run, {m['events']:,} events): " if m else "(given): ")
            + f"**{res['max_sustainable_events_per_s']:,.0f} events/s**.",
            "",
        ]
    rows = []
    for label, r in res["runs"].items():
        lat = r["latency_s"]
        rows.append(
            [
                label,
                r["rate_achieved"],
                r["seconds"],
                r["breaks"],
                r["broken_models_with_out_of_range_alert"],
                r["alerts_seen"],
                r["alerts_on_other_models"],
                lat["p50"],
                lat["p90"],
                lat["p99"],
                lat["max"],
                (r.get("stage1_s") or {}).get("p50"),
                (r.get("stage2_s") or {}).get("p50"),
                str(r["lag_messages_at_stop"]),
                (r.get("growth") or {}).get("growth_s"),
            ]
        )
    lines += md_table(
        ["run", "events/s", "s", "breaks", "broken models alerted (out_of_range)", "alerts",
         "alerts on unbroken models", "p50 s", "p90 s", "p99 s", "max s",
         "p50 production → summary s", "p50 summary → alert s", "lag at stop (msgs)",
         "latency growth s"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        "Latency = alert's broker append time − wall time the last message holding an event of "
        "that model in the alert's triggering tick (`window.end`) was handed to the producer.",
    ]
    return "\n".join(lines) + "\n"


def md_scaleout(res: Mapping[str, Any]) -> str:
    s = res["settings"]
    summ = res["summary"]
    lines = [
        "# Scale-out: 1 vs 2 worker processes (load_tests/bench_service.py scaleout)",
        "",
        f"{s['events']:,} events on {s['partitions']} partitions, {s['models']} "
        f"models; load average {res['machine']['loadavg_at_start']} at start.",
        "",
    ]
    rows = []
    for n, runs in res["runs"].items():
        cores = defaultdict(list)
        for r in runs:
            for k, v in r["cpu"]["cores_used"].items():
                cores[k].append(v)
            cores["rest"].append(r["cpu"]["cpu_s"]["rest_of_machine"] / r["cpu"]["wall_s"])
            cores["idle"].append(r["cpu"]["cpu_s"]["idle"] / r["cpu"]["wall_s"])
        med = {k: round(statistics.median(v), 2) for k, v in cores.items()}
        rows.append(
            [n, summ[n]["median"], str(summ[n]["runs"]), med.get("workers"), med.get("kafka"),
             med.get("redis"), med.get("rest"), med.get("idle")]
        )  # fmt: skip
    lines += md_table(
        ["workers", "events/s (median)", "runs", "cores: workers", "kafka", "redis",
         "rest of machine", "idle"],
        rows,
    )  # fmt: skip
    lines += ["", f"Ratio 2 workers / 1 worker: **{res['ratio_2_over_1']}**.", ""]
    lines += [f"CPU s per 100k events (1 worker): {res['cpu_s_per_100k_events_1_worker']}", ""]
    lines += [f"CPU s per 100k events (2 workers): {res['cpu_s_per_100k_events_2_workers']}", ""]
    if "cpu_s_per_100k_events_1_worker_ingest_only" in res:
        lines += [
            "CPU s per 100k events (1 worker, ingest stage only; the difference to the first "
            f"line is stage 2): {res['cpu_s_per_100k_events_1_worker_ingest_only']}",
            "",
        ]
    proj = res.get("projection", {})
    if proj:
        lines += md_table(
            ["N workers", "events/s", "cores needed (workers + Kafka + Redis)"],
            [[n, v["events_per_s"], v["cores_needed_total"]] for n, v in proj["n_workers"].items()],
        )
    return "\n".join(lines) + "\n"


def md_batching(res: Mapping[str, Any]) -> str:
    s = res["settings"]
    lines = [
        "# Worker consumer batching A/B (load_tests/bench_service.py batching)",
        "",
        f"One worker process, {s['events']:,} events on {s['partitions']} "
        f"partitions, {s['models']} models; load average {res['machine']['loadavg_at_start']}.",
        "",
    ]
    rows = [
        [
            k,
            v["median"],
            str(v["runs"]),
            v["ratio_to_records_1MiB"],
            v["worker_cpu_s_per_100k"],
            v["cpu_ratio_to_records_1MiB"],
            str(res.get("variants", {}).get(k, "")),
        ]
        for k, v in res["summary"].items()
    ]
    lines += md_table(
        ["variant", "events/s (median)", "runs", "× records-1MiB", "worker CPU s / 100k events",
         "CPU × records-1MiB", "env"],
        rows,
    )  # fmt: skip
    if any("DRIFTLINE_BATCH_MAX_BYTES" in v for v in res.get("variants", {}).values()):
        lines += [
            "",
            "`DRIFTLINE_BATCH_MAX_BYTES` (the `bytes*` variants) was a prototype byte cap in "
            "`StageRunner._take` that closed a batch at that many bytes of values; it was "
            "slower than gathering for the whole `batch_within_s` and was not kept.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


# --------------------------------------------------------------------------- memory


def proc_status_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in MB."""
    return {k: round(proc_status_kb(k, pid) / 1024, 1) for k in ("VmRSS", "VmHWM")}


class HighWatermarks:
    """High watermarks of a topic's partitions through one confluent-kafka consumer."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from confluent_kafka import Consumer

        self.topic, self.partitions = topic, partitions
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("bench-hw")})

    def get(self) -> list[int]:
        from confluent_kafka import TopicPartition

        return [
            int(self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1])
            for p in range(self.partitions)
        ]

    def close(self) -> None:
        self.consumer.close()


def mode_memory(a: argparse.Namespace) -> dict[str, Any]:
    """See the module doc (**memory**)."""
    import redis

    from load_tests.common import create_topics

    span = a.span_s
    gcfg = GenConfig(
        n_events=a.events,
        seed=5,
        models=a.models,
        versions=1,
        n_features=a.features,
        rate=a.events / span,
        start=time.time() - span - 5.0,
        label_fraction=0.0,
    )
    msgs = messages(generate(gcfg), events_per_message=SDK_BATCH_EVENTS, partitions=a.partitions)
    print(f"memory: {a.models} models x {a.features} features, {a.events:,} events", flush=True)
    with (
        services(kafka=True, redis=True) as svc,
        tempfile.TemporaryDirectory(prefix="dl-svc-") as tmp,
    ):
        kafka, redis_url = svc.kafka_bootstrap, svc.redis_url
        assert kafka and redis_url
        work = Path(tmp)
        cfg = work / "monitors.json"
        write_monitors(cfg, a.models, a.features, a.label_horizon)
        topic = unique("svc-pred")
        create_topics(kafka, [topic], a.partitions)
        topics = create_topic_set(kafka, "svc", a.partitions, predictions=topic)
        extra = {"DRIFTLINE_BATCH_SIZE": str(a.batch_size)} if a.batch_size else {}
        dep = Deployment(kafka, redis_url, topics, cfg, work, extra_env=extra)
        client = redis.Redis.from_url(redis_url)
        w = dep.spawn("mem")
        hw = HighWatermarks(kafka, topics.summaries, a.partitions)
        try:
            wait_ready([w])
            wait_assignment([w], a.partitions)
            time.sleep(2.0)
            ready = proc_status_mb(w.popen.pid)
            t0 = time.perf_counter()
            prod = produce(kafka, msgs, {"prediction": topic})
            end = [sum(1 for m in msgs if m.partition == p) for p in range(a.partitions)]
            deadline = time.monotonic() + a.timeout
            peak_seen = 0.0
            settled = 0
            last_progress = 0.0
            while True:
                if not w.alive():
                    raise RuntimeError(f"worker exited:\n{w.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage 2 not caught up after {a.timeout} s")
                peak_seen = max(peak_seen, proc_status_mb(w.popen.pid).get("VmRSS", 0.0))
                ing = dep.offsets(client, a.partitions)
                det = dep.offsets(client, a.partitions, "detect")
                high = hw.get()
                # high > 0: stage 1 publishes a commit's summaries after checkpointing it
                done = (
                    all(o >= e for o, e in zip(ing, end, strict=True))
                    and sum(high) > 0
                    and det == high
                )
                settled = settled + 1 if done else 0
                if settled >= 5:  # idle flushes may still emit the last ticks: wait for quiet
                    break
                if time.monotonic() - last_progress > 10:
                    last_progress = time.monotonic()
                    print(
                        f"  {time.perf_counter() - t0:6.1f}s ingest {sum(ing)}/{sum(end)} "
                        f"messages, detect {sum(det)}/{sum(high)} summaries, "
                        f"RSS {peak_seen:.0f} MB peak seen",
                        flush=True,
                    )
                time.sleep(1.0)
            seconds = time.perf_counter() - t0
            after = proc_status_mb(w.popen.pid)
            # the worker trims its heap every DRIFTLINE_HEAP_TRIM_S (10 s): idle past one
            time.sleep(a.settle_s)
            settled_rss = proc_status_mb(w.popen.pid)
            live = live_phase(a, kafka, topic, w.popen.pid) if a.live_s > 0 else None
            state_keys = [f"{dep.redis_prefix}:{{detect:{p}}}:state" for p in range(a.partitions)]
            strlen = sum(int(client.strlen(k)) for k in state_keys)
            usage = sum(int(client.memory_usage(k) or 0) for k in state_keys)
            streams = a.models * a.features
            return {
                "models": a.models,
                "features": a.features,
                "monitored_streams": streams,
                "events": a.events,
                "event_time_span_s": span,
                "partitions": a.partitions,
                "batch_size_records": a.batch_size or "default",
                "summaries": sum(high),
                "produce": prod,
                "seconds_to_all_checkpointed": round(seconds, 1),
                "rss_mb_ready": ready.get("VmRSS"),
                "rss_mb_after": after.get("VmRSS"),
                "rss_mb_settled": settled_rss.get("VmRSS"),
                "settle_s": a.settle_s,
                "live": live,
                "rss_mb_peak": after.get("VmHWM"),
                "rss_mb_peak_sampled": peak_seen,
                "detect_state_bytes": strlen,
                "detect_state_bytes_per_stream": round(strlen / streams, 1),
                "redis_memory_usage_per_stream": round(usage / streams, 1),
            }
        finally:
            hw.close()
            rc = w.stop(timeout=120.0)  # a stage-2 batch of 1,000 models can take a while
            if rc not in (0, None):
                print(f"worker exit code {rc}:\n{w.tail(1500)}", file=sys.stderr)
            dep.cleanup(client)
            names = [getattr(topics, k) for k in Topics.__dataclass_fields__]
            delete_topics(kafka, [topic, *names])


def live_phase(a: argparse.Namespace, kafka: str, topic: str, pid: int) -> dict[str, Any]:
    """Real-time traffic after the backlog: ``--live-rate`` events/s with wall-clock event
    times over every model for ``--live-s`` s (ticks close live, every window stays full);
    the worker's RSS sampled every second from a thread."""
    import threading

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(proc_status_mb(pid).get("VmRSS", 0.0))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        load = produce_realtime(
            kafka,
            topic,
            partitions=a.partitions,
            models=model_ids(GenConfig(models=a.models)),
            rate=a.live_rate,
            seconds=a.live_s,
            tick_s=1.0,
            linger_s=0.05,
            break_first_s=a.live_s + 1.0,  # no breaks: steady monitoring
            break_every_s=1.0,
            pool=EventPool.build(n_features=a.features),
        )
        time.sleep(5.0)  # the last ticks close and reach stage 2
    finally:
        stop.set()
        t.join()
    after = proc_status_mb(pid)
    rss = percentiles(samples)
    return {
        "rate": a.live_rate,
        "seconds": a.live_s,
        "events": load.events,
        "rss_mb_median": rss["p50"],
        "rss_mb_max": rss["max"],
        "rss_mb_end": after.get("VmRSS"),
        "rss_mb_peak_process": after.get("VmHWM"),
    }


def md_memory(res: Mapping[str, Any]) -> str:
    lines = [
        "# Worker memory (load_tests/bench_service.py memory)",
        "",
        f"One worker process (both stages), {res['models']:,} models × {res['features']} "
        f"features = {res['monitored_streams']:,} streams, {res['events']:,} events over "
        f"{res['event_time_span_s']:g} s of event time ({res['summaries']:,} summaries), "
        f"{res['partitions']} partitions, `DRIFTLINE_BATCH_SIZE` {res['batch_size_records']}.",
        "",
        "| worker RSS when ready | when caught up | settled (idle "
        f"{res.get('settle_s', 0):g} s) | peak (VmHWM) | stage-2 state per stream "
        "| Redis MEMORY USAGE per stream |",
        "|---|---|---|---|---|---|",
        f"| {res['rss_mb_ready']} MB | {res['rss_mb_after']} MB "
        f"| **{res.get('rss_mb_settled', '–')} MB** | {res['rss_mb_peak']} MB "
        f"| {res['detect_state_bytes_per_stream']:,} B "
        f"| {res['redis_memory_usage_per_stream']:,} B |",
        "",
    ]
    live = res.get("live")
    if live:
        lines += [
            f"Then {live['seconds']:g} s of real-time traffic ({live['rate']:,.0f} events/s over "
            f"every model, event time = wall clock): worker RSS median "
            f"**{live['rss_mb_median']} MB**, max {live['rss_mb_max']} MB, "
            f"{live['rss_mb_end']} MB at the end.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("latency", "scaleout", "batching", "memory"))
    ap.add_argument("--events", type=int, default=None, help="events per throughput run")
    ap.add_argument("--models", type=int, default=None, help="default 60; memory: 1,000")
    ap.add_argument("--features", type=int, default=20, help="memory: features per model")
    ap.add_argument("--span-s", type=float, default=150.0, help="memory: event-time span")
    ap.add_argument("--timeout", type=float, default=900.0, help="memory: run limit (s)")
    ap.add_argument(
        "--settle-s", type=float, default=15.0, help="memory: idle time before the settled RSS"
    )
    ap.add_argument("--live-s", type=float, default=60.0, help="memory: real-time phase (0: off)")
    ap.add_argument("--live-rate", type=float, default=2000.0, help="memory: its events/s")
    ap.add_argument(
        "--batch-size", type=int, default=0, help="memory: DRIFTLINE_BATCH_SIZE (0: default)"
    )
    ap.add_argument("--partitions", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--contenders",
        type=lambda x: x.split(","),
        default=["1", "2", "1i"],
        help="scaleout: worker counts; a trailing i = ingest stage only (default 1,2,1i)",
    )
    ap.add_argument("--label-horizon", default="0", help="0 = no label join (no labels sent)")
    ap.add_argument("--tick-s", type=float, default=1.0)
    ap.add_argument("--lateness-s", type=float, default=0.25)
    ap.add_argument("--seconds", type=float, default=60.0, help="real-time run length")
    ap.add_argument(
        "--rate-fractions",
        type=lambda x: [float(v) for v in x.split(",")],
        default=[0.5, 0.25],
        help="real-time rates as fractions of the measured maximum (default 0.5,0.25)",
    )
    ap.add_argument("--low-rate", type=float, default=1000.0, help="0 = no low-rate run")
    ap.add_argument(
        "--max-rate",
        type=float,
        default=None,
        help="latency: skip the backlog run and the search, use this as the max sustainable rate",
    )
    ap.add_argument(
        "--search-start", type=float, default=0.35, help="latency: first rate / backlog rate"
    )
    ap.add_argument("--search-step", type=float, default=1.15, help="latency: rate factor")
    ap.add_argument("--search-seconds", type=float, default=30.0, help="latency: per step")
    ap.add_argument(
        "--batch-within-s", type=float, default=None, help="latency: DRIFTLINE_BATCH_WITHIN_S"
    )
    ap.add_argument("--linger-ms", type=float, default=50.0)
    ap.add_argument(
        "--variants",
        type=lambda x: x.split(","),
        default=list(BATCH_VARIANTS),
        help=f"batching variants ({', '.join(BATCH_VARIANTS)})",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--from-json", type=Path, default=None, help="re-summarise a results file (no runs)"
    )
    a = ap.parse_args(argv)
    if a.partitions is None:
        a.partitions = 4 if a.mode == "scaleout" else 2
    if a.events is None:
        a.events = {"latency": 300_000, "scaleout": 600_000, "batching": 300_000}.get(
            a.mode, 300_000
        )
    if a.models is None:
        a.models = 1000 if a.mode == "memory" else 60
    for v in a.variants:
        try:
            batch_env(v)
        except ValueError as err:
            ap.error(f"--variants: {err}")
    md_of = {
        "latency": md_latency,
        "scaleout": md_scaleout,
        "batching": md_batching,
        "memory": md_memory,
    }
    if a.from_json is not None:
        doc = orjson.loads(a.from_json.read_bytes())
        summ = {"scaleout": summarize_scaleout, "batching": summarize_batching}.get(a.mode)
        if summ is not None:
            doc = summ(doc)
        a.from_json.write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        )
        a.from_json.with_suffix(".md").write_text(md_of[a.mode](doc), encoding="utf-8")
        print(md_of[a.mode](doc))
        return 0
    machine = machine_info()
    t0 = time.perf_counter()
    fn = {
        "latency": mode_latency,
        "scaleout": mode_scaleout,
        "batching": mode_batching,
        "memory": mode_memory,
    }[a.mode]
    res = fn(a)
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["machine"] = machine
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = a.out or RESULTS_DIR / f"{a.mode}.json"
    path = write_results(a.mode, res, out)
    md = md_of[a.mode](res)
    path.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
