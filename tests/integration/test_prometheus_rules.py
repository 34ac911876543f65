"""promtool on the monitoring assets: rules check and unit tests, dashboard PromQL parses,
and the metrics exposition passes promtool's lint.

promtool ships in Debian's prometheus package (scripts/install-system-deps.sh).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from scripts.services import ServiceError, find_promtool
from stream.config import load_config_text
from stream.engine import IngestOutput
from stream.metrics import Metrics
from stream.policy import Finding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "driftline-rules.yaml"
RULE_TESTS = MONITORING / "tests" / "driftline-rules.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$model": "m", "$version": "v"}


@pytest.fixture(scope="module")
def promtool() -> str:
    try:
        return find_promtool()
    except ServiceError as err:
        pytest.fail(f"{err}; run scripts/install-system-deps.sh")


def run(cmd: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_promtool_check_rules(promtool: str) -> None:
    res = run([promtool, "check", "rules", str(RULES)])
    assert res.returncode == 0, res.stdout + res.stderr
    n = len([r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]])
    assert f"SUCCESS: {n} rules found" in res.stdout


def test_promtool_rule_unit_tests(promtool: str) -> None:
    res = run([promtool, "test", "rules", str(RULE_TESTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_rule_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The unit tests are not vacuous: a kill-switch rule that never fires fails them."""
    broken = RULES.read_text().replace(
        "max by (model, action) (driftline_killswitch_active) == 1",
        "max by (model, action) (driftline_killswitch_active) == 2",
    )
    assert broken != RULES.read_text()
    (tmp_path / "driftline-rules.yaml").write_text(broken)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    res = run([promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name)])
    assert res.returncode != 0
    assert "DriftlineKillSwitchActive" in res.stdout + res.stderr


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
            assert m, v["definition"]
            exprs.append(m.group(1))
    out = []
    for expr in exprs:
        e = expr
        for var, val in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
            e = e.replace(var, val)
        assert "$" not in e, f"unsubstituted Grafana variable in {e!r}"
        out.append(e)
    return out


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) > 25
    rules: dict[str, Any] = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"driftline_dashboard:expr_{i}", "expr": e}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules, width=1000))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    # and a broken expression is reported (the check is not vacuous)
    rules["groups"][0]["rules"].append({"record": "bad:expr", "expr": "sum(rate(x[5m])"})
    path.write_text(yaml.safe_dump(rules, width=1000))
    assert run([promtool, "check", "rules", str(path)]).returncode != 0


def test_exposition_passes_promtool_lint(promtool: str) -> None:
    """``promtool check metrics`` lints names, units, suffixes and help texts."""
    cfg = load_config_text(
        "models: {fraud: {features: {amount: {type: numeric}}, slices: {region: {values: [eu]}}}}"
    )
    reg = CollectorRegistry()
    m = Metrics(cfg, reg)
    m.observe_ingest(IngestOutput(accepted=3, rejected=Counter({"not_json": 1})))
    m.observe_summary(
        {
            "model_id": "fraud",
            "late": 1,
            "labels": {"n": 2},
            "groups": [
                {
                    "version": "v1",
                    "slice": "*",
                    "n": 3,
                    "score": {"n": 3, "counts": [1] + [0] * 8 + [2], "sum": 2.0},
                    "latency": {"n": 1, "counts": [0] * 20 + [1] + [0] * 21, "sum": 30.0},
                    "cost": {"n": 3, "sum": 0.003},
                }
            ],
        }
    )
    m.observe_findings(
        "fraud",
        [Finding("covariate_drift", "psi", "v1", "amount", None, "warn", 0.2, 0.1, 0, 1, 500)],
    )
    m.observe_alert(
        {"model_id": "fraud", "model_version": "v1", "kind": "cost", "severity": "warn"}
    )
    m.set_consumer_lag("driftline.predictions", 0, 12)
    with m.checkpoint("ingest"), m.batch("ingest", 10):
        pass
    text = generate_latest(reg)
    res = run([promtool, "check", "metrics"], stdin=text)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr
