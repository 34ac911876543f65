"""Shared helpers of the load tests: results JSON, timing, RSS, local services, topics.

Every benchmark writes one JSON document under ``load_tests/results/`` with a ``machine``
block (CPU count, load average before the run, library versions), so numbers from a shared
2-core box are never read without their context. Absolute rates move with the machine's
load; the ratios measured side by side in one run are what the benchmarks are for.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_KAFKA = "DRIFTLINE_KAFKA_BOOTSTRAP"
ENV_REDIS = "DRIFTLINE_REDIS_URL"

_VERSIONED = (
    "faust-streaming",
    "aiokafka",
    "confluent-kafka",
    "redis",
    "orjson",
    "numpy",
    "pyinstrument",
)


def lib_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that matter for the numbers (None = absent)."""
    out: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Where and under which load the numbers were taken."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": load,
        "libs": lib_versions(),
    }


def write_results(name: str, doc: Mapping[str, Any], out: Path | None = None) -> Path:
    """Write ``doc`` (plus ``machine`` and ``written_at``) as indented JSON; return the path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    full: dict[str, Any] = {
        "benchmark": name,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    full.update(doc)
    full.setdefault("machine", machine_info())
    path.write_bytes(
        orjson.dumps(full, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    )
    return path


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    return proc_status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return proc_status_kb("VmHWM") * 1024


def proc_status_kb(key: str, pid: int | str = "self") -> int:
    """A ``/proc/<pid>/status`` field in kB (``VmRSS``, ``VmHWM``, ...); 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (perf_counter) and ``t.cpu`` (process)."""

    seconds: float = 0.0
    cpu: float = 0.0
    _t0: float = field(default=0.0, repr=False)
    _c0: float = field(default=0.0, repr=False)

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


def summarize_runs(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and all values of repeated measurements (rates: higher is better)."""
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "runs": [round(v, 1) for v in vals],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 3 significant digits (None when either is missing or b == 0)."""
    if a is None or b is None or b == 0:
        return None
    return float(f"{a / b:.3g}")


def unique(prefix: str) -> str:
    """A short unique name (topics, consumer groups, Redis prefixes)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- services


@dataclass
class Services:
    """Kafka and/or Redis for a benchmark: from the environment or started locally."""

    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    kafka_source: str = ""
    redis_source: str = ""
    _started: list[Any] = field(default_factory=list)

    def describe(self) -> dict[str, str | None]:
        return {
            "kafka": self.kafka_bootstrap,
            "kafka_source": self.kafka_source or None,
            "redis": self.redis_url,
            "redis_source": self.redis_source or None,
        }


@contextlib.contextmanager
def services(*, kafka: bool = False, redis: bool = False) -> Iterator[Services]:
    """Resolve Kafka (``DRIFTLINE_KAFKA_BOOTSTRAP``) and Redis (``DRIFTLINE_REDIS_URL``),
    starting the local launchers of ``scripts/services.py`` for the missing ones; everything
    started here is stopped on exit, whatever happened."""
    from scripts.services import KafkaService, RedisService

    svc = Services()
    try:
        if kafka:
            env = os.environ.get(ENV_KAFKA)
            if env:
                svc.kafka_bootstrap, svc.kafka_source = env, f"env {ENV_KAFKA}"
            else:
                ks = KafkaService(heap="768m")
                svc._started.append(ks)
                ks.start()
                svc.kafka_bootstrap = ks.bootstrap_servers
                svc.kafka_source = f"local Kafka {ks.version}, started in {ks.start_seconds:.1f}s"
        if redis:
            env = os.environ.get(ENV_REDIS)
            if env:
                svc.redis_url, svc.redis_source = env, f"env {ENV_REDIS}"
            else:
                rs = RedisService()
                svc._started.append(rs)
                rs.start()
                svc.redis_url = rs.url
                svc.redis_source = f"local redis-server {rs.version}"
        yield svc
    finally:
        for s in reversed(svc._started):
            with contextlib.suppress(Exception):
                s.stop()


def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int = 1, timeout: float = 30.0
) -> None:
    """Create topics (replication factor chosen by the broker) and wait for their leaders."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in names],
        operation_timeout=timeout,
    )
    for f in futures.values():
        f.result(timeout=timeout)
    deadline = time.monotonic() + timeout
    for n in names:
        while True:
            meta = admin.list_topics(topic=n, timeout=timeout).topics.get(n)
            if (
                meta is not None
                and meta.error is None
                and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values())
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {n}: partitions without a leader after {timeout}s")
            time.sleep(0.1)


def delete_topics(bootstrap: str, names: Sequence[str], timeout: float = 30.0) -> None:
    """Delete topics (best effort), each name once: a name twice in one DeleteTopics request
    crashed the process (SIGSEGV in librdkafka's ``rd_kafka_topic_result_error_string``)."""
    from confluent_kafka.admin import AdminClient

    unique_names = sorted(set(names))
    if not unique_names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.delete_topics(unique_names, operation_timeout=timeout).values():
        with contextlib.suppress(Exception):
            f.result(timeout=timeout)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table (numbers formatted compactly)."""

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return out


# --------------------------------------------------------------------------- child processes


def run_child(
    module: str,
    args: Sequence[str],
    *,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m module --child-result FILE *args`` in a fresh process and return the
    JSON it wrote, plus ``child_cpu_s`` (user + system CPU of the child) and ``child_wall_s``.

    Each baseline runs in its own process so that none inherits another's event loop,
    threads or garbage; a child that fails or times out raises with its output's tail.
    """
    import resource
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dl-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--child-result", str(result), *args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if not result.exists():
            tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
            raise RuntimeError(f"child {' '.join(args[:2])} exited {proc.returncode}:\n{tail}")
        doc: dict[str, Any] = orjson.loads(result.read_bytes())
    doc["child_cpu_s"] = round(
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3
    )
    doc["child_wall_s"] = round(wall, 3)
    return doc


@dataclass
class RateMeter:
    """Counts events/messages as they arrive and computes the steady-state rate.

    The clock starts when the consumer is ready (:meth:`mark_ready`: positioned on its
    partitions), so process start-up and group joins do not count; the steady-state rate
    additionally excludes the first delivery (fetch, take batch or message).
    """

    expect_events: int
    events: int = 0
    messages: int = 0
    first_events: int = 0
    first_messages: int = 0
    t_first: float | None = None
    t_last: float | None = None
    t_ready: float = field(default_factory=time.perf_counter)
    t_90: float | None = None
    events_90: int = 0

    def mark_ready(self) -> None:
        """The consumer is positioned (raw clients) or has its partitions (faust)."""
        self.t_ready = time.perf_counter()

    def add(self, events: int, messages: int) -> bool:
        """Record a delivery; True once ``expect_events`` events were seen."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            self.first_events, self.first_messages = events, messages
        self.events += events
        self.messages += messages
        self.t_last = now
        if self.t_90 is None and self.events >= 0.9 * self.expect_events:
            self.t_90, self.events_90 = now, self.events
        return self.events >= self.expect_events

    def result(self) -> dict[str, Any]:
        """``events_per_s``: all events over ready → last delivery (the headline number);
        ``steady_events_per_s``: first delivery excluded (None when it held everything);
        ``events_per_s_at_90pct``: up to the delivery that crossed 90 % of the expected
        events (leaves out the end of the topic, where batching consumers wait for a batch
        to fill until their ``within`` timeout)."""
        span = (self.t_last or 0.0) - self.t_ready
        steady = (self.t_last or 0.0) - (self.t_first or 0.0)
        ev = self.events - self.first_events
        ms = self.messages - self.first_messages
        return {
            "events": self.events,
            "messages": self.messages,
            "seconds": round(span, 4),
            "events_per_s": round(self.events / span, 1) if span > 0 else None,
            "messages_per_s": round(self.messages / span, 1) if span > 0 else None,
            "steady_events": ev,
            "steady_events_per_s": round(ev / steady, 1) if steady > 0 and ev else None,
            "steady_messages_per_s": round(ms / steady, 1) if steady > 0 and ms else None,
            "first_delivery_after_s": round((self.t_first or self.t_ready) - self.t_ready, 3),
            "events_per_s_at_90pct": round(self.events_90 / (self.t_90 - self.t_ready), 1)
            if self.t_90 is not None and self.t_90 > self.t_ready
            else None,
        }


def write_child_result(path: str, doc: Mapping[str, Any]) -> None:
    """What a child process hands back to :func:`run_child`."""
    Path(path).write_bytes(orjson.dumps(dict(doc)))
