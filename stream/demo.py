"""``driftline demo``: the seeded scenario of :mod:`stream.scenario` on the embedded engine."""

from __future__ import annotations

import asyncio
import bisect
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from stream.config import MonitorConfig, load_config_text
from stream.embedded import EmbeddedRunner, RunResult, first_alert_for, print_timeline
from stream.profile import Profile, build_profile
from stream.scenario import (
    CHANGES,
    END,
    MONITORS_YAML,
    START,
    Change,
    events_between,
    generate,
    reference_rows,
)


@dataclass
class Caught:
    change: Change
    alert: Mapping[str, Any] | None
    events_after: int | None


@dataclass
class DemoResult:
    result: RunResult
    caught: list[Caught]
    stationary_alerts: list[dict[str, Any]]
    release: Mapping[str, Any]
    seconds: float
    events: int
    predictions: list[dict[str, Any]]


def demo_config() -> tuple[MonitorConfig, Profile]:
    """The demo's monitor config with an inline profile built from a seeded snapshot."""
    base = load_config_text(MONITORS_YAML.replace("reference: profile-fraud.json", ""), "demo")
    rows = reference_rows()
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    doc = build_profile(cols, base.models["fraud"], source="scenario.reference_rows", progress=None)
    import yaml

    raw = yaml.safe_load(MONITORS_YAML)
    raw["models"]["fraud"]["reference"] = doc
    cfg = load_config_text(yaml.safe_dump(raw), "demo monitors.yaml")
    return cfg, Profile.from_dict(doc)


async def run_demo_async(
    *,
    rate: float = 300.0,
    seed: int = 11,
    out: TextIO | None = None,
    quiet: bool = False,
    partitions: int = 2,
    batch_size: int = 2000,
) -> DemoResult:
    """Run the scenario; print progress (stderr) and the report to ``out`` (default stdout)."""
    if out is None and not quiet:
        out = sys.stdout
    t_wall = time.perf_counter()
    cfg, profile = demo_config()
    preds, labels = generate(rate=rate, seed=seed)
    runner = EmbeddedRunner(
        cfg,
        {"fraud": profile},
        partitions=partitions,
        tick_s=1.0,
        lateness_s=2.0,
        batch_size=batch_size,
        max_future_s=float("inf"),
    )
    await runner.start()
    topics = runner.topics
    i = j = 0
    step = 5.0
    t = START
    while t < START + END:
        t += step
        while i < len(preds) and preds[i]["ts"] < t:
            runner.produce(topics.predictions, [preds[i]])
            i += 1
        while j < len(labels) and labels[j]["ts"] < t:
            runner.produce(topics.labels, [labels[j]])
            j += 1
        await runner.drain(now=t)
        if out is not None:
            tripped = any(c["action"] != "release" for c in runner.result.commands)
            print(
                f"\rdemo: t={t - START:5.0f}s  events={i + j:7d}  "
                f"alerts={len(runner.result.alerts):3d}  "
                f"kill-switch={'TRIPPED' if tripped else 'armed'}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    await runner.finish(START + END + 10.0)
    release = await runner.manual(
        "fraud", "release", START + END + 20.0, reason="demo: operator release"
    )
    if out is not None:
        print(file=sys.stderr)
    alerts = runner.result.alerts
    caught = []
    for ch in CHANGES:
        a = first_alert_for(
            alerts,
            after=START + ch.at,
            kinds=ch.kinds,
            version=ch.version,
            feature=ch.feature,
            slice_key=ch.slice,
        )
        n = None
        if a is not None:
            n = events_between(preds, START + ch.at, a["detected_at"], ch.version, ch.slice)
        caught.append(Caught(ch, a, n))
    stationary = [a for a in alerts if a["detected_at"] <= START + CHANGES[0].at]
    res = DemoResult(
        runner.result,
        caught,
        stationary,
        release,
        time.perf_counter() - t_wall,
        len(preds) + len(labels),
        preds,
    )
    if out is not None:
        report(res, out)
    return res


def report(res: DemoResult, out: TextIO) -> None:
    print("\n== alert timeline (t = seconds of event time after the start) ==", file=out)

    ts_by_version: dict[str, list[float]] = {}
    for p in res.predictions:
        ts_by_version.setdefault(p["model_version"], []).append(p["ts"])

    def after(a: Mapping[str, Any]) -> str:
        prior = [c for c in CHANGES if START + c.at <= a["detected_at"]]
        if not prior:
            return "(stationary period)"
        ch = prior[-1]
        ts = ts_by_version.get(a["model_version"], [])
        n = bisect.bisect_left(ts, a["detected_at"]) - bisect.bisect_left(ts, START + ch.at)
        return f"+{n} {a['model_version']} events after '{ch.name}'"

    print_timeline(res.result, out=out, t0=START, after_change=after)
    print("\n== scripted changes ==", file=out)
    for c in res.caught:
        where = c.change.feature or c.change.slice or "-"
        if c.alert is None:
            print(
                f"MISSED  {c.change.name:<28} expected {'/'.join(c.change.kinds)} on "
                f"{c.change.version} {where}",
                file=out,
            )
        else:
            a = c.alert
            print(
                f"CAUGHT  {c.change.name:<28} by {a['kind']}/{a['detector']} on "
                f"{a['model_version']} "
                f"{where}: {c.events_after} events after the change "
                f"({a['detected_at'] - START - c.change.at:.0f} s)",
                file=out,
            )
    print(
        f"\nstationary period (0-{CHANGES[0].at:.0f}s): {len(res.stationary_alerts)} alerts; "
        f"{res.events} events, {res.result.summaries} summaries, {res.result.deadletters} "
        f"dead letters, {res.result.commits} commits in {res.seconds:.1f} s",
        file=out,
    )


def run_demo(**kw: Any) -> DemoResult:
    return asyncio.run(run_demo_async(**kw))
