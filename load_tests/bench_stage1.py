"""Stage 1 of the engine in one process, its profile, its memory, and the worker end to end.

Run ``python -m load_tests.bench_stage1 [--quick]``; writes
``load_tests/results/stage1.json`` and ``stage1.md`` and prints the Markdown summary.
Redis comes from ``DRIFTLINE_REDIS_URL`` (else a local redis-server is started); with
``--e2e`` Kafka too (``DRIFTLINE_KAFKA_BOOTSTRAP`` or the local Kafka 4.3.1).

1. Throughput. The worker's per-batch loop — ``Ingest.process_raw`` → ``store.commit``
   (state snapshot, next offsets, outbox, label-join ops) → ``Ingest.absorb`` — over
   pre-rendered messages (load_tests.generator; ``examples/monitors.yaml``'s detector
   settings with the generator's 10 features and a generated reference profile), with
   :class:`~stream.store.MemoryStore` and with :class:`~stream.redis_store.RedisStore`, with
   and without the label join (``label_horizon`` 1 h and 50 % labels, or 0 and no labels).
   Each phase is timed separately. Redis round trips per batch come from
   ``RedisStore.round_trips`` and are cross-checked with the server's ``INFO commandstats``
   (``evalsha`` calls) and ``INFO stats`` (``total_commands_processed``, which also counts
   the commands the Lua script runs), together with the server CPU the commits cost.
2. Profile. The MemoryStore + join variant under pyinstrument (sampling; falls back to
   cProfile when pyinstrument is not installed): self time grouped into cost centres
   (decode, validation, accumulation, join ops, commit serialization, ...) and the top
   functions.
3. Memory. RSS of a process holding stage-1 and stage-2 engines for 1,000 models × 20
   features (config and profiles generated), the state sizes, and the Redis memory of the
   checkpointed states per monitored (model, feature) stream (``MEMORY USAGE`` and
   ``INFO memory``), plus the Redis cost of one parked prediction in the join buffer. A
   second run under tracemalloc gives the live Python heap per step and the top allocation
   sites (file:line) each step added. ``--memory-only`` runs just this part and replaces
   the ``memory`` section of an existing results file (the other sections are kept);
   ``--mem-baseline-engine MODULE`` (e.g. an older ``stream.engine`` copied aside as a
   package on ``PYTHONPATH``) also measures that engine in the same run, as ``memory.baseline``.
4. ``--e2e``: the worker (``stream.worker.Worker``, ingest stage, RedisStore) consuming a
   Kafka topic, against the raw aiokafka baseline and the naive faust baseline of
   ``bench_consume`` on the same topic, interleaved. Targets: ≥ 100k events/s, ≥ 1/3 of
   raw aiokafka, ≥ 10× naive faust. Variants: ``worker`` as it is (label join with a 1 h
   horizon: every prediction is parked in Redis), ``+tune_gc`` (``stream.engine.tune_gc()``
   called first, which the worker does not do yet), ``-nojoin`` (``label_horizon: 0``). The
   worker's rate is read from its ``events_accepted`` counter (counted before the batch's
   commit, so the last batch's commit is not inside the measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
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
    rss_bytes,
    run_child,
    services,
    summarize_runs,
    unique,
    write_child_result,
    write_results,
)
from load_tests.generator import (
    SDK_BATCH_EVENTS,
    GenConfig,
    Generated,
    Message,
    generate,
    messages,
    monitor_config,
    produce,
)
from stream.config import Topics
from stream.engine import Ingest, compile_plans, tune_gc
from stream.events import RawMessage
from stream.heap import trim_heap
from stream.store import MemoryStore, StateStore
from stream.summary import ModelPlan

MODULE = "load_tests.bench_stage1"
TOPICS = Topics()


# --------------------------------------------------------------------------- inputs


def raw_batches(
    msgs: Sequence[Message], batch_events: int, topics: Topics = TOPICS
) -> list[list[RawMessage]]:
    """Messages as the worker hands them to ``process_raw``: batches of about
    ``batch_events`` events, offsets counted per topic, arrival order kept."""
    offsets: Counter[str] = Counter()
    batches: list[list[RawMessage]] = []
    cur: list[RawMessage] = []
    n = 0
    for m in msgs:
        topic = topics.predictions if m.kind == "prediction" else topics.labels
        cur.append(RawMessage(topic, 0, offsets[topic], m.value))
        offsets[topic] += 1
        n += m.n_events
        if n >= batch_events:
            batches.append(cur)
            cur, n = [], 0
    if cur:
        batches.append(cur)
    return batches


class Variant:
    """One stage-1 setup: store kind and label join on/off."""

    def __init__(self, store: str, join: bool) -> None:
        self.store = store
        self.join = join

    @property
    def name(self) -> str:
        return f"{self.store}{'+join' if self.join else ''}"


class Workload:
    """Generated events, config and plans shared by the variants with the same join flag."""

    def __init__(self, a: argparse.Namespace, join: bool) -> None:
        self.gcfg = GenConfig(
            n_events=a.events,
            seed=a.seed,
            models=a.models,
            versions=2,
            rate=a.rate,
            label_fraction=0.5 if join else 0.0,
            label_delay_s=(1.0, 5.0),
        )
        self.gen: Generated = generate(self.gcfg)
        self.config, self.profiles = monitor_config(self.gcfg, label_horizon="1h" if join else 0)
        self.plans: dict[str, ModelPlan] = compile_plans(self.config, self.profiles)
        self.batches = raw_batches(
            messages(self.gen, events_per_message=a.events_per_message), a.batch_events
        )
        self.now = self.gcfg.start + 3600.0


async def run_stage1(
    w: Workload, store: StateStore, *, partition: int = 0, lateness_s: float = 5.0
) -> dict[str, Any]:
    """The worker's stage-1 loop over ``w.batches``; phases timed separately."""
    ing = Ingest(w.config, w.plans, partition, lateness_s=lateness_s, max_future_s=float("inf"))
    claim = await store.claim("ingest", partition, "bench")
    ing.restore(claim.state, claim.inbox)
    gen = claim.generation
    rt0 = getattr(store, "round_trips", 0)
    t = {"process_raw": 0.0, "snapshot": 0.0, "commit": 0.0, "absorb": 0.0}
    counts: Counter[str] = Counter()
    pc = time.perf_counter
    cpu0 = time.process_time()
    t0 = pc()
    for batch in w.batches:
        a = pc()
        out = ing.process_raw(batch, w.now)
        b = pc()
        state = ing.snapshot()
        c = pc()
        res = await store.commit(
            "ingest",
            partition,
            gen,
            state=state,
            next_offset=out.next_offset,
            outbox=out.messages,
            join_ops=out.join_ops,
        )
        d = pc()
        ing.absorb(res)
        e = pc()
        t["process_raw"] += b - a
        t["snapshot"] += c - b
        t["commit"] += d - c
        t["absorb"] += e - d
        counts["accepted"] += out.accepted
        counts["rejected"] += sum(out.rejected.values())
        counts["join_ops"] += len(out.join_ops)
        counts["pairs"] += len(res.pairs)
        counts["summaries"] += out.summaries or sum(
            1 for m in out.messages if m.topic == TOPICS.summaries
        )
        counts["state_bytes_last"] = len(state)
    total = pc() - t0
    cpu = time.process_time() - cpu0
    events = counts["accepted"] + counts["rejected"]
    return {
        "events": events,
        "batches": len(w.batches),
        "seconds": round(total, 4),
        "events_per_s": round(events / total, 1),
        "us_per_event": round(1e6 * total / events, 3),
        "cpu_us_per_event": round(1e6 * cpu / events, 3),
        "phase_us_per_event": {k: round(1e6 * v / events, 3) for k, v in t.items()},
        "counts": dict(counts),
        "store_round_trips_after_claim": rt0,
    }


# --------------------------------------------------------------------------- Redis


def redis_stats(url: str) -> dict[str, Any]:
    """Counters of the server (sync client; its own INFO calls are subtracted by the caller)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats: Mapping[str, Any] = client.info("stats")
        cmd: Mapping[str, Any] = client.info("commandstats")
        cpu: Mapping[str, Any] = client.info("cpu")
        mem: Mapping[str, Any] = client.info("memory")
        return {
            "total_commands_processed": int(stats["total_commands_processed"]),
            "evalsha": int(cmd.get("cmdstat_evalsha", {}).get("calls", 0)),
            "set": int(cmd.get("cmdstat_set", {}).get("calls", 0)),
            "get": int(cmd.get("cmdstat_get", {}).get("calls", 0)),
            "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "used_memory": int(mem["used_memory"]),
            "keys": int(client.dbsize()),
        }
    finally:
        client.close()


async def run_redis_variant(w: Workload, url: str) -> dict[str, Any]:
    from stream.redis_store import RedisStore

    store = RedisStore(url, prefix=unique("bench"))
    before = redis_stats(url)
    try:
        res = await run_stage1(w, store)
        after = redis_stats(url)
        batches = res["batches"]
        # redis_stats sends 4 INFO commands + DBSIZE; total_commands_processed counts them
        own = 5
        res["redis"] = {
            "round_trips": store.round_trips,
            "round_trips_claim": res["store_round_trips_after_claim"],
            "round_trips_per_batch": round(
                (store.round_trips - res["store_round_trips_after_claim"]) / batches, 3
            ),
            "server_evalsha_calls": after["evalsha"] - before["evalsha"],
            "server_commands": after["total_commands_processed"]
            - before["total_commands_processed"]
            - own,
            "server_commands_per_batch": round(
                (after["total_commands_processed"] - before["total_commands_processed"] - own)
                / batches,
                1,
            ),
            "server_set_calls": after["set"] - before["set"],
            "server_get_calls": after["get"] - before["get"],
            "server_cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
            "server_cpu_us_per_event": round(
                1e6 * (after["cpu_s"] - before["cpu_s"]) / res["events"], 3
            ),
            "keys_added": after["keys"] - before["keys"],
            "used_memory_delta": after["used_memory"] - before["used_memory"],
        }
    finally:
        await _delete_prefix(store)
        await store.close()
    return res


async def _delete_prefix(store: Any) -> None:
    client = store.redis
    batch: list[Any] = []
    async for key in client.scan_iter(match=f"{store.prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


# --------------------------------------------------------------------------- profile

CENTRES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (cost centre, file suffix, function names; () = every function of the file)
    ("decode (orjson + per-message loop)", "stream/events.py", ("decode", "_lenient_loads")),
    ("dedupe window", "stream/events.py", ("seen",)),
    ("validation", "stream/events.py", ()),
    ("emit summaries (to_doc + orjson)", "stream/engine.py", ("_emit_pending",)),
    ("commit serialization (snapshot)", "stream/engine.py", ("snapshot",)),
    ("join: absorb pairs", "stream/engine.py", ("absorb", "_held")),
    (
        "commit serialization (inbox: JoinResult.to_bytes)",
        "stream/store.py",
        ("to_bytes", "from_bytes", "<listcomp>", "<genexpr>"),
    ),
    ("join: store (MemoryStore)", "stream/store.py", ()),
    ("join: store (RedisStore args + inbox)", "stream/redis_store.py", ()),
    ("join: norm_target", "stream/profile.py", ("norm_target",)),
    ("fold: ticks, grouping, join-op records", "stream/engine.py", ()),
    ("accumulation (summary.py)", "stream/summary.py", ()),
    ("accumulation (detectors/sketches.py)", "detectors/", ()),
    ("numpy", "numpy/", ()),
    ("redis client + asyncio", "redis/", ()),
    ("redis client + asyncio", "asyncio/", ()),
)


def centre_of(file_path: str, function: str) -> str:
    fp = file_path.replace("\\", "/")
    for name, suffix, funcs in CENTRES:
        if (fp.endswith(suffix) or suffix in fp) and (not funcs or function in funcs):
            return name
    return "other"


def _summarize_self_times(rows: Mapping[tuple[str, str, str], float]) -> dict[str, Any]:
    """``rows``: (centre, file, function) → self seconds."""
    total = sum(rows.values()) or 1.0
    centres: dict[str, float] = defaultdict(float)
    for (centre, _fp, _fn), tt in rows.items():
        centres[centre] += tt
    top = sorted(rows.items(), key=lambda kv: -kv[1])[:25]
    return {
        "total_s": round(total, 4),
        "centres": {
            k: {"seconds": round(v, 4), "share": round(v / total, 4)}
            for k, v in sorted(centres.items(), key=lambda kv: -kv[1])
        },
        "top_functions": [
            {
                "function": f"{_short(fp)}:{fn}",
                "self_s": round(tt, 4),
                "share": round(tt / total, 4),
                "centre": centre,
            }
            for (centre, fp, fn), tt in top
        ],
    }


def _short(fp: str) -> str:
    fp = fp.replace("\\", "/")
    for root in ("/stream/", "/detectors/", "/site-packages/", "/lib/python3.11/"):
        if root in fp:
            return fp.split(root, 1)[1] if root != "/stream/" else "stream/" + fp.split(root, 1)[1]
    return fp


def _memory_store(w: Workload) -> MemoryStore:
    start = w.gcfg.start
    return MemoryStore(clock=lambda: start)


def profile_stage1(w: Workload, profiler: str) -> dict[str, Any]:
    """Profile the MemoryStore loop; self time per (file, function), grouped into centres."""
    store = _memory_store(w)
    if profiler == "pyinstrument":
        try:
            from pyinstrument import Profiler
        except ImportError:
            profiler = "cprofile"
    if profiler == "pyinstrument":
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0005, async_mode="disabled")
        prof.start()
        res = asyncio.run(run_stage1(w, store))
        prof.stop()
        rows: dict[tuple[str, str, str], float] = defaultdict(float)
        session = prof.last_session
        assert session is not None
        root = session.root_frame()
        # C functions (orjson.loads, dict.get, ...) are frames of their own: their time
        # belongs to the Python function that called them
        stack: list[tuple[Any, str, str]] = [(root, "", "")] if root is not None else []
        while stack:
            f, pfile, pfunc = stack.pop()
            if f.is_synthetic:  # "[self]" / "[await]": already in the parent's self time
                continue
            fp = f.file_path or ""
            builtin = fp.startswith("<") or not fp
            owner_file, owner_func = (pfile, pfunc) if builtin else (fp, f.function)
            for child in f.children:
                stack.append((child, owner_file, owner_func))
            self_t = f.total_self_time
            if self_t > 0:
                fn = f"{owner_func} → {f.function}" if builtin else f.function
                rows[(centre_of(owner_file, owner_func), owner_file, fn)] += self_t
        out = _summarize_self_times(rows)
    else:
        cp = cProfile.Profile()
        cp.enable()
        res = asyncio.run(run_stage1(w, store))
        cp.disable()
        st = pstats.Stats(cp)
        rows = defaultdict(float)
        raw: Any = st.stats  # type: ignore[attr-defined]
        for (fp, _line, fn), (_cc, _nc, tt, _ct, _callers) in raw.items():
            rows[(centre_of(fp, fn), fp, fn)] += tt
        out = _summarize_self_times(rows)
    out["profiler"] = profiler
    out["profiled_events_per_s"] = res["events_per_s"]
    return out


# --------------------------------------------------------------------------- memory


def memory_footprint(a: argparse.Namespace, redis_url: str | None) -> dict[str, Any]:
    """RSS with stage-1 + stage-2 engines for ``models`` × ``features``; state sizes; Redis."""
    import tracemalloc

    gc.collect()
    out: dict[str, Any] = {"models": a.mem_models, "features": a.mem_features}
    trace = bool(a.mem_trace)
    rss0 = rss_bytes()
    if trace:
        tracemalloc.start()
    traced: dict[str, float] = {}
    trimmed: dict[str, float] = {}
    sites: dict[str, list[dict[str, Any]]] = {}
    last: list[Any] = []  # the previous step's tracemalloc snapshot
    engine = importlib.import_module(a.mem_engine)

    def mark(name: str) -> None:
        gc.collect()
        if trace:
            traced[name] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            if last:
                sites[name] = _top_sites(snap, last[0])
            last[:] = [snap]
        else:
            trimmed[name + "_before_trim"] = round(rss_bytes() / 2**20, 1)
            trim_heap()  # RSS then shows what is live
            trimmed[name] = round(rss_bytes() / 2**20, 1)

    gcfg = memory_gen_config(a)
    config, profiles = monitor_config(gcfg, label_horizon=0)
    plans = engine.compile_plans(config, profiles)
    mark("config_and_plans")
    rss_config = rss_bytes()
    ing = engine.Ingest(config, plans, 0, lateness_s=2.0, max_future_s=float("inf"))
    det = engine.Detect(config, plans, 0)
    mark("engines_created")
    rss_engines = rss_bytes()
    if a.mem_input:  # pre-rendered by the parent: generating here would inflate the RSS
        msgs = read_messages(Path(a.mem_input))
    else:
        msgs = messages(generate(gcfg), events_per_message=SDK_BATCH_EVENTS)
    batches = raw_batches(msgs, 20_000)
    gen_bytes = sum(len(m.value) for m in msgs)
    del msgs
    mark("with_input_messages")
    summaries: list[tuple[int, bytes]] = []
    now = gcfg.start + 3600.0
    for batch in batches:
        o = ing.process_raw(batch, now)
        summaries += [(len(summaries), m.value) for m in o.messages if m.topic == TOPICS.summaries]
    t0 = time.perf_counter()
    ingest_state_open = len(ing.snapshot())
    snapshot_s = time.perf_counter() - t0
    held_accumulators = len(ing.open) + len(ing.pending)
    del batches
    mark("stage1_with_open_ticks")
    rss_ingest = rss_bytes()
    o = ing.flush(now + 60.0)
    summaries += [(len(summaries), m.value) for m in o.messages if m.topic == TOPICS.summaries]
    mark("stage1_flushed_summaries_held")
    step = a.mem_detect_batch or len(summaries) or 1  # 0: all summaries in one batch
    dout: Any = None
    for i in range(0, len(summaries), step):
        dout = det.process_raw(summaries[i : i + step])
    detect_state = det.snapshot()
    n_summaries = len(summaries)
    summary_bytes = sum(len(v) for _, v in summaries)
    t0 = time.perf_counter()
    det.snapshot()
    detect_snapshot_s = time.perf_counter() - t0
    del summaries, dout
    mark("stage2_fed_stage1_flushed")
    rss_all = rss_bytes()
    if trace:
        tracemalloc.stop()
        last.clear()
    streams = a.mem_models * a.mem_features
    out.update(
        {
            "monitored_streams": streams,
            "rss_mb": {
                "baseline": round(rss0 / 2**20, 1),
                "after_config_and_profiles": round(rss_config / 2**20, 1),
                "after_engines_created": round(rss_engines / 2**20, 1),
                "after_stage1_with_open_ticks": round(rss_ingest / 2**20, 1),
                "after_stage2_fed": round(rss_all / 2**20, 1),
            },
            "engine": a.mem_engine,
            "tracemalloc": trace,
            "traced_python_heap_mb": traced or None,
            "top_allocation_sites": sites or None,
            "rss_mb_with_malloc_trim": trimmed or None,
            "held_tick_accumulators": held_accumulators,
            "ingest_snapshot_seconds": round(snapshot_s, 4),
            "detect_snapshot_seconds": round(detect_snapshot_s, 4),
            "rss_total_over_baseline_mb": round((rss_all - rss0) / 2**20, 1),
            "rss_per_stream_kb": round((rss_all - rss0) / streams / 1024, 2),
            "events_fed": gcfg.n_events,
            "input_bytes_held_during_feed": gen_bytes,
            "summaries": n_summaries,
            "mean_summary_bytes": round(summary_bytes / max(1, n_summaries), 1),
            "ingest_state_bytes_with_open_ticks": ingest_state_open,
            "ingest_state_bytes_flushed": len(ing.snapshot()),
            "detect_state_bytes": len(detect_state),
            "detect_state_bytes_per_stream": round(len(detect_state) / streams, 1),
            "detect_models_tracked": len(det.models),
        }
    )
    if redis_url and not trace:
        out["redis"] = asyncio.run(
            _redis_memory(redis_url, ing.snapshot(), detect_state, ingest_state_open, streams)
        )
    return out


def memory_gen_config(a: argparse.Namespace) -> GenConfig:
    """The memory test's events: ``mem_events_per_model`` per model over ``mem_seconds``
    (default 8) s of event time (1 s ticks: more seconds, fuller detector windows)."""
    n = a.mem_models * a.mem_events_per_model
    return GenConfig(
        n_events=n,
        seed=3,
        models=a.mem_models,
        versions=1,
        n_features=a.mem_features,
        rate=n / float(a.mem_seconds),
        label_fraction=0.0,
    )


def write_messages(path: Path, msgs: Sequence[Message]) -> None:
    """Messages to a file: kind byte, 4-byte length, value (read back by read_messages)."""
    with path.open("wb") as fh:
        for m in msgs:
            fh.write((b"p" if m.kind == "prediction" else b"l") + len(m.value).to_bytes(4, "big"))
            fh.write(m.value)


def read_messages(path: Path) -> list[Message]:
    data = path.read_bytes()
    out: list[Message] = []
    i = 0
    while i < len(data):
        kind = "prediction" if data[i : i + 1] == b"p" else "label"
        n = int.from_bytes(data[i + 1 : i + 5], "big")
        value = data[i + 5 : i + 5 + n]
        out.append(Message(kind, 0, b"", value, value.count(b'"event_id"'), 0.0))
        i += 5 + n
    return out


def _top_sites(snap: Any, prev: Any, top: int = 10) -> list[dict[str, Any]]:
    """The allocation sites (file:line) that grew most from ``prev`` to ``snap``."""
    rows = []
    for st in snap.compare_to(prev, "lineno")[:top]:
        frame = st.traceback[0]
        rows.append(
            {
                "site": f"{_short(frame.filename)}:{frame.lineno}",
                "mb": round(st.size_diff / 2**20, 2),
                "blocks": st.count_diff,
            }
        )
    return rows


async def _redis_memory(
    url: str, ingest_state: bytes, detect_state: bytes, ingest_open_bytes: int, streams: int
) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from stream.redis_store import RedisStore
    from stream.store import JoinOp

    client = aioredis.Redis.from_url(url)
    store = RedisStore(client=client, prefix=unique("benchmem"))
    try:
        c1 = await store.claim("detect", 0, "bench")
        c2 = await store.claim("ingest", 0, "bench")
        await asyncio.sleep(2.0)  # let clientsCron shrink earlier query buffers
        mem0 = int((await client.info("memory"))["used_memory"])
        await store.commit("detect", 0, c1.generation, state=detect_state, next_offset={"s": 1})
        await store.commit("ingest", 0, c2.generation, state=ingest_state, next_offset={"p": 1})
        await asyncio.sleep(2.0)
        mem1 = int((await client.info("memory"))["used_memory"])
        det_usage = int(await client.memory_usage(store._key("detect", 0, "state"), samples=0) or 0)
        # the join buffer: 20k parked predictions with a realistic record
        rec = {"v": "v1", "s": ["region=eu"], "sc": 0.21877, "p": "0", "ts": 1700000000.00042}
        n_park = 20_000
        for k in range(0, n_park, 5_000):
            ops = [
                JoinOp("park", "m0042", f"r1-{i:09d}-6f1c2a", 0, 3600.0, rec)
                for i in range(k, k + 5_000)
            ]
            await store.commit(
                "ingest", 0, c2.generation, state=b"{}", next_offset={"p": 2}, join_ops=ops
            )
        await asyncio.sleep(2.0)
        mem2 = int((await client.info("memory"))["used_memory"])
        one = store._key("ingest", 0, "j:m0042:r1-000000000-6f1c2a")
        park_usage = int(await client.memory_usage(one, samples=0) or 0)
        per_key = (mem2 - mem1) / n_park
        return {
            "detect_state_memory_usage_bytes": det_usage,
            "detect_state_bytes_per_stream": round(det_usage / streams, 1),
            "used_memory_delta_both_states": mem1 - mem0,
            "used_memory_per_stream_bytes": round((mem1 - mem0) / streams, 1),
            "ingest_state_with_open_ticks_bytes": ingest_open_bytes,
            "join_park_memory_usage_bytes": park_usage,
            "join_park_used_memory_per_key": round(per_key, 1),
            "join_buffer_gb_at_100k_per_s_1h_horizon": round(
                max(per_key, park_usage) * 100_000 * 3600 / 1e9, 1
            ),
        }
    finally:
        await _delete_prefix(store)
        await store.close()


# --------------------------------------------------------------------------- end to end


def _worker_child(a: argparse.Namespace) -> None:
    """Run the real worker (ingest stage) until ``expect_events`` were accepted."""
    from stream.config import ServiceSettings
    from stream.redis_store import RedisStore
    from stream.worker import Worker, WorkerOptions

    if a.tune_gc:
        tune_gc()
    gcfg = GenConfig(models=a.models, versions=2)
    config, profiles = monitor_config(gcfg, label_horizon=a.label_horizon)
    topics = Topics(**orjson.loads(a.topics))
    settings = ServiceSettings(
        kafka_bootstrap=a.bootstrap,
        redis_url=a.redis,
        topics=topics,
        web_bind="",
        batch_size=a.worker_batch_size,
    )
    opts = WorkerOptions(
        group_prefix=unique("bench"),
        redis_prefix=unique("benchw"),
        stages=("ingest",),
        max_future_s=float("inf"),
    )

    async def main() -> dict[str, Any]:
        worker = Worker(config, settings, opts, profiles=profiles)
        await worker.start()
        meter = RateMeter(a.expect_events)
        try:
            await asyncio.wait_for(worker.wait_assigned(), timeout=60)
            meter.mark_ready()
            deadline = time.monotonic() + a.timeout
            seen = 0
            while time.monotonic() < deadline:
                c = worker.stats.counters
                n = c["events_accepted"] + c["events_rejected"]
                if n > seen:
                    if meter.add(n - seen, 0):
                        break
                    seen = n
                await asyncio.sleep(0.002)
            doc = meter.result()
            doc["worker_counters"] = dict(worker.stats.counters)
            store = worker.store
            doc["redis_round_trips"] = getattr(store, "round_trips", None)
            doc["gc_threshold"] = list(gc.get_threshold())
            return doc
        finally:
            await worker.stop()
            # the parked predictions (1 h TTL) would otherwise pile up over the runs
            cleanup = RedisStore(a.redis, prefix=opts.redis_prefix)
            await _delete_prefix(cleanup)
            await cleanup.close()

    write_child_result(a.child_result, asyncio.run(main()))


def _hotpath_child(a: argparse.Namespace) -> None:
    """A minimal stage-1 consumer: poll → ``process_raw`` → ``RedisStore.commit`` → absorb.

    No rebalance listener, no outbox publishing (a few summaries per second), no idle flush:
    the ceiling of the worker's design with a given Kafka client. ``hotpath_confluent``
    polls with confluent-kafka, whose librdkafka threads keep prefetching (without the GIL)
    while Python runs the engine; ``hotpath_aiokafka`` does one ``getmany`` per batch, so
    fetching and processing take turns on one event loop.
    """
    from stream.redis_store import RedisStore

    tune_gc()
    gcfg = GenConfig(models=a.models, versions=2)
    config, profiles = monitor_config(gcfg, label_horizon=a.label_horizon)
    plans = compile_plans(config, profiles)
    topics = Topics(**orjson.loads(a.topics))
    ing = Ingest(config, plans, 0, topics=topics, max_future_s=float("inf"))
    batch_records = max(1, a.worker_batch_size)

    async def main() -> dict[str, Any]:
        store = RedisStore(a.redis, prefix=unique("benchhp"))
        claim = await store.claim("ingest", 0, "hotpath")
        ing.restore(claim.state, claim.inbox)
        meter = RateMeter(a.expect_events)

        async def step(raws: list[RawMessage]) -> bool:
            out = ing.process_raw(raws, time.time())
            res = await store.commit(
                "ingest",
                0,
                claim.generation,
                state=ing.snapshot(),
                next_offset=out.next_offset,
                outbox=out.messages,
                join_ops=out.join_ops,
            )
            ing.absorb(res)
            if out.messages:
                await store.ack_outbox("ingest", 0, claim.generation, [m.id for m in out.messages])
            return meter.add(out.accepted + sum(out.rejected.values()), len(raws))

        deadline = time.monotonic() + a.timeout
        try:
            if a.child == "hotpath_confluent":
                from confluent_kafka import OFFSET_BEGINNING, Consumer
                from confluent_kafka import TopicPartition as CKTopicPartition

                consumer = Consumer(
                    {
                        "bootstrap.servers": a.bootstrap,
                        "group.id": unique("bench-hp"),
                        "enable.auto.commit": False,
                    }
                )
                consumer.list_topics(topics.predictions, timeout=30)
                consumer.assign([CKTopicPartition(topics.predictions, 0, OFFSET_BEGINNING)])
                meter.mark_ready()
                try:
                    while time.monotonic() < deadline:
                        want = max(1, min(batch_records, a.expect_messages - meter.messages))
                        msgs = consumer.consume(num_messages=want, timeout=0.2)
                        raws = [
                            RawMessage(
                                str(m.topic()),
                                m.partition() or 0,
                                m.offset() or 0,
                                m.value() or b"",
                            )
                            for m in msgs
                            if m.error() is None
                        ]
                        if raws and await step(raws):
                            break
                finally:
                    consumer.close()
            else:
                from aiokafka import AIOKafkaConsumer, TopicPartition

                ak = AIOKafkaConsumer(bootstrap_servers=a.bootstrap, enable_auto_commit=False)
                tp = TopicPartition(topics.predictions, 0)
                ak.assign([tp])
                await ak.start()
                try:
                    await ak.seek_to_beginning(tp)
                    meter.mark_ready()
                    while time.monotonic() < deadline:
                        got = await ak.getmany(timeout_ms=200, max_records=batch_records)
                        raws = [
                            RawMessage(t.topic, t.partition, r.offset, r.value or b"")
                            for t, recs in got.items()
                            for r in recs
                        ]
                        if raws and await step(raws):
                            break
                finally:
                    await ak.stop()
            doc = meter.result()
            doc["redis_round_trips"] = store.round_trips
            return doc
        finally:
            await _delete_prefix(store)
            await store.close()

    write_child_result(a.child_result, asyncio.run(main()))


def run_e2e(a: argparse.Namespace, svc: Any) -> dict[str, Any]:
    from load_tests.bench_consume import run_baseline

    bootstrap, redis_url = svc.kafka_bootstrap, svc.redis_url
    gcfg = GenConfig(n_events=a.e2e_events, seed=a.seed, models=a.models, versions=2)
    gen = generate(gcfg)
    names = {k: unique(f"bench-e2e-{k}") for k in Topics.__dataclass_fields__}
    create_topics(bootstrap, [names["predictions"], names["labels"], names["summaries"]], 1)
    create_topics(bootstrap, [names["alerts"], names["control"], names["deadletter"]], 1)
    out: dict[str, Any] = {
        "events": gen.n_events,
        "layouts": {},
        "variants_note": "`worker` = as built (label join, 1 h horizon, no tune_gc); "
        "`+tune_gc` = stream.engine.tune_gc() first; `-nojoin` = label_horizon 0; "
        "`+batch20k` = DRIFTLINE_BATCH_SIZE set to 20,000 events / events-per-message "
        "records (the default 10,000 counts records, i.e. up to 5M events at 500/message, "
        "so every batch waits the full batch_within_s); `hotpath_*` = minimal poll -> "
        "process_raw -> RedisStore.commit -> absorb loop with that client, no publishing",
    }
    try:
        for epm in a.e2e_events_per_message:
            # one topic set per layout: the worker's offsets live in Redis under its prefix
            topic = unique(f"bench-e2e-pred-{epm}")
            create_topics(bootstrap, [topic], 1)
            msgs = messages(gen, events_per_message=epm)
            prod = produce(bootstrap, msgs, {"prediction": topic})
            lay: dict[str, Any] = {"produce": prod, "runs": defaultdict(list)}
            out["layouts"][str(epm)] = lay
            ts = {**names, "predictions": topic}
            order = list(a.e2e_baselines)
            for rep in range(a.reps):
                rot = order[rep % len(order) :] + order[: rep % len(order)]
                for name in rot:
                    if name.startswith("hotpath"):
                        res = run_child(
                            MODULE,
                            [
                                "--child",
                                name.replace("-nojoin", ""),
                                "--bootstrap",
                                bootstrap,
                                "--redis",
                                redis_url,
                                "--topics",
                                orjson.dumps(ts).decode(),
                                "--expect-events",
                                str(gen.n_events),
                                "--expect-messages",
                                str(prod["messages"]),
                                "--models",
                                str(a.models),
                                "--label-horizon",
                                "0" if "nojoin" in name else a.e2e_label_horizon,
                                "--timeout",
                                str(a.timeout),
                                "--worker-batch-size",
                                str(max(1, 20_000 // epm)),
                            ],
                            timeout=a.timeout + 90,
                        )
                    elif name.startswith("worker"):
                        res = run_child(
                            MODULE,
                            [
                                "--child",
                                "worker",
                                "--bootstrap",
                                bootstrap,
                                "--redis",
                                redis_url,
                                "--topics",
                                orjson.dumps(ts).decode(),
                                "--expect-events",
                                str(gen.n_events),
                                "--models",
                                str(a.models),
                                "--label-horizon",
                                "0" if "nojoin" in name else a.e2e_label_horizon,
                                "--timeout",
                                str(a.timeout),
                                *(["--tune-gc"] if "+tune_gc" in name else []),
                                "--worker-batch-size",
                                str(max(1, 20_000 // epm) if "+batch20k" in name else 10_000),
                            ],
                            timeout=a.timeout + 90,
                        )
                    else:
                        res = run_baseline(
                            name,
                            bootstrap=bootstrap,
                            topic=topic,
                            events=gen.n_events,
                            messages=prod["messages"],
                            partitions=1,
                            redis_url=redis_url,
                            timeout=a.timeout,
                        )
                    lay["runs"][name].append(res)
                    print(
                        f"e2e rep {rep + 1}/{a.reps} epm={epm:<4} {name:<16} "
                        f"{res.get('events_per_s') or 0:>10,.0f} events/s "
                        f"(cpu {res['child_cpu_s']:.1f}s)",
                        flush=True,
                    )
            summ: dict[str, Any] = {}
            for name, runs in lay["runs"].items():
                summ[name] = {
                    key: summarize_runs([r.get(key) or 0.0 for r in runs])
                    for key in ("events_per_s", "events_per_s_at_90pct")
                }
            for key in ("events_per_s", "events_per_s_at_90pct"):
                base = summ.get("aiokafka", {}).get(key, {}).get("median")
                naive = summ.get("faust_naive", {}).get(key, {}).get("median")
                for s in summ.values():
                    s[key]["ratio_to_aiokafka"] = ratio(s[key]["median"], base)
                    s[key]["ratio_to_faust_naive"] = ratio(s[key]["median"], naive)
            lay["summary"] = summ
            delete_topics(bootstrap, [topic])
    finally:
        delete_topics(bootstrap, list(names.values()))
    return out


# --------------------------------------------------------------------------- driver


def run_memory(a: argparse.Namespace, redis_url: str | None) -> dict[str, Any]:
    """The memory test in fresh child processes: RSS per step (+ Redis sizes), then, unless
    ``--quick``/``--tiny``, the live heap and top allocation sites under tracemalloc; with
    ``--mem-baseline-engine`` the same for that engine module, as ``baseline``."""
    print(f"memory: {a.mem_models} models x {a.mem_features} features ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="dl-bench-mem-")) / "messages.bin"
    write_messages(
        tmp, messages(generate(memory_gen_config(a)), events_per_message=SDK_BATCH_EVENTS)
    )
    common = [
        "--mem-models",
        str(a.mem_models),
        "--mem-features",
        str(a.mem_features),
        "--mem-events-per-model",
        str(a.mem_events_per_model),
        "--mem-input",
        str(tmp),
        "--mem-seconds",
        str(a.mem_seconds),
        "--mem-detect-batch",
        str(a.mem_detect_batch),
    ]

    def measure(engine: str) -> dict[str, Any]:
        eng = ["--mem-engine", engine]
        out = run_child(
            MODULE,
            ["--child", "memory", *common, *eng, *(["--redis", redis_url] if redis_url else [])],
            timeout=a.timeout + 300,
        )
        if not a.quick and not a.tiny:  # the live Python heap, with tracemalloc (slow)
            traced = run_child(
                MODULE,
                ["--child", "memory", "--mem-trace", *common, *eng],
                timeout=a.timeout + 900,
            )
            out["traced_python_heap_mb"] = traced["traced_python_heap_mb"]
            out["top_allocation_sites"] = traced["top_allocation_sites"]
        return out

    try:
        res = measure(a.mem_engine)
        if a.mem_baseline_engine:
            print(f"memory baseline: {a.mem_baseline_engine} ...", flush=True)
            res["baseline"] = measure(a.mem_baseline_engine)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return res


def memory_main(a: argparse.Namespace) -> int:
    """``--memory-only``: the memory test alone; replaces the ``memory`` section of ``--out``
    (other sections of an existing results file are kept)."""
    tune_gc()
    path = Path(a.out)
    prev: dict[str, Any] = orjson.loads(path.read_bytes()) if path.exists() else {}
    prev.pop("benchmark", None)
    prev.pop("written_at", None)
    with services(kafka=False, redis=not a.no_redis) as svc:
        prev["memory"] = run_memory(a, svc.redis_url)
    prev.setdefault("config", {})["memory_only_run"] = {
        "mem_models": a.mem_models,
        "mem_features": a.mem_features,
        "mem_events_per_model": a.mem_events_per_model,
        "mem_seconds": a.mem_seconds,
        "mem_detect_batch": a.mem_detect_batch,
        "mem_engine": a.mem_engine,
        "mem_baseline_engine": a.mem_baseline_engine,
        "machine": machine_info(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    out = write_results("stage1", prev, path)
    md = markdown(prev) if "throughput" in prev else memory_markdown(prev["memory"])
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(memory_markdown(prev["memory"]))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def run(a: argparse.Namespace) -> dict[str, Any]:
    tune_gc()  # what the worker should do at start-up (the embedded runner does)
    res: dict[str, Any] = {
        "config": {
            k: v
            for k, v in vars(a).items()
            if k not in ("out", "child", "child_result", "topics", "bootstrap", "redis")
        },
        "machine": machine_info(),
        "gc_threshold": list(gc.get_threshold()),
    }
    need_kafka = a.e2e
    with services(kafka=need_kafka, redis=not a.no_redis) as svc:
        res["services"] = svc.describe()
        workloads = {join: Workload(a, join) for join in (False, True)}
        w0 = workloads[True]
        res["workload"] = {
            "generator": w0.gen.info,
            "models": a.models,
            "events_per_message": a.events_per_message,
            "batch_events": a.batch_events,
            "batches": len(w0.batches),
            "features": 10,
        }
        variants = [Variant("memory", False), Variant("memory", True)]
        if svc.redis_url:
            variants += [Variant("redis", False), Variant("redis", True)]
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rep in range(a.reps):
            rot = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in rot:
                w = workloads[v.join]
                if v.store == "memory":
                    r = asyncio.run(run_stage1(w, _memory_store(w)))
                else:
                    assert svc.redis_url is not None
                    r = asyncio.run(run_redis_variant(w, svc.redis_url))
                runs[v.name].append(r)
                print(
                    f"rep {rep + 1}/{a.reps} {v.name:<12} {r['events_per_s']:>10,.0f} events/s "
                    f"{r['us_per_event']:.2f} µs/event",
                    flush=True,
                )
        res["throughput"] = {
            name: {
                "events_per_s": summarize_runs([r["events_per_s"] for r in rs]),
                "us_per_event": summarize_runs([r["us_per_event"] for r in rs]),
                "cpu_us_per_event": summarize_runs([r["cpu_us_per_event"] for r in rs]),
                "median_run": sorted(rs, key=lambda r: r["events_per_s"])[len(rs) // 2],
            }
            for name, rs in runs.items()
        }
        base = res["throughput"]["memory"]["events_per_s"]["median"]
        for t in res["throughput"].values():
            t["ratio_to_memory"] = ratio(t["events_per_s"]["median"], base)
        if not a.no_profile:
            print("profiling (memory+join) ...", flush=True)
            res["profile"] = profile_stage1(workloads[True], a.profiler)
            res["profile_nojoin"] = profile_stage1(workloads[False], a.profiler)
        del workloads
        gc.collect()
        if not a.no_memory:
            res["memory"] = run_memory(a, svc.redis_url)
        if a.e2e:
            res["e2e"] = run_e2e(a, svc)
        else:
            res["e2e"] = {
                "todo": "run with --e2e (starts Kafka) to measure stream.worker.Worker "
                "against the raw aiokafka and naive faust baselines on the same topic"
            }
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def e2e_markdown(res: dict[str, Any]) -> list[str]:
    """The end-to-end table (or the TODO when it was not run)."""
    lines: list[str] = []
    m = res.get("machine", {})
    e2e = res.get("e2e", {})
    if "layouts" in e2e:
        lines.append(
            f"Load average {m.get('loadavg_at_start')} at start, {res.get('loadavg_at_end')} at "
            "end; medians of interleaved repetitions."
        )
        lines.append("")
        rows = []
        for epm, lay in e2e["layouts"].items():
            for name, s in lay["summary"].items():
                full, p90 = s["events_per_s"], s["events_per_s_at_90pct"]
                rows.append(
                    [
                        epm,
                        name,
                        full["median"],
                        full["ratio_to_aiokafka"],
                        full["ratio_to_faust_naive"],
                        p90["median"],
                        p90["ratio_to_aiokafka"],
                        p90["ratio_to_faust_naive"],
                        ", ".join(f"{v:,.0f}" for v in full["runs"]),
                    ]
                )
        lines += md_table(
            [
                "events/msg",
                "consumer",
                "events/s",
                "× aiokafka",
                "× faust naive",
                "events/s to 90 %",
                "× aiokafka (90 %)",
                "× naive (90 %)",
                "runs",
            ],
            rows,
        )
        lines.append("")
        lines.append(
            f"{e2e['events']:,} events per run; worker variants: {e2e.get('variants_note', '')}"
        )
    else:
        lines.append(f"TODO: {e2e.get('todo')}")
    return lines


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    wl = res["workload"]
    lines = [
        "# Stage 1 (load_tests/bench_stage1.py)",
        "",
        f"{wl['generator']['predictions']:,} predictions (+ labels in the join variants) of "
        f"~{wl['generator']['mean_prediction_bytes']:.0f} B, {wl['models']} models × 2 versions, "
        f"10 features, {wl['events_per_message']} events/message, batches of "
        f"~{wl['batch_events']:,} events; {m['cpu_count']} CPUs, load average "
        f"{m['loadavg_at_start']} at start, {res.get('loadavg_at_end')} at end; "
        f"GC threshold {res['gc_threshold']}.",
        "",
        "## Throughput (median of interleaved repetitions)",
        "",
    ]
    rows = []
    for name, t in res["throughput"].items():
        mr = t["median_run"]
        ph = mr["phase_us_per_event"]
        rd = mr.get("redis", {})
        rows.append(
            [
                name,
                t["events_per_s"]["median"],
                t["us_per_event"]["median"],
                t.get("cpu_us_per_event", {}).get("median"),
                ph["process_raw"],
                ph["snapshot"],
                ph["commit"],
                ph["absorb"],
                rd.get("round_trips_per_batch"),
                rd.get("server_evalsha_calls"),
                rd.get("server_commands_per_batch"),
                rd.get("server_cpu_us_per_event"),
            ]
        )
    lines += md_table(
        [
            "variant",
            "events/s",
            "µs/event",
            "CPU µs/event",
            "process_raw µs",
            "snapshot µs",
            "commit µs",
            "absorb µs",
            "Redis RT/batch",
            "EVALSHA calls",
            "server cmds/batch",
            "Redis CPU µs/event",
        ],
        rows,
    )
    for key, title in (("profile", "memory+join"), ("profile_nojoin", "memory, no join")):
        p = res.get(key)
        if not p:
            continue
        lines += ["", f"## Cost centres ({title}; {p['profiler']}, self time)", ""]
        lines += md_table(
            ["centre", "share"],
            [[k, f"{100 * v['share']:.1f} %"] for k, v in p["centres"].items()],
        )
        lines += ["", "Top functions:", ""]
        lines += md_table(
            ["function", "share", "centre"],
            [
                [f["function"], f"{100 * f['share']:.1f} %", f["centre"]]
                for f in p["top_functions"][:15]
            ],
        )
    mem = res.get("memory")
    if mem:
        lines += ["", *memory_markdown(mem).rstrip("\n").split("\n")]
    lines += ["", "## End to end (worker vs baselines, same topic)", ""]
    lines += e2e_markdown(res)
    return "\n".join(lines) + "\n"


def memory_markdown(mem: Mapping[str, Any]) -> str:
    """The memory section of the Markdown summary (with the baseline engine when measured)."""
    lines = [
        f"## Memory: {mem['models']:,} models × {mem['features']} features "
        f"({mem['monitored_streams']:,} streams)",
        "",
    ]
    base = mem.get("baseline")
    heap, bheap = mem.get("traced_python_heap_mb") or {}, (base or {}).get("traced_python_heap_mb")
    steps = list(mem["rss_mb"])
    head = ["step", "RSS (MB)"] + (["baseline RSS (MB)"] if base else [])
    rows = [[k, mem["rss_mb"][k]] + ([base["rss_mb"].get(k)] if base else []) for k in steps]
    lines += md_table(head, rows)
    if heap:
        lines.append("")
        head = ["step", "live heap (MB)"] + (["baseline heap (MB)"] if bheap else [])
        lines += md_table(
            head, [[k, v] + ([bheap.get(k)] if bheap else []) for k, v in heap.items()]
        )
    lines.append("")
    keep = (
        "rss_total_over_baseline_mb",
        "rss_per_stream_kb",
        "ingest_state_bytes_with_open_ticks",
        "ingest_snapshot_seconds",
        "detect_state_bytes",
        "detect_state_bytes_per_stream",
        "detect_snapshot_seconds",
        "mean_summary_bytes",
    )
    head = ["what", "value"] + (["baseline"] if base else [])
    lines += md_table(head, [[k, mem[k]] + ([base.get(k)] if base else []) for k in keep])
    if "redis" in mem:
        lines += ["", *md_table(["Redis", "value"], list(mem["redis"].items()))]
    for step, top in (mem.get("top_allocation_sites") or {}).items():
        lines += ["", f"Top allocation sites, step {step}:", ""]
        lines += md_table(
            ["site", "MB", "blocks"], [[t["site"], t["mb"], t["blocks"]] for t in top]
        )
    return "\n".join(lines) + "\n"


def e2e_main(a: argparse.Namespace) -> int:
    """``--e2e-only``: the worker and the hot paths against the baselines; results/e2e.json."""
    tune_gc()
    res: dict[str, Any] = {"config": {"reps": a.reps, "models": a.models}}
    res["machine"] = machine_info()
    with services(kafka=True, redis=True) as svc:
        res["services"] = svc.describe()
        res["e2e"] = run_e2e(a, svc)
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = a.out if a.out != RESULTS_DIR / "stage1.json" else RESULTS_DIR / "e2e.json"
    path = write_results("e2e", res, out)
    md = "# End to end (load_tests/bench_stage1.py --e2e-only)\n\n" + "\n".join(e2e_markdown(res))
    path.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer events, 1 repetition")
    ap.add_argument("--tiny", action="store_true", help="smoke test: seconds, no Redis needed")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--rate", type=float, default=20_000.0, help="event-time events/s")
    ap.add_argument("--events-per-message", type=int, default=SDK_BATCH_EVENTS)
    ap.add_argument("--batch-events", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profiler", choices=("pyinstrument", "cprofile"), default="pyinstrument")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-redis", action="store_true", help="MemoryStore variants only")
    ap.add_argument("--mem-models", type=int, default=1000)
    ap.add_argument("--mem-features", type=int, default=20)
    ap.add_argument("--mem-events-per-model", type=int, default=100)
    ap.add_argument("--mem-seconds", type=int, default=8, help="event time of the memory test")
    ap.add_argument(
        "--mem-detect-batch",
        type=int,
        default=0,
        help="summaries per stage-2 batch in the memory test (0: all in one batch)",
    )
    ap.add_argument("--mem-trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the memory test; replaces the memory section of --out, keeps the rest",
    )
    ap.add_argument("--mem-engine", default="stream.engine", help=argparse.SUPPRESS)
    ap.add_argument(
        "--mem-baseline-engine",
        default=None,
        help="also measure this engine module (e.g. an old stream.engine copied aside as a "
        "package on PYTHONPATH) in the same run, as memory.baseline",
    )
    ap.add_argument("--mem-input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--e2e", action="store_true", help="also the worker on Kafka (starts Kafka)")
    ap.add_argument("--e2e-events", type=int, default=None)
    ap.add_argument(
        "--e2e-events-per-message", type=lambda s: [int(x) for x in s.split(",")], default=None
    )
    ap.add_argument(
        "--e2e-baselines",
        type=lambda s: s.split(","),
        default=[
            "aiokafka",
            "worker",
            "worker+tune_gc",
            "worker+tune_gc+batch20k",
            "hotpath_aiokafka",
            "hotpath_confluent",
            "faust_naive",
        ],
    )
    ap.add_argument("--e2e-label-horizon", default="1h")
    ap.add_argument(
        "--e2e-only",
        action="store_true",
        help="only the end-to-end comparison (starts Kafka + Redis); writes results/e2e.json",
    )
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "stage1.json")
    # child-process mode (internal)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--redis", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--topics", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--expect-events", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--label-horizon", default="1h", help=argparse.SUPPRESS)
    ap.add_argument("--tune-gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--expect-messages", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-batch-size", type=int, default=10_000, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "worker":
        _worker_child(a)
        return 0
    if a.child in ("hotpath_confluent", "hotpath_aiokafka"):
        _hotpath_child(a)
        return 0
    if a.child == "memory":  # a fresh process: RSS not inflated by earlier work
        tune_gc()
        write_child_result(a.child_result, memory_footprint(a, a.redis))
        return 0
    if a.tiny:
        a.events, a.reps, a.no_redis = a.events or 4_000, a.reps or 1, True
        a.mem_models, a.mem_events_per_model = 20, 20
        a.batch_events = min(a.batch_events, 1_000)
    if a.events is None:
        a.events = 40_000 if a.quick else 200_000
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    if a.e2e_events is None:
        a.e2e_events = 20_000 if a.quick else 100_000
    if a.e2e_events_per_message is None:
        a.e2e_events_per_message = [SDK_BATCH_EVENTS]
    if a.e2e_only:
        return e2e_main(a)
    if a.memory_only:
        return memory_main(a)
    results = run(a)
    path = write_results("stage1", results, a.out)
    md = markdown(results)
    path.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


__all__ = ["MODULE", "main", "raw_batches", "run_stage1"]

if __name__ == "__main__":
    sys.exit(main())
