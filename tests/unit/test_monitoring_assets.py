"""k8s/monitoring: the Grafana dashboard and the alert rules only use metrics that
stream/metrics.py defines, their PromQL is well formed, and every alert is unit-tested.

Full PromQL parsing is promtool's job (tests/integration/test_prometheus_rules.py); here a
small lexer checks bracket balance and pulls the metric names out of each expression.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.metrics import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "driftline-rules.yaml"
RULE_TESTS = MONITORING / "tests" / "driftline-rules.test.yaml"

GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$model": "m", "$version": "v"}
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
EXTERNAL = frozenset({"up"})  # Prometheus' own scrape health series


def defined_series() -> frozenset[str]:
    out = set(EXTERNAL)
    for name, (typ, _, _) in FAMILIES.items():
        out.update(name + s for s in SUFFIXES[typ])
    return frozenset(out)


def substitute(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts."""
    for var, val in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, val)
    return expr


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def check_brackets(expr: str) -> None:
    body = _STRING.sub('""', expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in body:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack[-1] == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
            stack.pop()
    assert not stack, f"unclosed {stack} in {expr!r}"


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression."""
    body = _STRING.sub('""', substitute(expr))
    body = re.sub(r"\{[^{}]*\}", " ", body)  # label matchers
    body = re.sub(r"\[[^\[\]]*\]", " ", body)  # range / subquery durations
    body = _GROUPING.sub(" ", body)
    names = set()
    for m in _IDENT.finditer(body):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_name_lexer() -> None:
    e = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{x="y{z}", q=~"b|c"}[5m])))'
        " / on (instance) group_left (pod) b_total > bool 1 and c offset 5m"
    )
    assert metric_names(e) == {"a_bucket", "b_total", "c"}
    assert metric_names('topk(5, max by (feature) (x{f="$model"}))') == {"x"}
    assert metric_names("time() - max(t_seconds)") == {"t_seconds"}
    with pytest.raises(AssertionError):
        check_brackets("sum(rate(x[5m])")


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and label_values() variable."""
    doc = dashboard()
    for p in doc["panels"]:
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} {t['refId']}", t["expr"]
    for a in doc["annotations"]["list"]:
        if "expr" in a:
            yield f"annotation {a['name']!r}", a["expr"]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
            assert m, v["definition"]
            yield f"variable {v['name']}", m.group(1)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_expression_uses_defined_metrics() -> None:
    defined = defined_series()
    exprs = list(dashboard_expressions()) + [(f"rule {r['alert']}", r["expr"]) for r in rules()]
    assert len(exprs) > 30
    used: set[str] = set()
    for where, expr in exprs:
        check_brackets(expr)
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - defined
        assert not unknown, f"{where}: {sorted(unknown)} not defined in stream/metrics.py"
        used |= names
    # the dashboard and rules together look at most families
    families_used = {n for n in FAMILIES if any(u.startswith(n) for u in used)}
    assert len(families_used) >= len(FAMILIES) - 2, sorted(set(FAMILIES) - families_used)


def test_dashboard_shape() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for name in ("model", "version"):
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for want in (
        "psi",
        "score distribution",
        "requests per model version",
        "cost per 1k",
        "latency p50 / p99",
        "alerts",
        "kill switch",
        "dead letters",
        "consumer lag",
        "throughput",
        "checkpoint latency",
    ):
        assert want in titles, want
    for p in doc["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    heat = next(p for p in doc["panels"] if p["type"] == "heatmap")
    assert heat["targets"][0]["format"] == "heatmap"
    assert "driftline_prediction_score_bucket" in heat["targets"][0]["expr"]


def test_rules_have_runbooks_and_severity() -> None:
    for r in rules():
        assert r["alert"].startswith("Driftline"), r
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        ann = r["annotations"]
        for key in ("summary", "description", "runbook", "runbook_url"):
            assert ann.get(key), (r["alert"], key)
        anchor = ann["runbook_url"].split("#")[1]
        assert anchor == r["alert"].lower()
    doc = (ROOT / "docs" / "observability.md").read_text(encoding="utf-8").lower()
    for r in rules():
        assert f"### {r['alert'].lower()}" in doc, f"docs/observability.md lacks {r['alert']}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["../driftline-rules.yaml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in doc["tests"]:
        for check in t.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in rules()}
    assert fires == names
    assert names <= quiet


def test_docs_table_lists_every_family() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text(encoding="utf-8")
    for name, (typ, labels, _) in FAMILIES.items():
        shown = name + "_total" if typ == "counter" else name
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{shown}` |")), None)
        assert row is not None, f"docs/observability.md lacks {shown}"
        assert f"| {typ} |" in row
        for label in labels:
            assert label in row, (shown, label)
