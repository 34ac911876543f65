"""Throughput of PSI and the mergeable sketches on 10,000-event numpy batches.

``python -m load_tests.bench_sketches [--quick]`` writes ``load_tests/results/sketches.json``.

Every case is timed in the same run as its baseline (numpy doing the same exact job on
the batch, and river's per-value equivalent), so the ratios do not depend on the
machine. Each case runs for a fixed wall-clock budget in several rounds; the median
round is reported. State sizes are measured after a million values.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasketches
import numpy as np

from detectors.psi import PSI, PSISpec, WindowedCounts
from detectors.sketches import (
    Cardinality,
    FrequentItems,
    Histogram,
    Moments,
    QualityCounters,
    QuantileSketch,
)

BATCH = 10_000
TARGET = 10_000_000  # values/s for PSI and the numeric sketches
RESULTS = Path(__file__).resolve().parent / "results" / "sketches.json"


def rate(fn: Callable[[], object], values_per_call: int, budget: float, rounds: int) -> float:
    """Median values/s over ``rounds`` rounds of about ``budget / rounds`` seconds each."""
    fn()  # warm up
    per_round = budget / rounds
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(per_round / one))
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(calls * values_per_call / (time.perf_counter() - t0))
    return statistics.median(rates)


def state_bytes(obj: Any) -> int:
    return len(json.dumps(obj.to_state(), separators=(",", ":")).encode())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets (< 60 s in all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budget = 0.6 if args.quick else 3.0
    river_budget = 0.3 if args.quick else 1.5
    rounds = 3 if args.quick else 5
    started = time.perf_counter()

    rng = np.random.default_rng(42)
    x = rng.normal(size=BATCH)
    x_dirty = x.copy()
    x_dirty[rng.random(BATCH) < 0.01] = np.nan
    x_dirty[rng.random(BATCH) < 0.001] = np.inf
    x_list: list[float | None] = [None if i % 50 == 0 else float(v) for i, v in enumerate(x)]
    cats = np.array([f"cat{i}" for i in range(50)])
    words = cats[rng.zipf(1.5, size=BATCH) % 50]  # numpy <U5 array
    words_obj = words.astype(object)
    high_card = rng.random(BATCH) * 1e9  # nearly all distinct (worst case for HLL)

    spec = PSISpec.from_reference_sample(rng.normal(size=100_000), bins=10)
    psi = PSI(spec)
    edges = np.asarray(spec.edges)
    np_edges = np.r_[-np.inf, edges, np.inf]
    cat_spec = PSISpec.from_reference_categories(cats[rng.zipf(1.5, size=100_000) % 50])
    cat_psi = PSI(cat_spec)

    hist = Histogram(edges.tolist())
    mom = Moments()
    qual = QualityCounters(lo=-3.0, hi=3.0)
    kll = QuantileSketch(k=200)
    hll = Cardinality(lg_k=12)
    hll_s = Cardinality(lg_k=12)
    freq = FrequentItems(max_items=64)
    window = WindowedCounts(bins=spec.bins, window_ticks=300)
    counts = psi.bin_counts(x)
    tick = iter(range(10**12))

    cases: list[dict[str, Any]] = []

    def case(
        name: str,
        fn: Callable[[], object],
        *,
        numeric_target: bool,
        baselines: dict[str, tuple[Callable[[], object], int, bool]] | None = None,
        note: str = "",
    ) -> None:
        ours = rate(fn, BATCH, budget, rounds)
        row: dict[str, Any] = {
            "case": name,
            "values_per_s": round(ours),
            "us_per_10k_batch": round(BATCH / ours * 1e6, 2),
            "target_values_per_s": TARGET if numeric_target else None,
            "meets_target": (ours >= TARGET) if numeric_target else None,
            "baselines": {},
            "note": note,
        }
        for bname, (bfn, per_call, is_river) in (baselines or {}).items():
            b = rate(bfn, per_call, river_budget if is_river else budget, rounds)
            row["baselines"][bname] = {"values_per_s": round(b), "ours_over_baseline": ours / b}
        cases.append(row)
        print(
            f"{name:40s} {ours / 1e6:7.1f} M/s {BATCH / ours * 1e6:8.1f} µs/batch  "
            + "  ".join(
                f"{k}: {v['values_per_s'] / 1e6:.2f} M/s (x{v['ours_over_baseline']:.2f})"
                for k, v in row["baselines"].items()
            ),
            flush=True,
        )

    from river import sketch as river_sketch
    from river import stats as river_stats

    river_n = 2_000  # per-value river loops on a slice of the batch
    x_small = x[:river_n].tolist()
    words_small = words[:river_n].tolist()

    def river_loop(factory: Callable[[], Any], items: list[Any]) -> Callable[[], object]:
        def run() -> None:
            obj = factory()
            for v in items:
                obj.update(v)

        return run

    case(
        "psi_numeric_bin_counts+compute",
        lambda: psi.compute(psi.bin_counts(x)),
        numeric_target=True,
        baselines={
            "numpy.histogram(same edges)": (lambda: np.histogram(x, np_edges), BATCH, False),
            "numpy.searchsorted+bincount": (
                lambda: np.bincount(np.searchsorted(edges, x, side="right"), minlength=11),
                BATCH,
                False,
            ),
        },
    )
    case("psi_numeric_bin_counts", lambda: psi.bin_counts(x), numeric_target=True)
    case(
        "psi_compute_only",
        lambda: psi.compute(counts),
        numeric_target=True,
        note="cost per PSI evaluation, independent of events; stage 2 runs it per tick",
    )
    case(
        "psi_windowed_counts.add+compute",
        lambda: (window.add(next(tick), counts), psi.compute(window.total)),
        numeric_target=True,
        note="one tick of stage 2: slide a 300-tick window and evaluate PSI",
    )
    case(
        "psi_categorical_str_array",
        lambda: cat_psi.compute(cat_psi.bin_counts(words)),
        numeric_target=False,
        baselines={
            "collections.Counter(tolist)": (
                lambda: collections.Counter(words.tolist()),
                BATCH,
                False,
            ),
            "numpy.unique(return_counts)": (
                lambda: np.unique(words, return_counts=True),
                BATCH,
                False,
            ),
        },
    )
    case(
        "psi_categorical_object_array",
        lambda: cat_psi.compute(cat_psi.bin_counts(words_obj)),
        numeric_target=False,
    )
    case(
        "histogram.update",
        lambda: hist.update(x),
        numeric_target=True,
        baselines={
            "numpy.histogram(same edges)": (lambda: np.histogram(x, np_edges), BATCH, False),
            "river.sketch.Histogram(per value)": (
                river_loop(river_sketch.Histogram, x_small),
                river_n,
                True,
            ),
        },
    )
    case(
        "moments.update",
        lambda: mom.update(x),
        numeric_target=True,
        baselines={
            "numpy mean+var+min+max": (
                lambda: (x.mean(), x.var(), x.min(), x.max()),
                BATCH,
                False,
            ),
            "river.stats.Var.update_many": (
                lambda: river_stats.Var().update_many(x),
                BATCH,
                False,
            ),
            "river.stats.Var(per value)": (river_loop(river_stats.Var, x_small), river_n, True),
        },
    )
    case(
        "quality_counters.update(ndarray)",
        lambda: qual.update(x_dirty),
        numeric_target=True,
        baselines={
            "numpy isnan/isinf/range counts": (
                lambda: (
                    np.count_nonzero(np.isnan(x_dirty)),
                    np.count_nonzero(np.isinf(x_dirty)),
                    np.count_nonzero(x_dirty < -3.0),
                    np.count_nonzero(x_dirty > 3.0),
                ),
                BATCH,
                False,
            )
        },
    )
    case(
        "quality_counters.update(list with None)",
        lambda: qual.update(x_list),
        numeric_target=False,
        note="Python list input: dominated by the list -> array conversion",
    )
    case(
        "kll.update(QuantileSketch)",
        lambda: kll.update(x),
        numeric_target=True,
        note="one call per batch: datasketches' kll update accepts a float64 ndarray",
        baselines={
            "numpy.sort(exact, per batch)": (lambda: np.sort(x), BATCH, False),
            "river.stats.Quantile(per value)": (
                river_loop(river_stats.Quantile, x_small),
                river_n,
                True,
            ),
        },
    )
    case(
        "hll.update(Cardinality, floats)",
        lambda: hll.update(high_card),
        numeric_target=True,
        note=(
            "the binding has no array update: one C++ call per value, driven by "
            "deque(map(update, ndarray.tolist())) to keep the loop in C"
        ),
        baselines={
            "numpy.unique(exact, per batch)": (lambda: np.unique(high_card), BATCH, False),
            "river.sketch.NUnique(per value)": (
                river_loop(river_sketch.NUnique, [repr(v) for v in high_card[:river_n]]),
                river_n,
                True,
            ),
        },
    )
    case(
        "hll.update(Cardinality, strings)",
        lambda: hll_s.update(words),
        numeric_target=False,
    )
    case(
        "frequent_items.update(strings)",
        lambda: freq.update(words),
        numeric_target=False,
        note="batch pre-aggregated with collections.Counter: one weighted update per item",
        baselines={
            "collections.Counter(tolist)": (
                lambda: collections.Counter(words.tolist()),
                BATCH,
                False,
            ),
            "river.sketch.HeavyHitters(per value)": (
                river_loop(river_sketch.HeavyHitters, words_small),
                river_n,
                True,
            ),
        },
    )

    # merge cost (stage 2 folds per-partition tick summaries) and state sizes after 1M values
    sizes: dict[str, dict[str, Any]] = {}
    merges: dict[str, float] = {}
    million = rng.normal(size=1_000_000)
    million_words = cats[rng.zipf(1.5, size=1_000_000) % 50]
    factories: list[tuple[str, Callable[[], Any], np.ndarray]] = [
        ("moments", Moments, million),
        ("histogram(10 bins)", lambda: Histogram(edges.tolist()), million),
        ("quality_counters", lambda: QualityCounters(-3.0, 3.0), million),
        ("kll(k=200)", QuantileSketch, million),
        ("hll(lg_k=12, HLL_8)", Cardinality, million),
        ("hll(lg_k=12, HLL_4)", lambda: Cardinality(12, "HLL_4"), million),
        ("frequent_items(64)", lambda: FrequentItems(64), million_words),
    ]
    for name, factory, data in factories:
        a, b = factory(), factory()
        for i in range(0, len(data), 100_000):
            a.update(data[i : i + 100_000])
        b.update(data[:BATCH])
        raw = None
        state = a.to_state()
        if "sketch" in state:
            raw = len(base64.b64decode(state["sketch"]))
        sizes[name] = {"json_bytes": state_bytes(a), "sketch_bytes": raw}

        acc = a.copy()  # fold b into an accumulator over and over, as stage 2 does

        def do_merge(acc: Any = acc, b: Any = b) -> None:
            acc.merge(b)

        merges[name] = round(1e6 / rate(do_merge, 1, budget / 2, rounds), 2)
    wstate = WindowedCounts(bins=spec.bins, window_ticks=300)
    for t in range(300):
        wstate.add(t, counts)
    sizes["windowed_counts(11 bins, 300 ticks)"] = {
        "json_bytes": state_bytes(wstate),
        "sketch_bytes": None,
    }
    for name, s in sizes.items():
        print(f"state {name:38s} {s['json_bytes']:7d} B json", flush=True)
    print("merge µs (in place, per merge):", merges, flush=True)

    result = {
        "benchmark": "sketches",
        "quick": args.quick,
        "batch_values": BATCH,
        "target_values_per_s": TARGET,
        "environment": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "datasketches": getattr(datasketches, "__version__", "5.2"),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "cases": cases,
        "merge_us": merges,
        "state_sizes_after_1M_values": sizes,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['elapsed_s']} s")
    return result


if __name__ == "__main__":
    main()
