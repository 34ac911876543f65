"""``driftline demo`` and ``driftline replay``: the real engine in embedded mode, with a
readable timeline on the terminal and an HTML/PNG report.

``driftline demo`` replays :mod:`stream.scenario` (four incidents from the field, four
models, one timeline) through :class:`stream.embedded.EmbeddedRunner` — the same stage-1
and stage-2 engine and consistency protocol as the Kafka worker, over an in-process bus and
:class:`stream.store.MemoryStore`. ``driftline replay`` does the same over historical
prediction/label logs. ``driftline demo --kafka ... --redis ...`` runs the scenario through
the real service (:mod:`stream.worker`).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import yaml

from stream.config import MonitorConfig, load_config_text
from stream.embedded import EmbeddedRunner, RunResult, read_events
from stream.profile import Profile, build_profile, profile_for
from stream.report import (
    Section,
    SeqTracer,
    dist_plot,
    stat_plot,
    summaries_from_bus,
    write_report,
)
from stream.scenario import (
    MONITORS_YAML,
    START,
    STORIES,
    STORIES_END,
    STORIES_YAML,
    Expect,
    Story,
    generate_stories,
    reference_rows,
    scope_of,
    story_reference_rows,
)

DEFAULT_REPORT_DIR: Final = "demo-report"


class DemoUnavailable(RuntimeError):
    """The requested demo mode cannot run here (e.g. the Kafka worker is not built)."""


# --------------------------------------------------------------------------- config


def demo_config() -> tuple[MonitorConfig, Profile]:
    """The single-model service scenario's config (``fraud`` with an inline profile built
    from a seeded snapshot) — used by the worker's integration tests."""
    base = load_config_text(MONITORS_YAML.replace("reference: profile-fraud.json", ""), "demo")
    rows = reference_rows()
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    doc = build_profile(cols, base.models["fraud"], source="scenario.reference_rows", progress=None)
    raw = yaml.safe_load(MONITORS_YAML)
    raw["models"]["fraud"]["reference"] = doc
    cfg = load_config_text(yaml.safe_dump(raw), "demo monitors.yaml")
    return cfg, Profile.from_dict(doc)


def stories_config() -> tuple[MonitorConfig, dict[str, Profile]]:
    """The four stories' monitor config, each model with an inline profile of its seeded
    snapshot (:func:`stream.scenario.story_reference_rows`)."""
    raw = yaml.safe_load(STORIES_YAML)
    for m in raw["models"].values():
        m.pop("reference", None)
    base = load_config_text(yaml.safe_dump(raw, sort_keys=False), "demo monitors.yaml")
    profiles: dict[str, Profile] = {}
    for model in raw["models"]:
        rows = story_reference_rows(model)
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        doc = build_profile(
            cols,
            base.models[model],
            source=f"scenario.story_reference_rows({model!r})",
            progress=None,
        )
        raw["models"][model]["reference"] = doc
        profiles[model] = Profile.from_dict(doc)
    cfg = load_config_text(yaml.safe_dump(raw, sort_keys=False), "demo monitors.yaml")
    return cfg, profiles


# --------------------------------------------------------------------------- progress


class Progress:
    """A live progress line: carriage-return updated on a TTY, periodic lines otherwise."""

    def __init__(
        self,
        stream: TextIO | None,
        label: str,
        *,
        tty: bool | None = None,
        every_s: float = 60.0,
        min_interval: float = 0.1,
    ) -> None:
        self.stream = stream
        self.label = label
        self.tty = bool(tty if tty is not None else stream is not None and stream.isatty())
        self.every_s = every_s
        self.min_interval = min_interval
        self._last_wall = -math.inf
        self._last_mark = -math.inf
        self._dirty = False

    def update(self, t: float, text: str, *, force: bool = False) -> None:
        """Report progress at event time ``t`` (seconds after the start)."""
        if self.stream is None:
            return
        if self.tty:
            now = time.perf_counter()
            if force or now - self._last_wall >= self.min_interval:
                self._last_wall = now
                self.stream.write(f"\r\x1b[2K{self.label}: {text}")
                self.stream.flush()
                self._dirty = True
        elif force or t - self._last_mark >= self.every_s:
            self._last_mark = t
            self.stream.write(f"{self.label}: {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty and self._dirty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- driving


async def drive(
    runner: EmbeddedRunner,
    predictions: Sequence[Mapping[str, Any]],
    labels: Sequence[Mapping[str, Any]],
    *,
    step: float,
    on_step: Callable[[float, int], None] | None = None,
) -> float:
    """Produce both logs in event-time slices of ``step`` seconds and drain after each slice
    (so every partition progresses together, like live traffic). Returns the last ``ts``."""
    await runner.start()
    t_pred, t_lab = runner.topics.predictions, runner.topics.labels
    i = j = 0
    heads = [float(log[0]["ts"]) for log in (predictions, labels) if log]
    first = min(heads) if heads else 0.0
    t = first
    last = first
    while i < len(predictions) or j < len(labels):
        t += step
        while i < len(predictions) and float(predictions[i]["ts"]) < t:
            runner.produce(t_pred, [predictions[i]])
            last = max(last, float(predictions[i]["ts"]))
            i += 1
        while j < len(labels) and float(labels[j]["ts"]) < t:
            runner.produce(t_lab, [labels[j]])
            last = max(last, float(labels[j]["ts"]))
            j += 1
        await runner.drain(now=t)
        if on_step is not None:
            on_step(t, i + j)
    return last


# --------------------------------------------------------------------------- results


@dataclass
class Detection:
    """How an intended detection of a story went."""

    expect: Expect
    alert: Mapping[str, Any] | None
    events_after: int | None  # predictions in the story's scope between change and alert
    seconds_after: float | None

    @property
    def ok(self) -> bool:
        return self.events_after is not None and self.events_after <= self.expect.max_events


@dataclass
class StoryResult:
    story: Story
    detections: list[Detection]
    quiet_alerts: list[dict[str, Any]]  # alerts of the model before its change (must be [])
    alerts: list[dict[str, Any]]  # alerts of the model at/after the change
    commands: list[dict[str, Any]]
    predictions: int
    labels: int

    @property
    def caught(self) -> bool:
        return all(d.ok for d in self.detections)


@dataclass
class DemoResult:
    result: RunResult
    stories: list[StoryResult]
    release: Mapping[str, Any] | None
    seconds: float  # wall time of the whole demo (generation, engine, report)
    engine_seconds: float
    events: int
    report: Path | None = None
    timeline: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        quiet = all(not s.quiet_alerts for s in self.stories)
        ks = all(
            s.story.killswitch is None
            or any(
                c["action"] == s.story.killswitch and c["mode"] == "automatic" for c in s.commands
            )
            for s in self.stories
        )
        return quiet and ks and all(s.caught for s in self.stories)


def evaluate(
    result: RunResult,
    predictions: Sequence[Mapping[str, Any]],
    labels: Sequence[Mapping[str, Any]],
    *,
    t0: float = START,
    stories: Sequence[Story] = STORIES,
) -> list[StoryResult]:
    """Match the run's alerts against each story's intended detections."""
    out: list[StoryResult] = []
    alerts = sorted(result.alerts, key=lambda a: a["detected_at"])
    for st in stories:
        change = t0 + st.at
        scope_ts = [float(p["ts"]) for p in predictions if scope_of(p, st)]
        mine = [a for a in alerts if a["model_id"] == st.model]
        dets: list[Detection] = []
        for ex in st.expect:
            a = next((a for a in mine if a["detected_at"] >= change and ex.matches(a)), None)
            if a is None:
                dets.append(Detection(ex, None, None, None))
                continue
            n = bisect.bisect_left(scope_ts, a["detected_at"]) - bisect.bisect_left(
                scope_ts, change
            )
            dets.append(Detection(ex, a, n, float(a["detected_at"]) - change))
        out.append(
            StoryResult(
                st,
                dets,
                [a for a in mine if a["detected_at"] < change],
                [a for a in mine if a["detected_at"] >= change],
                [c for c in result.commands if c["model_id"] == st.model],
                sum(1 for p in predictions if p["model_id"] == st.model),
                sum(1 for lab in labels if lab["model_id"] == st.model),
            )
        )
    return out


# --------------------------------------------------------------------------- timeline


def _where(a: Mapping[str, Any]) -> str:
    feature, sl = a.get("feature"), a.get("slice")
    if feature is None and a["kind"] == "prediction_drift":
        feature = "score"
    return " ".join(x for x in (feature, sl) if x) or "-"


def _alert_line(a: Mapping[str, Any], t0: float, sev: str, tail: str = "") -> str:
    return (
        f"t={a['detected_at'] - t0:7.1f}s    ALERT {a['kind']}/{a['detector']}  "
        f"{a['model_id']} {a['model_version']} {_where(a)}  {sev}  "
        f"stat {a['statistic']:.3g} vs {a['threshold']:.3g}{tail}"
    )


def _minor_line(a: Mapping[str, Any], t0: float, sev: str) -> str:
    return (
        f"               ↳ t={a['detected_at'] - t0:6.1f}s  {a['kind']}/{a['detector']}  "
        f"{a['model_version']} {_where(a)}  {sev}  stat {a['statistic']:.3g}"
    )


def _command_line(c: Mapping[str, Any], t0: float) -> str:
    if c["action"] == "release":
        what = f"release  {c['model_id']}"
    else:
        what = f"{c['action']:<8} {c['model_id']} -> {c.get('target_version') or '-'}"
    why = f"rule {c['rule']}" if c.get("rule") else (c.get("reason") or "")
    reasons = ", ".join(c["reason_alert_ids"])
    return (
        f"t={c['issued_at'] - t0:7.1f}s    KILL-SWITCH {what}  ({c['mode']}; {why}"
        f"{'; alerts ' + reasons if reasons else ''})"
    )


def _grouped(
    alerts: Sequence[Mapping[str, Any]],
) -> list[tuple[Mapping[str, Any], str, list[Mapping[str, Any]]]]:
    """Alerts merged per signal: (first alert, severity path e.g. ``warn→critical``, all)."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for a in sorted(alerts, key=lambda a: a["detected_at"]):
        key = (a["model_version"], a["kind"], a["detector"], a.get("feature"), a.get("slice"))
        groups.setdefault(key, []).append(a)
    out = []
    for g in groups.values():
        sevs: list[str] = []
        for a in g:
            if not sevs or sevs[-1] != a["severity"]:
                sevs.append(a["severity"])
        out.append((g[0], "→".join(sevs), g))
    return out


def format_timeline(
    res: DemoResult | None = None,
    *,
    result: RunResult | None = None,
    t0: float = START,
    scope_counter: Callable[[Story, float], int] | None = None,
) -> str:
    """The alert / kill-switch timeline: one block per story (demo) or per model (replay).

    A block shows the change, the intended detections (``+N ev`` = predictions of the
    affected scope between change and alert), the kill-switch commands, and the other
    alerts of the same model grouped under ``consequential`` (one line per signal).
    """
    lines: list[str] = []
    if res is not None:
        lines.append(
            "== timeline (t = event-time seconds after the start; +N events = predictions of "
            "the affected model/version/slice since its change) =="
        )
        for sr in sorted(res.stories, key=lambda s: s.story.at):
            st = sr.story
            lines.append("")
            lines.append(f"t={st.at:7.1f}s  ▶ CHANGE  {st.model}: {st.title}")
            primary: set[str] = set()
            rows: list[tuple[float, str]] = []
            for d in sr.detections:
                if d.alert is None:
                    ex = d.expect
                    miss = f"{ex.kind}/{ex.detector} on {ex.version} {ex.where}"
                    rows.append((math.inf, f"             MISSED {miss}"))
                    continue
                primary.add(d.alert["alert_id"])
                sev = next(
                    (p for f, p, _ in _grouped(sr.alerts) if f["alert_id"] == d.alert["alert_id"]),
                    d.alert["severity"],
                )
                tail = f"   ⇒ +{d.events_after} events ({d.seconds_after:.0f} s) after the change"
                rows.append((d.alert["detected_at"], _alert_line(d.alert, t0, sev, tail)))
            for c in sr.commands:
                rows.append((c["issued_at"], _command_line(c, t0)))
            lines += [r for _, r in sorted(rows, key=lambda r: r[0])]
            others = [g for g in _grouped(sr.alerts) if g[0]["alert_id"] not in primary]
            if others:
                n_other = sum(len(g[2]) for g in others)
                lines.append(f"             consequential alerts ({n_other}, one line per signal):")
                lines += [_minor_line(first, t0, sevs) for first, sevs, _ in others]
            if sr.quiet_alerts:
                lines.append(f"             !! {len(sr.quiet_alerts)} alerts BEFORE the change:")
                lines += [
                    "               " + _alert_line(a, t0, a["severity"]) for a in sr.quiet_alerts
                ]
        return "\n".join(lines)
    assert result is not None
    lines.append("== alert timeline (t = event-time seconds after the first event) ==")
    models = sorted(
        {a["model_id"] for a in result.alerts} | {c["model_id"] for c in result.commands},
        key=lambda m: min(
            [a["detected_at"] for a in result.alerts if a["model_id"] == m]
            + [c["issued_at"] for c in result.commands if c["model_id"] == m]
        ),
    )
    if not models:
        lines.append("no alerts")
    for m in models:
        groups = _grouped([a for a in result.alerts if a["model_id"] == m])
        lines.append("")
        lines.append(f"model {m}: {sum(len(g[2]) for g in groups)} alerts on {len(groups)} signals")
        rows = []
        if groups:
            first, sevs, _ = groups[0]
            rows.append((first["detected_at"], _alert_line(first, t0, sevs, "   first alert")))
        for c in result.commands:
            if c["model_id"] == m:
                rows.append((c["issued_at"], _command_line(c, t0)))
        lines += [r for _, r in sorted(rows, key=lambda r: r[0])]
        if len(groups) > 1:
            lines.append("             then:")
            lines += [_minor_line(first, t0, sevs) for first, sevs, _ in groups[1:]]
    return "\n".join(lines)


def format_verdict(res: DemoResult) -> str:
    lines = ["", "== verdict =="]
    for sr in sorted(res.stories, key=lambda s: s.story.at):
        st = sr.story
        for d in sr.detections:
            tag = "CAUGHT" if d.ok else ("LATE  " if d.alert is not None else "MISSED")
            lines.append(
                f"{tag}  {st.model:<15} {d.expect.kind}/{d.expect.detector} on "
                f"{d.expect.version} {d.expect.where}: "
                + (
                    f"+{d.events_after} events ({d.seconds_after:.0f} s) after the change "
                    f"(budget {d.expect.max_events})"
                    if d.alert is not None
                    else "no alert"
                )
            )
    quiet = ", ".join(
        f"{s.story.model} 0–{s.story.at:.0f} s: {len(s.quiet_alerts)}"
        for s in sorted(res.stories, key=lambda s: s.story.at)
    )
    lines.append(f"quiet periods (alerts before each change): {quiet}")
    for sr in res.stories:
        if sr.story.killswitch is None:
            continue
        trips = [c for c in sr.commands if c["action"] != "release"]
        rel = [c for c in sr.commands if c["action"] == "release"]
        ks = "; ".join(
            f"{c['action']} -> {c.get('target_version')} at t={c['issued_at'] - START:.0f} s "
            f"({c['mode']})"
            for c in trips
        )
        if rel:
            ks += f"; released at t={rel[-1]['issued_at'] - START:.0f} s ({rel[-1]['mode']})"
        lines.append(f"kill switch {sr.story.model}: {ks or 'did NOT trip'}")
    per = ", ".join(f"{s.story.model} {s.predictions + s.labels}" for s in res.stories)
    lines.append(
        f"{res.events} events ({per}), {res.result.summaries} summaries, "
        f"{len(res.result.alerts)} alerts, {res.result.deadletters} dead letters; "
        f"engine {res.engine_seconds:.1f} s, total {res.seconds:.1f} s wall"
    )
    if res.report is not None:
        lines.append(f"report: {res.report}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def _demo_sections(
    res: DemoResult,
    config: MonitorConfig,
    summaries: Sequence[Mapping[str, Any]],
    tracer: SeqTracer,
    profiles: Mapping[str, Profile | None],
) -> list[Section]:
    sections: list[Section] = []
    for sr in sorted(res.stories, key=lambda s: s.story.at):
        st = sr.story
        change = START + st.at
        for k, d in enumerate(sr.detections):
            if d.alert is None:
                continue
            a = d.alert
            cfg = config.models[st.model].detectors
            sp = stat_plot(
                a,
                res.result.alerts,
                res.result.findings,
                tracer,
                t0=START,
                change_at=change,
                psi_levels=(cfg.psi_warn, cfg.psi_critical),
            )
            dp = dist_plot(
                a,
                summaries,
                profiles.get(st.model),
                t0=START,
                current=(change, max(float(a["detected_at"]), change + 30.0) + 1.0),
                before=(START, change),
            )
            facts = [
                ("model / version", f"{st.model} {a['model_version']}"),
                ("caught by", f"{a['kind']} / {a['detector']} on {_where(a)}"),
                (
                    "statistic vs threshold",
                    f"{a['statistic']:.4g} vs {a['threshold']:.4g} ({a['severity']})",
                ),
                (
                    "detection delay",
                    f"+{d.events_after} events, {d.seconds_after:.0f} s after the change",
                ),
                ("alert message", str(a["message"])),
            ]
            for c in sr.commands:
                facts.append(("kill switch", _command_line(c, START).split("KILL-SWITCH ", 1)[1]))
            sections.append(
                Section(
                    f"{st.model}-{k}-{a['detector']}",
                    f"{st.model}: {st.title}"
                    + (f" — {a['detector']}" if len(sr.detections) > 1 else ""),
                    st.what if k == 0 else "",
                    facts,
                    sp,
                    dp,
                )
            )
    return sections


# --------------------------------------------------------------------------- demo


async def run_demo_async(
    *,
    scale: float = 1.0,
    seed: int = 11,
    out: TextIO | None = None,
    progress: TextIO | None = None,
    tty: bool | None = None,
    report_dir: str | Path | None = DEFAULT_REPORT_DIR,
    partitions: int = 2,
    batch_size: int = 5000,
    step: float = 1.0,
) -> DemoResult:
    """Run the scenario on the embedded engine; print the timeline to ``out`` (None =
    silent), progress to ``progress``; write the report to ``report_dir`` (None = none)."""
    t_wall = time.perf_counter()
    cfg, profiles = stories_config()
    preds, labels = generate_stories(scale=scale, seed=seed)
    tracer = SeqTracer()
    runner = EmbeddedRunner(
        cfg,
        profiles,
        partitions=partitions,
        tick_s=1.0,
        lateness_s=2.0,
        batch_size=batch_size,
        max_future_s=math.inf,
        keep_findings=report_dir is not None,
        on_detect=tracer if report_dir is not None else None,
    )
    prog = Progress(progress, "demo", tty=tty, every_s=60.0)
    total = len(preds) + len(labels)
    t_engine = time.perf_counter()

    def on_step(t: float, done: int, force: bool = False) -> None:
        cmds = runner.result.commands
        ks = "armed"
        if cmds:
            last = cmds[-1]
            ks = "released" if last["action"] == "release" else f"TRIPPED ({last['model_id']})"
        prog.update(
            t - START,
            f"t={t - START:5.0f}/{STORIES_END:.0f} s  events {done:>7,}/{total:,}  "
            f"alerts {len(runner.result.alerts):3d}  kill-switch {ks}",
            force=force,
        )

    await drive(runner, preds, labels, step=step, on_step=on_step)
    await runner.finish(START + STORIES_END + 10.0)
    release = None
    for st in STORIES:
        if st.killswitch is not None:
            release = await runner.manual(
                st.model, "release", START + STORIES_END + 10.0, reason="demo: operator release"
            )
    engine_s = time.perf_counter() - t_engine
    on_step(START + STORIES_END, total, force=True)
    prog.close()
    res = DemoResult(
        runner.result,
        evaluate(runner.result, preds, labels),
        release,
        0.0,
        engine_s,
        total,
    )
    res.timeline = format_timeline(res)
    if report_dir is not None:
        summaries = summaries_from_bus(runner.bus.logs[runner.topics.summaries])
        sections = _demo_sections(res, cfg, summaries, tracer, profiles)
        rows = []
        for sr in sorted(res.stories, key=lambda s: s.story.at):
            for d in sr.detections:
                rows.append(
                    [
                        sr.story.model,
                        f"t={sr.story.at:.0f} s",
                        f"{d.expect.kind} / {d.expect.detector} {d.expect.where}",
                        "missed"
                        if d.alert is None
                        else f"+{d.events_after} events ({d.seconds_after:.0f} s)",
                        str(len(sr.quiet_alerts)),
                    ]
                )
        res.report = write_report(
            report_dir,
            "driftline demo: four incidents from the field",
            sections,
            intro=(
                f"Seeded scenario (seed {seed}, scale {scale:g}): four models on one "
                f"{STORIES_END:.0f}-second timeline, {total:,} events through the real engine in "
                "embedded mode. Each model is stationary until its change."
            ),
            summary_header=[
                "model",
                "change",
                "intended detection",
                "caught after",
                "alerts before change",
            ],
            summary_rows=rows,
            timeline=res.timeline,
        )
    res.seconds = time.perf_counter() - t_wall
    if out is not None:
        print(res.timeline, file=out)
        print(format_verdict(res), file=out)
    return res


def run_demo(**kw: Any) -> DemoResult:
    """Synchronous :func:`run_demo_async`."""
    return asyncio.run(run_demo_async(**kw))


# --------------------------------------------------------------------------- replay


@dataclass
class ReplayResult:
    result: RunResult
    events: int
    t0: float
    seconds: float
    timeline: str
    report: Path | None = None


def _is_label(ev: Mapping[str, Any]) -> bool:
    return "label" in ev and "features" not in ev


async def run_replay_async(
    config: MonitorConfig,
    logs: Sequence[str | Path],
    *,
    partitions: int = 2,
    tick_s: float = 1.0,
    lateness_s: float = 2.0,
    batch_size: int = 5000,
    out: TextIO | None = None,
    progress: TextIO | None = None,
    tty: bool | None = None,
    report_dir: str | Path | None = None,
) -> ReplayResult:
    """Replay JSONL / Parquet prediction and label logs through the embedded engine: which
    alerts would have fired, and when (timeline to ``out``, report to ``report_dir``)."""
    t_wall = time.perf_counter()
    events: list[dict[str, Any]] = []
    for log in logs:
        events.extend(read_events(log))
    events.sort(key=lambda e: float(e.get("ts", 0.0)))
    preds = [e for e in events if not _is_label(e)]
    labels = [e for e in events if _is_label(e)]
    profiles = {m: profile_for(c) for m, c in config.models.items()}
    tracer = SeqTracer()
    runner = EmbeddedRunner(
        config,
        profiles,
        partitions=partitions,
        tick_s=tick_s,
        lateness_s=lateness_s,
        batch_size=batch_size,
        max_future_s=math.inf,
        keep_findings=report_dir is not None,
        on_detect=tracer if report_dir is not None else None,
    )
    t0 = float(events[0].get("ts", 0.0)) if events else 0.0
    prog = Progress(progress, "replay", tty=tty, every_s=300.0 * tick_s)

    def on_step(t: float, done: int, force: bool = False) -> None:
        prog.update(
            t - t0,
            f"t={t - t0:7.0f} s  events {done:>8,}/{len(events):,}  "
            f"alerts {len(runner.result.alerts):3d}",
            force=force,
        )

    last = await drive(runner, preds, labels, step=5.0 * tick_s, on_step=on_step)
    await runner.finish(last + 3600.0)
    on_step(last, len(events), force=True)
    prog.close()
    timeline = format_timeline(result=runner.result, t0=t0)
    rep = ReplayResult(runner.result, len(events), t0, 0.0, timeline)
    if report_dir is not None:
        summaries = summaries_from_bus(runner.bus.logs[runner.topics.summaries])
        sections = []
        seen: set[str] = set()
        for a in sorted(runner.result.alerts, key=lambda a: a["detected_at"]):
            if a["model_id"] in seen:
                continue
            seen.add(a["model_id"])
            det = config.models[a["model_id"]].detectors
            w = a["window"]
            sections.append(
                Section(
                    f"{a['model_id']}-{a['detector']}",
                    f"{a['model_id']}: first alert — {a['kind']} / {a['detector']} on {_where(a)}",
                    str(a["message"]),
                    [
                        ("detected at", f"t={a['detected_at'] - t0:.1f} s (ts {a['detected_at']})"),
                        ("statistic vs threshold", f"{a['statistic']:.4g} vs {a['threshold']:.4g}"),
                        ("runbook", str(a["runbook"])),
                    ],
                    stat_plot(
                        a,
                        runner.result.alerts,
                        runner.result.findings,
                        tracer,
                        t0=t0,
                        psi_levels=(det.psi_warn, det.psi_critical),
                    ),
                    dist_plot(
                        a,
                        summaries,
                        profiles.get(a["model_id"]),
                        t0=t0,
                        current=(float(w["start"]), float(a["detected_at"]) + 30.0 * tick_s),
                        before=(t0, float(w["start"])),
                    ),
                )
            )
        rep.report = write_report(
            report_dir,
            "driftline replay",
            sections,
            intro=(
                f"{len(events):,} events from {', '.join(str(x) for x in logs)} replayed with "
                f"{config.source} (config {config.config_hash}); t = seconds after the first event."
            ),
            timeline=timeline,
        )
    rep.seconds = time.perf_counter() - t_wall
    if out is not None:
        print(timeline, file=out)
        print(
            f"\n{len(events):,} events, {runner.result.summaries} summaries, "
            f"{len(runner.result.alerts)} alerts, {len(runner.result.commands)} kill-switch "
            f"commands, {runner.result.deadletters} dead letters in {rep.seconds:.1f} s",
            file=out,
        )
        if rep.report is not None:
            print(f"report: {rep.report}", file=out)
    return rep


def run_replay(config: MonitorConfig, logs: Sequence[str | Path], **kw: Any) -> ReplayResult:
    """Synchronous :func:`run_replay_async`."""
    return asyncio.run(run_replay_async(config, logs, **kw))


# --------------------------------------------------------------------------- Kafka mode

WORKER_API: Final = ("Worker", "WorkerOptions", "manual_request", "kafka_client_kwargs")
"""What ``driftline demo --kafka`` needs from :mod:`stream.worker`."""


def worker_module() -> Any:
    """:mod:`stream.worker`, or :class:`DemoUnavailable` naming what is missing."""
    import importlib

    try:
        mod = importlib.import_module("stream.worker")
    except Exception as err:  # ImportError, or the module failing at import time
        raise DemoUnavailable(
            f"not available: needs stream.worker ({type(err).__name__}: {err})"
        ) from None
    missing = [n for n in WORKER_API if not hasattr(mod, n)]
    if missing:
        raise DemoUnavailable(
            f"not available: needs stream.worker with {', '.join(missing)} "
            f"(required: {', '.join(WORKER_API)})"
        )
    return mod


def _replay_stage2(
    cfg: MonitorConfig,
    profiles: Mapping[str, Profile | None],
    summaries_by_partition: Mapping[int, Sequence[tuple[int, bytes]]],
    tracer: SeqTracer,
    findings: list[tuple[str, Any]],
) -> None:
    """Re-run the pure stage 2 over the summaries the worker published (same order, same
    engine) to get the per-evaluation statistics for the report."""
    from stream.engine import Detect, compile_plans

    plans = compile_plans(cfg, profiles)
    for p, recs in summaries_by_partition.items():
        det = Detect(cfg, plans, p)
        for off, value in recs:
            if not value.startswith(b'{"summary_id"'):
                continue  # manual kill-switch requests share the topic
            out = det.process_raw([(off, value)])
            findings.extend(out.findings)
            tracer(det, out)


async def run_demo_kafka_async(
    bootstrap: str,
    redis_url: str,
    *,
    scale: float = 1.0,
    seed: int = 11,
    report_dir: str | Path | None = DEFAULT_REPORT_DIR,
    speed: float = 30.0,
    timeout_s: float = 120.0,
    partitions: int = 2,
    out: TextIO | None = None,
    progress: TextIO | None = None,
    tty: bool | None = None,
) -> DemoResult:
    """The scenario through the real service: a :class:`stream.worker.Worker` (both stages,
    Redis state) started in-process on fresh topics ``driftline-demo-<run>.*``; events are
    produced to Kafka at ``speed`` event-time seconds per wall second; alerts and commands
    are read back from the alerts and control topics."""
    import dataclasses
    import uuid

    import orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from stream.config import TOPIC_DEFAULTS, ServiceSettings, Topics

    w = worker_module()
    t_wall = time.perf_counter()
    run = uuid.uuid4().hex[:8]
    topics = Topics(**{k: f"driftline-demo-{run}.{k}" for k in TOPIC_DEFAULTS})
    settings = dataclasses.replace(
        ServiceSettings.from_env(),
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        topics=topics,
        web_bind="",
        allowed_lateness_s=2.0,
        batch_within_s=0.05,
    )
    kw = w.kafka_client_kwargs(settings)
    admin = AIOKafkaAdminClient(**kw)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in dataclasses.astuple(topics)])
    finally:
        await admin.close()
    cfg, profiles = stories_config()
    preds, labels = generate_stories(scale=scale, seed=seed)
    total = len(preds) + len(labels)
    opts = w.WorkerOptions(group_prefix=f"driftline-demo-{run}", redis_prefix=f"dldemo{run}")
    worker = w.Worker(cfg, settings, opts, profiles=profiles)
    consumer = AIOKafkaConsumer(
        topics.alerts,
        topics.control,
        topics.summaries,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        **kw,
    )
    producer = AIOKafkaProducer(acks="all", linger_ms=20, **kw)
    alerts: dict[str, dict[str, Any]] = {}
    commands: dict[str, dict[str, Any]] = {}
    summaries: dict[int, list[tuple[int, bytes]]] = {}
    prog = Progress(progress, "demo --kafka", tty=tty, every_s=60.0)
    result = RunResult()

    async def collect() -> None:
        async for rec in consumer:
            if rec.topic == topics.summaries:
                summaries.setdefault(rec.partition, []).append((rec.offset, rec.value or b""))
                continue
            doc = orjson.loads(rec.value or b"{}")
            if rec.topic == topics.alerts:
                alerts.setdefault(doc["alert_id"], doc)
            else:
                commands.setdefault(doc["command_id"], doc)

    await worker.start()
    collector: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(worker.wait_assigned(), 60.0)
        await consumer.start()
        await producer.start()
        collector = asyncio.create_task(collect())
        t_start = time.perf_counter()
        events = sorted(
            [(float(e["ts"]), topics.predictions, e) for e in preds]
            + [(float(e["ts"]), topics.labels, e) for e in labels],
            key=lambda x: x[0],
        )
        pending: list[Any] = []
        for k, (ts, topic, ev) in enumerate(events):
            due = t_start + (ts - START) / speed
            if due > time.perf_counter() + 0.01:
                await asyncio.gather(*pending)
                pending.clear()
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            pending.append(
                await producer.send(topic, orjson.dumps(ev), key=str(ev["request_id"]).encode())
            )
            if k % 2000 == 0:
                prog.update(
                    ts - START,
                    f"t={ts - START:5.0f}/{STORIES_END:.0f} s  produced {k:>7,}/{total:,}  "
                    f"alerts {len(alerts):3d}",
                )
        await asyncio.gather(*pending)
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            result.alerts = sorted(alerts.values(), key=lambda a: a["detected_at"])
            if all(sr.caught for sr in evaluate(result, preds, labels)):
                break
            prog.update(STORIES_END, f"waiting for alerts: {len(alerts)} so far", force=True)
            await asyncio.sleep(1.0)
        release = None
        for st in STORIES:
            if st.killswitch is None:
                continue
            await producer.send_and_wait(
                topics.summaries,
                w.manual_request(
                    st.model,
                    "release",
                    reason="demo: operator release",
                    issued_at=START + STORIES_END + 10.0,
                ),
                key=st.model.encode(),
            )
            end = time.perf_counter() + 30.0
            while time.perf_counter() < end and release is None:
                release = next(
                    (
                        c
                        for c in commands.values()
                        if c["model_id"] == st.model and c["action"] == "release"
                    ),
                    None,
                )
                await asyncio.sleep(0.2)
        prog.update(
            STORIES_END, f"done: {len(alerts)} alerts, {len(commands)} commands", force=True
        )
        prog.close()
    finally:
        if collector is not None:
            collector.cancel()
        await producer.stop()
        await consumer.stop()
        await worker.stop()
    engine_s = time.perf_counter() - t_wall
    result.alerts = sorted(alerts.values(), key=lambda a: a["detected_at"])
    result.commands = sorted(commands.values(), key=lambda c: c["issued_at"])
    result.summaries = sum(len(v) for v in summaries.values())
    res = DemoResult(result, evaluate(result, preds, labels), release, 0.0, engine_s, total)
    res.extra["topics"] = dataclasses.asdict(topics)
    res.timeline = format_timeline(res)
    if report_dir is not None:
        tracer = SeqTracer()
        _replay_stage2(cfg, profiles, summaries, tracer, result.findings)
        docs = [
            orjson.loads(v)
            for recs in summaries.values()
            for _, v in recs
            if v.startswith(b'{"summary_id"')
        ]
        sections = _demo_sections(res, cfg, docs, tracer, profiles)
        res.report = write_report(
            report_dir,
            "driftline demo (Kafka + Redis): four incidents from the field",
            sections,
            intro=f"Run {run} through the worker on {bootstrap}, state in {redis_url}.",
            timeline=res.timeline,
        )
    res.seconds = time.perf_counter() - t_wall
    if out is not None:
        print(res.timeline, file=out)
        print(format_verdict(res), file=out)
    return res


def run_demo_kafka(bootstrap: str, redis_url: str, **kw: Any) -> DemoResult:
    """Synchronous :func:`run_demo_kafka_async`."""
    return asyncio.run(run_demo_kafka_async(bootstrap, redis_url, **kw))
