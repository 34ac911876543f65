"""Sequential detectors, driftline vs river, side by side on the same seeded streams.

Run ``python -m load_tests.bench_detectors [--quick]``; writes
``load_tests/results/detectors.json`` and prints a summary.

1. False alarms and detection delay. For each stream (N(0,1), lognormal(0,1),
   Student-t(3), Bernoulli(0.02)) the charts are calibrated from a reference sample's
   mean/std (what a baseline profile holds): two-sided CUSUM (k = 0.5 sigma) and
   Page-Hinkley (delta = 0.5 sigma) with ``arl0 = 1e6`` by normal theory; CUSUM
   calibrated on the reference sample's empirical law (``from_reference(sample=...)``,
   winsorised at 4 sigma for the heavy-tailed streams); the Bernoulli CUSUM on the
   Bernoulli stream; ADWIN, river ADWIN and river PageHinkley with their defaults.
   False alarms are counted on a stationary stream (resetting after each alarm); the
   observed ARL is also measured at ``arl0 = 1e4`` where a 10^6-event stream holds
   enough alarms to estimate it. Delay: ``trials`` streams of ``pre`` in-control
   events followed by a +1 sigma mean shift; the delay is the number of post-change
   events up to and including the first alarm at or after the change.
2. Throughput: events/s of ``update_many`` (driftline) and the per-event ``update``
   loop (river), best of 3 interleaved repetitions on the same data; ratios.
3. State size: bytes of ``orjson.dumps(to_state())`` after 10^6 events.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from detectors.adwin import ADWIN, ADWINSpec
from detectors.base import Detector
from detectors.binary import BernoulliCUSUM, BernoulliCUSUMSpec, bernoulli_cusum_arl
from detectors.cusum import (
    CUSUM,
    CUSUMSpec,
    PageHinkley,
    PageHinkleySpec,
    arl_markov,
    arl_siegmund,
    calibrate_h,
)

RESULTS = Path(__file__).resolve().parent / "results" / "detectors.json"

Array = np.ndarray[Any, np.dtype[np.float64]]
Gen = Callable[[np.random.Generator, int], Array]

STREAMS: dict[str, Gen] = {
    "normal": lambda g, n: g.normal(0.0, 1.0, n),
    "lognormal": lambda g, n: g.lognormal(0.0, 1.0, n),
    "student_t3": lambda g, n: g.standard_t(3, n),
    "bernoulli_0.02": lambda g, n: (g.random(n) < 0.02).astype(np.float64),
}
CLIP = {"normal": None, "lognormal": 4.0, "student_t3": 4.0, "bernoulli_0.02": None}


class RiverRunner:
    """Per-event loop over a river drift detector; returns alarm indices."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory

    def indices(self, x: Array, start: int = 0, stop_after: int | None = None) -> list[int]:
        det = self.factory()
        out = []
        for i, v in enumerate(x.tolist()):
            det.update(v)
            if det.drift_detected:
                out.append(i)
                if stop_after is not None and i >= stop_after:
                    break
        return out


def ours_indices(make: Callable[[], Detector], x: Array) -> list[int]:
    return [d.index for d in make().update_many(x)]


def detector_table(
    name: str, ref: Array, arl0: float
) -> dict[str, Callable[[Array, int | None], list[int]]]:
    """Detector label -> function(stream, stop_after) giving alarm indices."""
    mean, std = float(ref.mean()), float(ref.std())
    cusum = CUSUMSpec.from_reference(mean, std, arl0=arl0)
    cusum_emp = CUSUMSpec.from_reference(mean, std, arl0=arl0, sample=ref, clip=CLIP[name])
    ph = PageHinkleySpec(delta=0.5 * std, sigma=std, arl0=arl0)
    table: dict[str, Callable[[Array, int | None], list[int]]] = {
        "cusum_normal_theory": lambda x, s: ours_indices(lambda: CUSUM(cusum), x),
        "cusum_empirical": lambda x, s: ours_indices(lambda: CUSUM(cusum_emp), x),
        "page_hinkley": lambda x, s: ours_indices(lambda: PageHinkley(ph), x),
        "adwin": lambda x, s: ours_indices(lambda: ADWIN(ADWINSpec()), x),
    }
    if name.startswith("bernoulli"):
        bern = BernoulliCUSUMSpec(p0=0.02, arl0=arl0)
        table["bernoulli_cusum"] = lambda x, s: ours_indices(lambda: BernoulliCUSUM(bern), x)
    try:
        from river import drift

        river_ph = RiverRunner(drift.PageHinkley)
        river_adwin = RiverRunner(drift.ADWIN)
        table["river_page_hinkley_defaults"] = lambda x, s: river_ph.indices(x, stop_after=s)
        table["river_adwin_defaults"] = lambda x, s: river_adwin.indices(x, stop_after=s)
    except ImportError:  # pragma: no cover - river is a dev dependency
        pass
    return table


def false_alarms(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s_i, (name, gen) in enumerate(STREAMS.items()):
        g = np.random.default_rng(1000 + s_i)
        ref = gen(g, cfg["reference"])
        live = gen(g, cfg["stationary"])
        res: dict[str, Any] = {"events": len(live), "reference_events": len(ref)}
        for label, fn in detector_table(name, ref, 1e6).items():
            t0 = time.perf_counter()
            hits = fn(live, None)
            res[label] = {"false_alarms_arl0_1e6": len(hits), "seconds": time.perf_counter() - t0}
        # observed ARL at a target the stream can measure
        target = 1e4
        for label, fn in detector_table(name, ref, target).items():
            if label.startswith(("river", "adwin")):
                continue
            hits = fn(live, None)
            observed = len(live) / len(hits) if hits else math.inf
            res[label]["alarms_arl0_1e4"] = len(hits)
            res[label]["observed_arl_at_target_1e4"] = observed if hits else None
            res[label]["observed_over_target"] = observed / target if hits else None
        out[name] = res
    return out


def delays(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pre, post, trials = cfg["pre"], cfg["post"], cfg["trials"]
    for s_i, (name, gen) in enumerate(STREAMS.items()):
        g = np.random.default_rng(2000 + s_i)
        ref = gen(g, cfg["reference"])
        std = float(ref.std())
        binary = name.startswith("bernoulli")
        # a Bernoulli stream shifts its rate: +1 sigma is 0.02 -> 0.16; also 0.02 -> 0.04
        shifts = {"plus_1_sigma": 0.02 + math.sqrt(0.02 * 0.98) if binary else std}
        if binary:
            shifts["rate_doubles"] = 0.04
        table = detector_table(name, ref, 1e6)
        res: dict[str, Any] = {}
        for shift_name, shift in shifts.items():
            streams = []
            for _ in range(trials):
                before = gen(g, pre)
                if binary:
                    # a doubled error rate takes ~1000 trials to show: longer post-change run
                    length = cfg["post_rate"] if shift_name == "rate_doubles" else post
                    after = (g.random(length) < shift).astype(np.float64)
                else:
                    after = gen(g, post) + shift
                streams.append(np.concatenate([before, after]))
            per: dict[str, Any] = {}
            for label, fn in table.items():
                d, early, missed = [], 0, 0
                for x in streams:
                    hits = fn(x, pre)
                    early += sum(1 for i in hits if i < pre)
                    after_hits = [i for i in hits if i >= pre]
                    if after_hits:
                        d.append(after_hits[0] - pre + 1)
                    else:
                        missed += 1
                arr = np.array(d, dtype=np.float64)
                per[label] = {
                    "mean_delay": float(arr.mean()) if len(arr) else None,
                    "median_delay": float(np.median(arr)) if len(arr) else None,
                    "p90_delay": float(np.percentile(arr, 90)) if len(arr) else None,
                    "missed": missed,
                    "alarms_before_change": early,
                }
            res[shift_name] = per
        out[name] = res
    h = calibrate_h(0.5, 1e6)
    out["theory_normal_plus_1_sigma"] = {
        "h_two_sided": h,
        "siegmund_delay": arl_siegmund(0.5, h),
        "integral_equation_delay": arl_markov(0.5, h, shift=1.0),
    }
    bern = BernoulliCUSUMSpec(p0=0.02, arl0=1e6)
    out["theory_bernoulli_rate_doubles"] = {
        "h": bern.decision_interval,
        "integral_equation_delay": bernoulli_cusum_arl(0.04, 0.02, 0.04, bern.decision_interval),
    }
    out["config"] = {
        "pre_change": pre,
        "post_change_max": post,
        "post_change_max_rate_doubles": cfg["post_rate"],
        "trials": trials,
    }
    return out


def throughput(cfg: dict[str, Any]) -> dict[str, Any]:
    n = cfg["throughput"]
    g = np.random.default_rng(3000)
    x = g.normal(0.0, 1.0, n)
    xb = (g.random(n) < 0.02).astype(np.float64)
    xl, xbl = x.tolist(), xb.tolist()
    ours: dict[str, Callable[[], object]] = {
        "adwin": lambda: ADWIN(ADWINSpec()).update_many(x),
        "cusum": lambda: CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0)).update_many(x),
        "page_hinkley": lambda: PageHinkley(
            PageHinkleySpec(delta=0.5, sigma=1.0, arl0=1e6)
        ).update_many(x),
        "bernoulli_cusum": lambda: BernoulliCUSUM(BernoulliCUSUMSpec(p0=0.02)).update_many(xb),
    }
    runs: dict[str, Callable[[], object]] = dict(ours)
    try:
        from river import drift

        def river_loop(factory: Callable[[], Any], data: list[float]) -> Callable[[], None]:
            def run() -> None:
                det = factory()
                for v in data:
                    det.update(v)

            return run

        runs["river_adwin"] = river_loop(drift.ADWIN, xl)
        runs["river_page_hinkley"] = river_loop(drift.PageHinkley, xl)
        runs["river_ddm_binary"] = river_loop(drift.binary.DDM, xbl)
    except ImportError:  # pragma: no cover
        pass
    # warm the calibration caches outside the timed region
    for fn in ours.values():
        fn()
    best: dict[str, float] = {}
    for _ in range(cfg["repeats"]):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[label] = min(best.get(label, math.inf), dt)
    eps = {k: n / v for k, v in best.items()}
    ratios = {}
    if "river_adwin" in eps:
        ratios = {
            "adwin_vs_river_adwin": eps["adwin"] / eps["river_adwin"],
            "page_hinkley_vs_river_page_hinkley": eps["page_hinkley"] / eps["river_page_hinkley"],
            "cusum_vs_river_page_hinkley": eps["cusum"] / eps["river_page_hinkley"],
            "bernoulli_cusum_vs_river_page_hinkley": eps["bernoulli_cusum"]
            / eps["river_page_hinkley"],
            "bernoulli_cusum_vs_river_ddm": eps["bernoulli_cusum"] / eps["river_ddm_binary"],
        }
    # weighted ticks (how the service feeds detectors): 1000-event summaries
    ticks = x[: (n // 1000) * 1000].reshape(-1, 1000)
    sums, sqs = ticks.sum(axis=1).tolist(), (ticks**2).sum(axis=1).tolist()
    tick_rate = {}
    for label, make in (
        ("adwin", lambda: ADWIN(ADWINSpec())),
        ("cusum", lambda: CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0))),
        ("page_hinkley", lambda: PageHinkley(PageHinkleySpec(delta=0.5, sigma=1.0))),
    ):
        det = make()
        t0 = time.perf_counter()
        for s, q in zip(sums, sqs, strict=True):
            det.update(1000, s, q)
        tick_rate[label] = len(sums) / (time.perf_counter() - t0)
    return {
        "events": n,
        "events_per_second": eps,
        "ratios": ratios,
        "ticks_per_second_1000_event_ticks": tick_rate,
    }


def state_sizes(cfg: dict[str, Any]) -> dict[str, Any]:
    n = cfg["state_events"]
    g = np.random.default_rng(4000)
    x = g.normal(0.0, 1.0, n)
    out: dict[str, Any] = {"events": n}
    dets: dict[str, Detector] = {
        "adwin": ADWIN(ADWINSpec()),
        "cusum": CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0)),
        "page_hinkley": PageHinkley(PageHinkleySpec(delta=0.5, sigma=1.0)),
        "bernoulli_cusum": BernoulliCUSUM(BernoulliCUSUMSpec(p0=0.02)),
    }
    for label, det in dets.items():
        data = (x > 2.054).astype(np.float64) if label == "bernoulli_cusum" else x
        det.update_many(data)
        state = det.to_state()
        out[label] = {"bytes": len(orjson.dumps(state))}
        if isinstance(det, ADWIN):
            out[label].update(width=det.width, buckets=det.n_buckets, levels=len(state["levels"]))
    return out


FULL = {
    "reference": 200_000,
    "stationary": 1_000_000,
    "pre": 5000,
    "post": 2000,
    "post_rate": 10_000,
    "trials": 200,
    "throughput": 1_000_000,
    "repeats": 3,
    "state_events": 1_000_000,
}
QUICK = {
    "reference": 50_000,
    "stationary": 200_000,
    "pre": 2000,
    "post": 1000,
    "post_rate": 5000,
    "trials": 40,
    "throughput": 200_000,
    "repeats": 2,
    "state_events": 200_000,
}


def summarize(res: dict[str, Any]) -> list[str]:
    lines = []
    fa = res["false_alarms"]
    dl = res["delays"]
    for name in STREAMS:
        lines.append(f"[{name}] false alarms / {fa[name]['events']} events (arl0=1e6), delay +1sd")
        for label, v in fa[name].items():
            if not isinstance(v, dict):
                continue
            d = dl[name]["plus_1_sigma"].get(label, {})
            obs = v.get("observed_over_target")
            extra = f"  ARL@1e4 x{obs:.2f}" if obs is not None else ""
            mean = d.get("mean_delay")
            med = d.get("median_delay")
            lines.append(
                f"  {label:30s} FA={v['false_alarms_arl0_1e6']:<5d} "
                f"delay mean={mean if mean is None else round(mean, 1)} "
                f"median={med} missed={d.get('missed')}{extra}"
            )
    lines.append("[bernoulli_0.02] error rate doubles (0.02 -> 0.04): delay")
    for label, d in dl["bernoulli_0.02"]["rate_doubles"].items():
        mean = d.get("mean_delay")
        lines.append(
            f"  {label:30s} mean={mean if mean is None else round(mean, 1)} "
            f"median={d.get('median_delay')} missed={d.get('missed')} "
            f"early={d.get('alarms_before_change')}"
        )
    tp = res["throughput"]
    lines.append(
        "throughput (events/s): "
        + ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in tp["events_per_second"].items())
    )
    lines.append("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in tp["ratios"].items()))
    lines.append(f"state sizes: {res['state_size']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (< 60 s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "config": cfg,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        import river

        res["river_version"] = getattr(river, "__version__", None)
    except ImportError:  # pragma: no cover
        res["river_version"] = None
    res["false_alarms"] = false_alarms(cfg)
    res["delays"] = delays(cfg)
    res["throughput"] = throughput(cfg)
    res["state_size"] = state_sizes(cfg)
    res["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    for line in summarize(res):
        print(line)
    print(f"wrote {args.out} in {res['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
