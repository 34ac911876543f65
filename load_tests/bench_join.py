"""A/B of the label join: the current ``stream`` code against a baseline git revision.

Run ``python -m load_tests.bench_join [--events N] [--reps R] [--baseline REF]``; writes
``load_tests/results/join.json`` and prints a Markdown table. Redis comes from
``DRIFTLINE_REDIS_URL`` (else a local redis-server is started).

The baseline's ``stream/store.py``, ``stream/redis_store.py`` and ``stream/engine.py`` are
read from ``git show REF:...`` (default: the revision before the packed join) into a
private package, so both versions run side by side in one process, interleaved, on the same
generated workload as ``bench_stage1`` (4 models x 2 versions, 10 features + a slice, 500
events/message, ~10,000 events/batch, ``label_horizon`` 1 h, 50 % labels; the no-join
rows: horizon 0, no labels). Every variant first replays the whole workload once and the
benchmark checks that baseline and current produce the same summaries and join results.

Per variant: events/s, µs/event per phase of the worker's loop (``process_raw`` →
``snapshot`` → ``commit`` → ``absorb``), wall clock and this thread's CPU time (the CPU
time of ``commit`` is the client's own work, without the wait for Redis; it is what stays
comparable when the shared machine is busy), and for Redis the round trips per batch, the server
commands per batch (``INFO stats``; they include the commands the Lua script runs) and the
server CPU per event (``INFO cpu``, user + sys, over the variant's run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from load_tests.bench_stage1 import Workload, redis_stats
from load_tests.common import (
    REPO_ROOT,
    machine_info,
    md_table,
    ratio,
    services,
    summarize_runs,
    unique,
    write_results,
)
from stream import engine as cur_engine
from stream import redis_store as cur_redis
from stream import store as cur_store
from stream.engine import tune_gc

BASELINE_REF = "1724ba0573da96a9ab578c9dea024da726fda049"  # before the packed join (issue 6)
_FILES = ("store", "redis_store", "engine")


def load_baseline(ref: str) -> types.SimpleNamespace:
    """The baseline's store, redis_store and engine modules as a private package."""
    pkg = f"_dl_join_base_{ref[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="dl-join-base-")) / pkg
    tmp.mkdir()
    (tmp / "__init__.py").write_text("")
    for name in _FILES:
        src = subprocess.run(
            ["git", "show", f"{ref}:stream/{name}.py"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for other in _FILES:
            src = src.replace(f"from stream.{other} import", f"from {pkg}.{other} import")
        (tmp / f"{name}.py").write_text(src)
    sys.path.insert(0, str(tmp.parent))
    mods = {}
    for name in _FILES:  # store first: the others import it
        spec = importlib.util.spec_from_file_location(f"{pkg}.{name}", tmp / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"{pkg}.{name}"] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return types.SimpleNamespace(**mods)


async def run_loop(w: Workload, ingest_cls: type, store: Any) -> dict[str, Any]:
    """The worker's stage-1 loop (as ``bench_stage1.run_stage1``) with a given Ingest class;
    also returns the emitted summaries and join results (equivalence check)."""
    ing = ingest_cls(w.config, w.plans, 0, lateness_s=5.0, max_future_s=float("inf"))
    claim = await store.claim("ingest", 0, "bench")
    ing.restore(claim.state, claim.inbox)
    gen = claim.generation
    rt0 = getattr(store, "round_trips", 0)
    t = {"process_raw": 0.0, "snapshot": 0.0, "commit": 0.0, "absorb": 0.0}
    cpu = dict.fromkeys(t, 0.0)  # this thread's CPU time: robust to a busy machine
    tt = time.thread_time
    counts: Counter[str] = Counter()
    summaries: list[bytes] = []
    results: list[Any] = []
    pc = time.perf_counter
    t0 = pc()
    for batch in w.batches:
        ca = tt()
        a = pc()
        out = ing.process_raw(batch, w.now)
        b = pc()
        cb = tt()
        state = ing.snapshot()
        c = pc()
        cc = tt()
        res = await store.commit(
            "ingest",
            0,
            gen,
            state=state,
            next_offset=out.next_offset,
            outbox=out.messages,
            join_ops=out.join_ops,
        )
        d = pc()
        cd = tt()
        ing.absorb(res)
        e = pc()
        ce = tt()
        cpu["process_raw"] += cb - ca
        cpu["snapshot"] += cc - cb
        cpu["commit"] += cd - cc
        cpu["absorb"] += ce - cd
        t["process_raw"] += b - a
        t["snapshot"] += c - b
        t["commit"] += d - c
        t["absorb"] += e - d
        counts["accepted"] += out.accepted
        counts["join_ops"] += len(out.join_ops)
        counts["pairs"] += len(res.pairs)
        summaries += [m.value for m in out.messages]
        results.append((tuple(res.pairs), tuple(res.outcomes)))
    total = pc() - t0
    events = counts["accepted"]
    return {
        "events": events,
        "batches": len(w.batches),
        "events_per_s": round(events / total, 1),
        "us_per_event": round(1e6 * total / events, 3),
        "phase_us_per_event": {k: round(1e6 * v / events, 3) for k, v in t.items()},
        "phase_cpu_us_per_event": {k: round(1e6 * v / events, 3) for k, v in cpu.items()},
        "cpu_us_per_event": round(1e6 * sum(cpu.values()) / events, 3),
        "counts": dict(counts),
        "round_trips_after_claim": rt0,
        "_summaries": summaries,
        "_results": results,
    }


async def run_variant(
    w: Workload, ingest_cls: type, store_kind: str, store_cls: type, url: str | None
) -> dict[str, Any]:
    if store_kind == "memory":
        store = store_cls(clock=lambda: w.now)
        return await run_loop(w, ingest_cls, store)
    assert url is not None
    store = store_cls(url, prefix=unique("bjoin"))
    before = redis_stats(url)
    try:
        res = await run_loop(w, ingest_cls, store)
        after = redis_stats(url)
        n, batches = res["events"], res["batches"]
        cmds = after["total_commands_processed"] - before["total_commands_processed"] - 5
        res["redis"] = {
            "round_trips_per_batch": round(
                (store.round_trips - res["round_trips_after_claim"]) / batches, 3
            ),
            "server_evalsha_calls": after["evalsha"] - before["evalsha"],
            "server_commands_per_batch": round(cmds / batches, 1),
            "server_cpu_us_per_event": round(1e6 * (after["cpu_s"] - before["cpu_s"]) / n, 3),
            "used_memory_delta_per_key": round(
                (after["used_memory"] - before["used_memory"])
                / max(1, after["keys"] - before["keys"]),
                1,
            ),
        }
    finally:
        client = store.redis
        keys = [k async for k in client.scan_iter(match=f"{store.prefix}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await store.close()
    return res


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return bool(a["_summaries"] == b["_summaries"] and a["_results"] == b["_results"])


def run(a: argparse.Namespace) -> dict[str, Any]:
    tune_gc()
    base = load_baseline(a.baseline)
    impls: dict[str, tuple[type, type, type]] = {
        "base": (base.engine.Ingest, base.store.MemoryStore, base.redis_store.RedisStore),
        "new": (cur_engine.Ingest, cur_store.MemoryStore, cur_redis.RedisStore),
    }
    wl = argparse.Namespace(
        events=a.events,
        seed=a.seed,
        models=4,
        rate=20_000.0,
        events_per_message=500,
        batch_events=a.batch_events,
    )
    res: dict[str, Any] = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "machine": machine_info(),
    }
    with services(redis=True) as svc:
        url = svc.redis_url
        res["services"] = svc.describe()
        workloads = {join: Workload(wl, join) for join in (True, False)}
        variants: list[tuple[str, str, str, bool]] = []  # name, impl, store, join
        for impl in ("base", "new"):
            variants += [
                (f"{impl} memory+join", impl, "memory", True),
                (f"{impl} redis+join", impl, "redis", True),
            ]
        variants += [
            ("new memory (no join)", "new", "memory", False),
            ("new redis (no join)", "new", "redis", False),
        ]

        def one(v: tuple[str, str, str, bool]) -> dict[str, Any]:
            _, impl, kind, join = v
            ingest_cls, mem_cls, red_cls = impls[impl]
            store_cls = mem_cls if kind == "memory" else red_cls
            out = asyncio.run(run_variant(workloads[join], ingest_cls, kind, store_cls, url))
            gc.collect()
            return out

        # equivalence first: every variant against the baseline with the same store kind
        print("equivalence check ...", flush=True)
        ref = {(v[2], v[3]): one(v) for v in variants if v[1] == "base"}
        checks: dict[str, bool] = {}
        nojoin: dict[str, dict[str, Any]] = {}
        for v in variants:
            if v[1] == "base":
                continue
            r = one(v)
            if (v[2], v[3]) in ref:
                checks[v[0]] = _same(ref[(v[2], v[3])], r)
            else:
                nojoin[v[2]] = r
        if len(nojoin) == 2:  # without the join, MemoryStore and RedisStore must agree
            checks["no join: memory vs redis"] = _same(nojoin["memory"], nojoin["redis"])
        res["equivalent_to_baseline"] = checks
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise SystemExit(f"outputs differ from the baseline: {bad}")
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rep in range(a.reps):
            rot = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in rot:
                r = one(v)
                r.pop("_summaries")
                r.pop("_results")
                runs[v[0]].append(r)
                rd = r.get("redis", {})
                print(
                    f"rep {rep + 1}/{a.reps} {v[0]:<26} {r['events_per_s']:>9,.0f} ev/s "
                    f"commit {r['phase_us_per_event']['commit']:6.2f} "
                    f"absorb {r['phase_us_per_event']['absorb']:5.2f} µs/ev "
                    f"redis cpu {rd.get('server_cpu_us_per_event', 0):5.2f} µs/ev",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        med = sorted(rs, key=lambda r: r["events_per_s"])[len(rs) // 2]
        s: dict[str, Any] = {
            "events_per_s": summarize_runs([r["events_per_s"] for r in rs]),
            "phase_us_per_event_median": {
                k: round(sorted(r["phase_us_per_event"][k] for r in rs)[len(rs) // 2], 3)
                for k in ("process_raw", "snapshot", "commit", "absorb")
            },
            "phase_cpu_us_per_event_median": {
                k: round(sorted(r["phase_cpu_us_per_event"][k] for r in rs)[len(rs) // 2], 3)
                for k in ("process_raw", "snapshot", "commit", "absorb")
            },
            "cpu_us_per_event": summarize_runs([r["cpu_us_per_event"] for r in rs]),
            "median_run": med,
        }
        if "redis" in med:
            s["server_cpu_us_per_event_median"] = sorted(
                r["redis"]["server_cpu_us_per_event"] for r in rs
            )[len(rs) // 2]
        summary[name] = s
    pairs = [("memory+join", "base memory+join", "new memory+join"),
             ("redis+join", "base redis+join", "new redis+join")]  # fmt: skip
    res["ratios_new_to_base"] = {
        label: {
            "events_per_s": ratio(
                summary[n]["events_per_s"]["median"], summary[b]["events_per_s"]["median"]
            ),
            "commit_us": ratio(
                summary[n]["phase_us_per_event_median"]["commit"],
                summary[b]["phase_us_per_event_median"]["commit"],
            ),
            "absorb_us": ratio(
                summary[n]["phase_us_per_event_median"]["absorb"],
                summary[b]["phase_us_per_event_median"]["absorb"],
            ),
            "client_cpu_commit_plus_absorb_us": ratio(
                summary[n]["phase_cpu_us_per_event_median"]["commit"]
                + summary[n]["phase_cpu_us_per_event_median"]["absorb"],
                summary[b]["phase_cpu_us_per_event_median"]["commit"]
                + summary[b]["phase_cpu_us_per_event_median"]["absorb"],
            ),
            "cpu_us_per_event": ratio(
                summary[n]["cpu_us_per_event"]["median"], summary[b]["cpu_us_per_event"]["median"]
            ),
            **(
                {
                    "server_cpu_us": ratio(
                        summary[n]["server_cpu_us_per_event_median"],
                        summary[b]["server_cpu_us_per_event_median"],
                    )
                }
                if "server_cpu_us_per_event_median" in summary[n]
                else {}
            ),
        }
        for label, b, n in pairs
    }
    res["join_to_nojoin_rate"] = {
        "base redis": ratio(
            summary["base redis+join"]["events_per_s"]["median"],
            summary["new redis (no join)"]["events_per_s"]["median"],
        ),
        "new redis": ratio(
            summary["new redis+join"]["events_per_s"]["median"],
            summary["new redis (no join)"]["events_per_s"]["median"],
        ),
    }
    res["summary"] = summary
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def markdown(res: Mapping[str, Any]) -> str:
    rows = []
    for name, s in res["summary"].items():
        ph = s["phase_us_per_event_median"]
        cp = s["phase_cpu_us_per_event_median"]
        rd = s["median_run"].get("redis", {})
        rows.append(
            [
                name,
                s["events_per_s"]["median"],
                s["cpu_us_per_event"]["median"],
                ph["process_raw"],
                ph["commit"],
                cp["commit"],
                ph["absorb"],
                cp["absorb"],
                rd.get("round_trips_per_batch", "–"),
                rd.get("server_commands_per_batch", "–"),
                s.get("server_cpu_us_per_event_median", "–"),
            ]
        )
    lines = [
        "# Label join A/B (load_tests/bench_join.py)",
        "",
        f"{res['config']['events']:,} events per run, medians of {res['config']['reps']} "
        f"interleaved repetitions; load average {res['machine'].get('loadavg_at_start')} at "
        f"start, {res.get('loadavg_at_end')} at end; baseline {res['config']['baseline'][:12]}.",
        "",
        *md_table(
            [
                "variant",
                "events/s",
                "client CPU µs/event",
                "process_raw",
                "commit (wall)",
                "commit (CPU)",
                "absorb (wall)",
                "absorb (CPU)",
                "round trips/batch",
                "server cmds/batch",
                "Redis CPU µs/event",
            ],
            rows,
        ),
        "",
        f"new/base: {res['ratios_new_to_base']}",
        f"join/no-join events/s (RedisStore): {res['join_to_nojoin_rate']}",
        f"outputs identical to the baseline: {res['equivalent_to_baseline']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch-events", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--baseline", default=BASELINE_REF, help="git revision to compare with")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    res = run(a)
    path = write_results("join", res, a.out)
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
