"""HTML + PNG reports of an embedded run (``driftline demo`` / ``driftline replay --report``).

For each *section* (an incident of the demo, or the first alert of a model in a replay) the
report draws two plots with matplotlib (Agg backend, no display needed):

* the drift statistic of the alerting signal over event time, with its threshold(s), the
  alert markers and (demo) the moment the change was injected;
* the reference distribution of the drifted feature / signal (from the reference profile,
  or the previous version / the period before the change) next to the current one (from
  the tick summaries after the change).

``index.html`` embeds every PNG (``data:`` URIs, so the page is self-contained) and links
the PNG files written next to it.

Where the numbers come from (nothing is recomputed by a second implementation):

* windowed signals (PSI, data quality, cost, latency, calibration) — the stage-2
  evaluations (:class:`stream.policy.Finding`) the engine made, kept by the runner;
* sequential detectors (CUSUM, Bernoulli CUSUM) report only when they fire, so their
  running statistic is sampled from the detector state after every stage-2 batch
  (:class:`SeqTracer`, installed as ``EmbeddedRunner(on_detect=...)``);
* distributions — the tick summaries stage 1 published (the same counts stage 2 used).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from stream.detect import Detect, DetectOutput
from stream.policy import Finding
from stream.profile import CategoricalRef, NumericRef, Profile

SEQUENTIAL: Final = frozenset({"cusum", "bernoulli_cusum"})
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- data


@dataclass
class Line:
    """A plotted series (``style``: line | step | dashed | points)."""

    label: str
    x: list[float]
    y: list[float]
    style: str = "line"


@dataclass
class StatPlot:
    title: str
    ylabel: str
    series: list[Line]
    thresholds: list[Line]
    alerts: list[tuple[float, float, str]]  # (x, y, label)
    change_at: float | None = None
    log_y: bool = False


@dataclass
class DistPlot:
    title: str
    xlabel: str
    categories: list[str]
    reference: list[float]
    current: list[float]
    reference_label: str = "reference"
    current_label: str = "current"
    ylabel: str = "share of events"
    note: str = ""


@dataclass
class Section:
    """One incident / alert group of the report."""

    slug: str
    title: str
    text: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    stat: StatPlot | None = None
    dist: DistPlot | None = None


# --------------------------------------------------------------------------- traces


class SeqTracer:
    """Samples every sequential detector's running statistic after each stage-2 batch.

    Use as ``EmbeddedRunner(..., on_detect=tracer)``. ``series[(model, version, key)]`` is a
    list of ``(event time, statistic, threshold)``; ``key`` is the stage-2 detector key
    (``concept:<slice>``, ``cusum:<feature>``, ``flag:<signal>@<prompt>``, ``label_rate``).
    """

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}

    def __call__(self, det: Detect, out: DetectOutput) -> None:
        for model_id, mon in det.models.items():
            now = (int(mon.newest_tick or 0) + 1) * mon.tick_s
            levels = [*mon.versions.items(), ("*", mon.model_level)]
            for version, vm in levels:
                for key, d in vm.seq_dets.items():
                    up, down = d.statistic
                    pts = self.series.setdefault((model_id, version, key), [])
                    stat = float(max(up, down))
                    if pts and pts[-1][0] == now:
                        pts[-1] = (now, stat, float(d.threshold))
                    else:
                        pts.append((now, stat, float(d.threshold)))


def seq_key(alert: Mapping[str, Any]) -> tuple[str, str] | None:
    """(version, stage-2 detector key) of a sequential alert's signal, else None."""
    det, kind = alert["detector"], alert["kind"]
    version = str(alert["model_version"])
    feature, sl = alert.get("feature"), alert.get("slice")
    pv = sl.split("=", 1)[1] if sl and sl.startswith("prompt_version=") else None
    if det == "bernoulli_cusum":
        if kind == "concept_drift":
            return version, f"concept:{sl or '*'}"
        if kind == "label_drift":
            return "*", "label_rate"
        if feature and pv is not None:
            return version, f"flag:{feature}@{pv}"
        return None
    if det == "cusum":
        if feature is None:
            return version, "cusum:@score"
        if pv is not None:
            return version, f"cusum:{feature}@{pv}"
        return version, f"cusum:{feature}"
    return None


def signal_id(alert: Mapping[str, Any]) -> tuple[str, str, str, str | None, str | None]:
    return (
        str(alert["model_id"]),
        str(alert["model_version"]),
        str(alert["detector"]),
        alert.get("feature"),
        alert.get("slice"),
    )


# --------------------------------------------------------------------------- building


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.3g}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.0f}"


def _bin_labels(edges: Sequence[float]) -> list[str]:
    if not edges:
        return ["all"]
    out = [f"<{_fmt(edges[0])}"]
    out += [f"{_fmt(a)}–{_fmt(b)}" for a, b in itertools.pairwise(edges)]
    out.append(f"≥{_fmt(edges[-1])}")
    return out


def stat_plot(
    alert: Mapping[str, Any],
    alerts: Sequence[Mapping[str, Any]],
    findings: Sequence[tuple[str, Finding]],
    tracer: SeqTracer | None,
    *,
    t0: float,
    change_at: float | None = None,
    psi_levels: tuple[float, float] | None = None,
) -> StatPlot | None:
    """The statistic of ``alert``'s signal over time (x = seconds after ``t0``)."""
    sig = signal_id(alert)
    model, _version, det, feature, sl = sig
    where = " ".join(x for x in (feature, sl) if x) or "model"
    title = f"{model} {alert['model_version']} · {det} · {where}"
    xs: list[float] = []
    ys: list[float] = []
    th: list[float] = []
    if det in SEQUENTIAL:
        key = seq_key(alert)
        if tracer is None or key is None:
            return None
        pts = tracer.series.get((model, key[0], key[1]), [])
        for x, y, h in pts:
            xs.append(x - t0)
            ys.append(y)
            th.append(h)
        ylabel = (
            "CUSUM statistic (log-likelihood ratio)"
            if det == "bernoulli_cusum"
            else ("CUSUM statistic (σ units)")
        )
    else:
        for m, f in findings:
            if m != model or (f.version, f.detector, f.feature, f.slice) != sig[1:]:
                continue
            xs.append(f.window_end - t0)
            ys.append(float(f.statistic))
            th.append(float(f.threshold))
        ylabel = {
            "psi": "PSI over the window",
            "cost_per_1k": "USD per 1k requests (window)",
            "calibration": "calibration gap",
        }.get(det, "violation rate, Wilson lower bound" if det.startswith("quality.") else det)
    if not xs:
        return None
    series = [Line(sl if sl else f"{model} {alert['model_version']}", xs, ys, "line")]
    if sl and sl.startswith("prompt_version=") and tracer is not None and det in SEQUENTIAL:
        # the same signal on the other prompt versions, for context
        key = seq_key(alert)
        assert key is not None
        stem = key[1].rsplit("@", 1)[0] + "@"
        for (m, v, k), pts in sorted(tracer.series.items()):
            if m == model and v == key[0] and k.startswith(stem) and k != key[1] and pts:
                series.append(
                    Line(
                        f"prompt_version={k[len(stem) :]}",
                        [p[0] - t0 for p in pts],
                        [p[1] for p in pts],
                        "context",
                    )
                )
    elif det not in SEQUENTIAL:
        # the same signal on the model's other versions (and other prompt versions)
        prompt = bool(sl and sl.startswith("prompt_version="))
        ctx: dict[tuple[str, str | None], tuple[list[float], list[float]]] = {}
        for m, f in findings:
            if m != model or (f.detector, f.feature) != (det, feature):
                continue
            if (f.version, f.slice) == (sig[1], sl):
                continue
            same_slice = f.slice == sl
            other_prompt = prompt and bool(f.slice and f.slice.startswith("prompt_version="))
            if same_slice or other_prompt:
                xy = ctx.setdefault((f.version, f.slice), ([], []))
                xy[0].append(f.window_end - t0)
                xy[1].append(float(f.statistic))
        for (v, s_), (cx, cy) in sorted(ctx.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            name = s_ if prompt and s_ else f"{model} {v}"
            series.append(Line(name, cx, cy, "context"))
    marks = [
        (float(a["detected_at"]) - t0, float(a["statistic"]), str(a["severity"]))
        for a in alerts
        if signal_id(a) == sig
    ]
    thresholds = [Line("budget" if det == "cost_per_1k" else "threshold", xs, th, "step")]
    if det == "psi" and psi_levels is not None:
        # PSI thresholds are sample-size aware: the effective one is max(nominal, noise floor)
        thresholds = [
            Line("warn", [xs[0], xs[-1]], [psi_levels[0]] * 2, "dashed"),
            Line("critical", [xs[0], xs[-1]], [psi_levels[1]] * 2, "dashed"),
        ]
        if any(t > psi_levels[1] * 1.001 for t in th):
            thresholds.append(Line("effective threshold", xs, th, "points"))
    if det == "cost_per_1k":
        thresholds.append(Line("critical (2× budget)", [xs[0], xs[-1]], [2 * th[0]] * 2, "dashed"))
    finite = [y for y in ys if math.isfinite(y)]
    log_y = bool(finite) and max(finite) > 50 * max(min(th), 1e-9) and min(finite) > 0
    return StatPlot(
        title,
        ylabel,
        series,
        thresholds,
        marks,
        None if change_at is None else change_at - t0,
        log_y=log_y,
    )


def _sum_counts(docs: Iterable[Mapping[str, Any]]) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    total: np.ndarray[Any, np.dtype[np.float64]] | None = None
    for d in docs:
        c = np.asarray(d["counts"], np.float64)
        total = c if total is None else total + c
    return total


def _groups(
    summaries: Sequence[Mapping[str, Any]],
    model: str,
    t_range: tuple[float, float],
    version: str | None = None,
    slice_key: str = "*",
) -> list[Mapping[str, Any]]:
    lo, hi = t_range
    out = []
    for s in summaries:
        if s["model_id"] != model:
            continue
        t = s["tick"] * s["tick_s"]
        if not lo <= t < hi:
            continue
        for g in s["groups"]:
            if g["slice"] == slice_key and (version is None or g["version"] == version):
                out.append(g)
    return out


def _shares(v: np.ndarray[Any, np.dtype[np.float64]] | None) -> list[float]:
    if v is None or v.sum() <= 0:
        return []
    return [float(x) for x in v / v.sum()]


def dist_plot(
    alert: Mapping[str, Any],
    summaries: Sequence[Mapping[str, Any]],
    profile: Profile | None,
    *,
    t0: float,
    current: tuple[float, float],
    before: tuple[float, float] | None = None,
) -> DistPlot | None:
    """Reference vs current distribution of the alert's feature / signal."""
    model, version = str(alert["model_id"]), str(alert["model_version"])
    _det, kind, feature, sl = (
        alert["detector"],
        alert["kind"],
        alert.get("feature"),
        alert.get("slice"),
    )
    span = f"t={current[0] - t0:.0f}–{current[1] - t0:.0f} s"
    pv = sl.split("=", 1)[1] if sl and sl.startswith("prompt_version=") else None
    if kind == "cost":
        versions: dict[str, list[float]] = {}
        for s in summaries:
            if s["model_id"] != model:
                continue
            for g in s["groups"]:
                if g["slice"] == "*" and "cost" in g:
                    acc = versions.setdefault(g["version"], [0.0, 0.0])
                    acc[0] += g["cost"]["n"]
                    acc[1] += g["cost"]["sum"]
        vs = sorted(v for v in versions if versions[v][0])
        per_1k = [1000 * versions[v][1] / versions[v][0] for v in vs]
        return DistPlot(
            f"{model}: cost per 1k requests by version",
            "model version",
            vs,
            [p if v != version else 0.0 for v, p in zip(vs, per_1k, strict=True)],
            [p if v == version else 0.0 for v, p in zip(vs, per_1k, strict=True)],
            "previous versions",
            f"{version} (alerting)",
            ylabel="USD per 1k requests (whole run)",
            note=f"budget ${float(alert['threshold']):g} per 1k",
        )
    if kind == "concept_drift":
        key = sl or "*"
        rates: list[float] = []
        cats: list[str] = []
        if profile is not None and profile.error_rate is not None:
            cats.append("static test set\n(reference profile)")
            rates.append(profile.error_rate)
        for label, rng in (("before the change", before), ("after the change", current)):
            if rng is None:
                continue
            gs = _groups(summaries, model, rng, version, key)
            n = sum(g["joined"]["n"] for g in gs)
            e = sum(g["joined"]["errors"] for g in gs)
            if n:
                cats.append(f"live {key}\n{label}")
                rates.append(e / n)
        return DistPlot(
            f"{model} {version} {key}: error rate on joined labels",
            "",
            cats,
            [r if "after" not in c else 0.0 for c, r in zip(cats, rates, strict=True)],
            [r if "after" in c else 0.0 for c, r in zip(cats, rates, strict=True)],
            "reference / before",
            "after the change",
            ylabel="error rate (prediction ≠ label)",
        )
    if feature is None and kind == "prediction_drift" and profile is not None and profile.score:
        gs = _groups(summaries, model, current, version)
        cur = _sum_counts(g["score"] for g in gs)
        return _numeric_dist(f"{model} {version}: score", profile.score, cur, span)
    if feature is None or profile is None:
        return None
    if pv is not None:
        gs = _groups(summaries, model, current, version)
        docs = [
            g["llm"]["prompts"][pv]["signals"][feature]
            for g in gs
            if pv in g.get("llm", {}).get("prompts", {})
        ]
        ref = profile.numeric.get(feature)
        if ref is None or not docs:
            return None
        if feature.startswith("llm.flags."):
            n = sum(d["n"] for d in docs)
            rate = sum(d["sum"] for d in docs) / n if n else 0.0
            return DistPlot(
                f"{model} {version}: {feature} rate",
                "",
                ["reference profile", f"{sl}"],
                [ref.mean, 0.0],
                [0.0, rate],
                "reference",
                f"{sl} ({span})",
                ylabel="share of answers flagged",
            )
        return _numeric_dist(f"{model} {version} {sl}: {feature}", ref, _sum_counts(docs), span)
    gs = [g for g in _groups(summaries, model, current, version) if "features" in g]
    docs = [g["features"][feature] for g in gs if feature in g["features"]]
    if not docs:
        return None
    if feature in profile.numeric:
        ref_n = profile.numeric[feature]
        d = _numeric_dist(f"{model} {version}: {feature}", ref_n, _sum_counts(docs), span)
        mx = max((x["max"] for x in docs if x["max"] is not None), default=None)
        if d is not None and mx is not None:
            d.note = f"reference max {_fmt(ref_n.max)}, current max {_fmt(mx)}"
        return d
    if feature in profile.categorical:
        return _cat_dist(f"{model} {version}: {feature}", profile.categorical[feature], docs, span)
    return None


def _numeric_dist(
    title: str,
    ref: NumericRef,
    cur: np.ndarray[Any, np.dtype[np.float64]] | None,
    span: str,
) -> DistPlot | None:
    if cur is None or cur.sum() <= 0:
        return None
    return DistPlot(
        title,
        "reference-quantile bins",
        _bin_labels(ref.edges),
        list(ref.proportions),
        _shares(cur),
        "reference profile",
        f"current ({span})",
    )


def _cat_dist(
    title: str, ref: CategoricalRef, docs: Sequence[Mapping[str, Any]], span: str
) -> DistPlot | None:
    cur = _sum_counts(docs)
    if cur is None or cur.sum() <= 0:
        return None
    return DistPlot(
        title,
        "category",
        [*ref.categories, "other"],
        list(ref.proportions),
        _shares(cur),
        "reference profile",
        f"current ({span})",
    )


def summaries_from_bus(logs: Iterable[Iterable[Any]]) -> list[dict[str, Any]]:
    """Decoded summaries from bus partitions (records with a ``value``), duplicates dropped."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for part in logs:
        for rec in part:
            doc = orjson.loads(rec.value)
            if doc.get("summary_id") in seen or "groups" not in doc:
                continue
            seen.add(doc["summary_id"])
            out.append(doc)
    return out


# --------------------------------------------------------------------------- rendering


def _slugify(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "section"


def render_stat(p: StatPlot) -> bytes:
    """PNG bytes of a statistic-over-time plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 3.6), dpi=100)
    try:
        for s in p.series:
            if s.style == "context":
                ax.plot(s.x, s.y, color="#9aa5b1", lw=1.2, label=s.label)
            else:
                ax.plot(s.x, s.y, color="#1f5fa8", lw=1.6, label=s.label)
        colors = ["#d98c00", "#c0392b", "#7f8c8d"]
        for i, t in enumerate(p.thresholds):
            c = colors[i % len(colors)]
            if t.style == "dashed":
                ax.plot(t.x, t.y, ls="--", color=c, lw=1.2, label=t.label)
            elif t.style == "points":
                ax.plot(t.x, t.y, ls="none", marker=".", ms=2.5, color="#7f8c8d", label=t.label)
            else:
                ax.step(t.x, t.y, where="post", ls="--", color=c, lw=1.2, label=t.label)
        if p.change_at is not None:
            ax.axvline(p.change_at, color="#555555", ls=":", lw=1.5, label="change injected")
        labelled: set[str] = set()
        for x, y, sev in p.alerts:
            ax.plot(
                [x],
                [y],
                marker="v",
                ms=10,
                ls="none",
                color="#c0392b" if sev == "critical" else "#d98c00",
                label=f"alert ({sev})" if sev not in labelled else None,
            )
            labelled.add(sev)
        if p.log_y:
            ax.set_yscale("symlog", linthresh=max(min(t.y[0] for t in p.thresholds) / 2, 1e-3))
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel("event time (s after start)")
        ax.set_ylabel(p.ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def render_dist(p: DistPlot) -> bytes:
    """PNG bytes of a reference-vs-current bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=100)
    try:
        k = len(p.categories)
        x = np.arange(k, dtype=np.float64)
        w = 0.4
        ref = (p.reference + [0.0] * k)[:k]
        cur = (p.current + [0.0] * k)[:k]
        ax.bar(x - w / 2, ref, w, color="#95a5a6", label=p.reference_label)
        ax.bar(x + w / 2, cur, w, color="#c0392b", label=p.current_label)
        ax.set_xticks(x)
        ax.set_xticklabels(
            p.categories, fontsize=7, rotation=30 if k > 6 else 0, ha="right" if k > 6 else "center"
        )
        ax.set_title(p.title, fontsize=10)
        ax.set_ylabel(p.ylabel, fontsize=9)
        if p.xlabel:
            ax.set_xlabel(p.xlabel, fontsize=9)
        if p.note:
            ax.text(0.99, 0.97, p.note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


_CSS: Final = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;font-size:.9em;margin:.6em 0}td,th{border:1px solid
#ddd;padding:.25em .6em;text-align:left}th{background:#f5f5f5}img{max-width:100%;display:block;
margin:.5em 0;border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;
font-size:.8em}.muted{color:#777;font-size:.85em}
"""


def write_report(
    directory: str | Path,
    title: str,
    sections: Sequence[Section],
    *,
    intro: str = "",
    summary_rows: Sequence[Sequence[str]] = (),
    summary_header: Sequence[str] = (),
    timeline: str = "",
) -> Path:
    """Write ``index.html`` and one PNG per plot into ``directory``; return the index path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if summary_rows:
        parts.append("<table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in summary_header]
        parts.append("</tr>")
        for row in summary_rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    used: set[str] = set()
    for sec in sections:
        slug = _slugify(sec.slug)
        while slug in used:
            slug += "-x"
        used.add(slug)
        parts.append(f"<h2 id='{slug}'>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        if sec.facts:
            parts.append("<table>")
            for k, v in sec.facts:
                parts.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>")
            parts.append("</table>")
        for suffix, png in (
            ("statistic", render_stat(sec.stat) if sec.stat is not None else None),
            ("distribution", render_dist(sec.dist) if sec.dist is not None else None),
        ):
            if png is None:
                continue
            name = f"{slug}-{suffix}.png"
            (out / name).write_bytes(png)
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<img src='data:image/png;base64,{b64}' alt='{html.escape(name)}' "
                f"data-file='{html.escape(name)}'>"
                f"<div class='muted'><a href='{html.escape(name)}'>{html.escape(name)}</a></div>"
            )
    if timeline:
        parts.append("<h2>Timeline</h2><pre>" + html.escape(timeline) + "</pre>")
    parts.append("</body></html>\n")
    index = out / "index.html"
    index.write_text("".join(parts), encoding="utf-8")
    return index
