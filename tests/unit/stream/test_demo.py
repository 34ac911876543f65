"""``driftline demo``: four stories caught by the intended detectors, quiet before each
change, the fraud kill switch, the report files, the CLI; and the LLM signals the
support-triage story needs (config, stage-1 summaries, stage-2 detection)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import sys
import types
from pathlib import Path
from typing import Any

import fastjsonschema
import numpy as np
import orjson
import pytest

from stream.cli import main
from stream.config import ConfigError, load_config_text
from stream.demo import DemoResult, Progress, run_demo, worker_module
from stream.detect import DETECTOR_NAMES
from stream.embedded import EmbeddedRunner
from stream.events import load_schema
from stream.profile import Profile, build_profile
from stream.report import PNG_SIGNATURE
from stream.scenario import START, STORIES, STORIES_END

ALERT_SCHEMA = fastjsonschema.compile(load_schema("alert"))
CONTROL_SCHEMA = fastjsonschema.compile(load_schema("control"))
SUMMARY_SCHEMA = fastjsonschema.compile(load_schema("summary"))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-report")


@pytest.fixture(scope="module")
def demo(report_dir: Path) -> DemoResult:
    out = io.StringIO()
    res = run_demo(out=out, report_dir=report_dir)
    res.extra["stdout"] = out.getvalue()
    return res


# --------------------------------------------------------------------------- the stories


def test_no_alert_before_any_story_changes(demo: DemoResult) -> None:
    for sr in demo.stories:
        assert sr.quiet_alerts == [], (sr.story.model, sr.quiet_alerts)
    first_change = START + min(s.at for s in STORIES)
    assert all(a["detected_at"] >= first_change for a in demo.result.alerts)


@pytest.mark.parametrize("model", [s.model for s in STORIES])
def test_story_caught_by_intended_detector_in_budget(demo: DemoResult, model: str) -> None:
    (sr,) = [s for s in demo.stories if s.story.model == model]
    assert sr.detections and len(sr.detections) == len(sr.story.expect)
    for d in sr.detections:
        ex = d.expect
        assert d.alert is not None, f"{model}: no {ex.kind}/{ex.detector} alert"
        a = d.alert
        assert a["model_id"] == model and a["model_version"] == ex.version
        assert (a["kind"], a["detector"]) == (ex.kind, ex.detector)
        assert (a.get("feature"), a.get("slice")) == (ex.feature, ex.slice)
        assert a["detected_at"] >= START + sr.story.at
        assert d.events_after is not None and 0 < d.events_after <= ex.max_events, (
            model,
            ex.detector,
            d.events_after,
        )
    assert sr.caught and sr.predictions > 0


def test_every_model_alerts_only_on_its_own_story(demo: DemoResult) -> None:
    models = {s.story.model for s in demo.stories}
    assert {a["model_id"] for a in demo.result.alerts} == models
    for sr in demo.stories:
        assert all(a["detected_at"] >= START + sr.story.at for a in sr.alerts)


def test_fraud_concept_drift_is_invisible_to_input_score_and_label_monitors(
    demo: DemoResult,
) -> None:
    """P(Y|X) changes while P(X), the scores and P(Y) stay put: only the joined labels
    (error rate, and its calibration consequence) may see it."""
    (sr,) = [s for s in demo.stories if s.story.model == "fraud"]
    kinds = {a["kind"] for a in sr.alerts}
    assert "concept_drift" in kinds
    assert kinds <= {"concept_drift", "performance"}, kinds


def test_recommender_is_caught_by_cost_only(demo: DemoResult) -> None:
    (sr,) = [s for s in demo.stories if s.story.model == "recommender"]
    assert {a["kind"] for a in sr.alerts} == {"cost"}
    (a,) = sr.alerts
    # v2 costs 30x v1's $0.08 per 1k requests: $2.40 against a $0.25 budget (critical > 2x)
    assert a["severity"] == "critical" and 2.2 < a["statistic"] < 2.6


def test_llm_story_alerts_carry_the_new_prompt_version(demo: DemoResult) -> None:
    (sr,) = [s for s in demo.stories if s.story.model == "support_triage"]
    assert sr.alerts
    for a in sr.alerts:
        assert a["slice"] == "prompt_version=triage-v8", a
        assert a["feature"].startswith("llm.")
        assert a["alert_id"].startswith(f"support_triage:v3:{a['detector']}:{a['feature']}@")


def test_fraud_kill_switch_trips_then_is_released(demo: DemoResult) -> None:
    cmds = demo.result.commands
    for c in cmds:
        CONTROL_SCHEMA(c)
    assert {c["model_id"] for c in cmds} == {"fraud"}
    (sr,) = [s for s in demo.stories if s.story.model == "fraud"]
    concept = sr.detections[0].alert
    assert concept is not None
    trips = [c for c in cmds if c["action"] != "release"]
    assert len(trips) == 1
    (trip,) = trips
    assert (trip["action"], trip["target_version"], trip["mode"]) == ("rollback", "v1", "automatic")
    assert trip["reason_alert_ids"] == [concept["alert_id"]]
    assert trip["issued_at"] == concept["detected_at"]
    assert cmds[-1] == demo.release
    assert demo.release is not None
    assert (demo.release["action"], demo.release["mode"]) == ("release", "manual")
    assert demo.release["issued_at"] > trip["issued_at"]


def test_alerts_match_the_schema_and_are_bounded(demo: DemoResult) -> None:
    for a in demo.result.alerts:
        ALERT_SCHEMA(a)
        assert a["detector"] in DETECTOR_NAMES or a["detector"].startswith("latency_p")
    assert len({a["alert_id"] for a in demo.result.alerts}) == len(demo.result.alerts)
    assert demo.result.deadletters == 0 and demo.ok


def test_timeline_output(demo: DemoResult) -> None:
    text = demo.extra["stdout"]
    lines = text.splitlines()
    changes = [i for i, line in enumerate(lines) if "▶ CHANGE" in line]
    assert len(changes) == len(STORIES)
    for sr in demo.stories:
        for d in sr.detections:
            assert d.alert is not None
            assert any(
                d.alert["detector"] in line and f"+{d.events_after} events" in line
                for line in lines
            ), d.alert["alert_id"]
    assert re.search(r"KILL-SWITCH rollback fraud -> v1 +\(automatic", text)
    assert re.search(r"KILL-SWITCH release +fraud +\(manual", text)
    assert "CAUGHT" in text and "MISSED" not in text and "LATE" not in text
    # consequential alerts are grouped: one line per signal, never one per alert
    consequential = [line for line in lines if line.lstrip().startswith("↳")]
    assert len(consequential) < len(demo.result.alerts)


# --------------------------------------------------------------------------- report


def test_report_files_are_valid_pngs_referenced_by_the_html(
    demo: DemoResult, report_dir: Path
) -> None:
    import matplotlib.image as mpimg

    index = report_dir / "index.html"
    assert demo.report == index and index.is_file()
    html = index.read_text(encoding="utf-8")
    pngs = sorted(report_dir.glob("*.png"))
    n_detections = sum(len(s.detections) for s in demo.stories)
    assert len(pngs) == 2 * n_detections  # a statistic and a distribution plot each
    found = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)' alt='([^']+)'", html)
    by_name = {name: b64 for b64, name in found}
    for png in pngs:
        raw = png.read_bytes()
        assert raw[:8] == PNG_SIGNATURE, png.name
        img = mpimg.imread(png)
        assert img.shape[0] >= 200 and img.shape[1] >= 400, (png.name, img.shape)
        assert float(np.std(img)) > 0.01, png.name  # not a blank canvas
        assert f"href='{png.name}'" in html
        assert base64.b64decode(by_name[png.name]) == raw
    for sr in demo.stories:
        assert sr.story.title.split(" ")[0] in html


def test_demo_wall_time_and_events_are_reported(demo: DemoResult) -> None:
    assert demo.events == sum(s.predictions + s.labels for s in demo.stories)
    assert demo.seconds >= demo.engine_seconds > 0
    assert f"{demo.events} events" in demo.extra["stdout"]


# --------------------------------------------------------------------------- progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_is_carriage_return_on_a_tty_and_lines_otherwise() -> None:
    for tty in (True, False):
        s = _Stream(tty)
        p = Progress(s, "demo", every_s=60.0, min_interval=0.0)
        for t in range(0, 181, 5):
            p.update(float(t), f"t={t}")
        p.close()
        out = s.getvalue()
        if tty:
            assert out.count("\r") == 37 and out.endswith("\n") and out.count("\n") == 1
        else:
            assert "\r" not in out
            assert out.splitlines() == ["demo: t=0", "demo: t=60", "demo: t=120", "demo: t=180"]


# --------------------------------------------------------------------------- CLI


def test_cli_demo_kafka_needs_both_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kafka", "localhost:9092"]) == 2
    assert "--redis is required" in capsys.readouterr().err


def test_cli_demo_kafka_without_the_worker_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "stream.worker", None)  # import raises ImportError
    rc = main(["demo", "--kafka", "localhost:9", "--redis", "redis://localhost:9/0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not available: needs stream.worker" in err


def test_worker_module_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("stream.worker")
    fake.Worker = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stream.worker", fake)
    from stream.demo import DemoUnavailable

    with pytest.raises(DemoUnavailable, match=r"needs stream\.worker with WorkerOptions"):
        worker_module()


def test_cli_dispatches_registered_service_commands() -> None:
    seen: list[Any] = []

    def register(sub: Any) -> None:
        p = sub.add_parser("hello")
        p.add_argument("--n", type=int, default=1)

        def run(args: Any) -> int:
            seen.append(args.n)
            return 7

        p.set_defaults(func=run)

    assert main(["hello", "--n", "3"], registrars=[register]) == 7
    assert seen == [3]


def test_cli_replay_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = Path(__file__).resolve().parents[3] / "examples" / "stories"
    rc = main(
        [
            "replay",
            str(ex / "predictions.jsonl.gz"),
            str(ex / "labels.jsonl.gz"),
            "--config",
            str(ex / "monitors.yaml"),
            "--report",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for model in ("search_ranking", "recommender", "support_triage", "fraud"):
        assert f"model {model}:" in out
    assert "quality.out_of_range" in out and "cost_per_1k" in out
    assert "llm.output_tokens prompt_version=triage-v8" in out
    assert "concept_drift/bernoulli_cusum  fraud v2 region=apac" in out
    assert "KILL-SWITCH rollback fraud -> v1" in out
    html = (tmp_path / "index.html").read_text(encoding="utf-8")
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) >= 6 and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in pngs)
    assert all(p.name in html for p in pngs)


# --------------------------------------------------------------------------- LLM signals

LLM_YAML = """
models:
  bot:
    task: multiclass
    label_horizon: 0
    features:
      words: {type: numeric}
      llm.output_tokens: {type: numeric, range: [0, 4096]}
      llm.flags.refusal: {type: numeric, range: [0, 1]}
    detectors: {psi_window_ticks: 20, psi_min_count: 200, cusum_arl0: 1.0e+8}
"""


def test_config_accepts_llm_signals_and_rejects_others() -> None:
    cfg = load_config_text(LLM_YAML, "t.yaml")
    assert [f.name for f in cfg.models["bot"].features][1:] == [
        "llm.output_tokens",
        "llm.flags.refusal",
    ]
    with pytest.raises(ConfigError, match=r"'llm.output' is not an LLM signal; valid values: "):
        load_config_text("models: {m: {features: {llm.output: {type: numeric}}}}", "t.yaml")
    with pytest.raises(ConfigError, match=r"llm.flags.x.type: LLM signals are numeric"):
        load_config_text("models: {m: {features: {llm.flags.x: {type: categorical}}}}", "t.yaml")


def _llm_events(
    rng: np.random.Generator, t0: float, seconds: int, rate: int, prompt: str, out_mean: float,
    refusal: float,
) -> list[dict[str, Any]]:  # fmt: skip
    n = seconds * rate
    ts = np.sort(rng.uniform(t0, t0 + seconds, n))
    out_tok = rng.gamma(6.0, out_mean / 6.0, n)
    ref = rng.random(n) < refusal
    return [
        {
            "event_id": f"{prompt}-{i}",
            "model_id": "bot",
            "model_version": "v1",
            "request_id": f"{prompt}-{i}",
            "ts": float(ts[i]),
            "features": {"words": float(rng.integers(5, 200))},
            "prediction": "billing",
            "llm": {
                "prompt_version": prompt,
                "input_tokens": 500,
                "output_tokens": int(out_tok[i]),
                "flags": {"refusal": True} if ref[i] else {},
            },
        }
        for i in range(n)
    ]


def _llm_profile() -> tuple[Any, Profile]:
    base = load_config_text(LLM_YAML, "t.yaml")
    rng = np.random.default_rng(1)
    n = 5000
    cols = {
        "words": rng.integers(5, 200, n).astype(float).tolist(),
        "llm.output_tokens": rng.gamma(6.0, 25.0, n).round().tolist(),
        # a 10 % reference flag rate keeps the Bernoulli CUSUM calibration fast (~50 ms)
        "llm.flags.refusal": (rng.random(n) < 0.1).astype(int).tolist(),
    }
    doc = build_profile(cols, base.models["bot"], progress=None)
    return base, Profile.from_dict(doc)


def test_llm_signals_are_summarised_per_prompt_version() -> None:
    from stream.summary import MAX_PROMPT_VERSIONS, GroupAcc, ModelPlan

    cfg, prof = _llm_profile()
    plan = ModelPlan.compile(cfg.models["bot"], prof)
    assert [p.name for p in plan.llm] == ["llm.output_tokens", "llm.flags.refusal"]
    assert [p.name for p in plan.numeric] == ["words"]
    rng = np.random.default_rng(2)
    evs = _llm_events(rng, 0.0, 1, 40, "a", 150, 0.5) + _llm_events(rng, 0.0, 1, 10, "b", 300, 0.0)
    runner = EmbeddedRunner(cfg, {"bot": prof}, partitions=1, max_future_s=float("inf"))
    decoded, rejects = (
        runner.ingest[0].decoders[runner.topics.predictions].decode(orjson.dumps(evs), 1e12)
    )
    assert not rejects
    acc = GroupAcc(plan, True)
    acc.add_predictions(decoded, plan)  # type: ignore[arg-type]
    doc = acc.to_doc()
    prompts = doc["llm"]["prompts"]
    assert sorted(prompts) == ["a", "b"] and prompts["a"]["n"] == 40 and prompts["b"]["n"] == 10
    a_ref = prompts["a"]["signals"]["llm.flags.refusal"]
    assert a_ref["n"] == 40 and a_ref["sum"] == sum(
        1 for e in evs[:40] if e["llm"]["flags"].get("refusal")
    )
    a_out = prompts["a"]["signals"]["llm.output_tokens"]
    assert a_out["sum"] == sum(e["llm"]["output_tokens"] for e in evs[:40])
    assert sum(a_out["counts"]) == 40 and "llm.output_tokens" not in doc["features"]
    SUMMARY_SCHEMA(
        {
            "summary_id": "p:0:1",
            "source": "p",
            "partition": 0,
            "seq": 1,
            "model_id": "bot",
            "tick": 0,
            "tick_s": 1.0,
            "late": 0,
            "labels": {"n": 0, "counts": [0], "positives": 0, "outcomes": {}},
            "groups": [{"version": "v1", "slice": "*", **doc}],
        }
    )
    assert GroupAcc.from_doc(doc, plan).to_doc() == doc
    # bounded: beyond MAX_PROMPT_VERSIONS distinct prompt versions, the rest is "other"
    many: list[Any] = []
    for k in range(MAX_PROMPT_VERSIONS + 3):
        many += _llm_events(rng, 0.0, 1, 2, f"p{k}", 100, 0.0)
    dec2, _ = runner.ingest[0].decoders[runner.topics.predictions].decode(orjson.dumps(many), 1e12)
    acc2 = GroupAcc(plan, True)
    acc2.add_predictions(dec2, plan)  # type: ignore[arg-type]
    keys = acc2.to_doc()["llm"]["prompts"]
    assert len(keys) == MAX_PROMPT_VERSIONS + 1 and keys["other"]["n"] == 6


def test_llm_prompt_change_is_detected_on_the_new_prompt_version_only() -> None:
    cfg, prof = _llm_profile()
    rng = np.random.default_rng(3)
    t0 = 1_700_000_000.0
    evs = _llm_events(rng, t0, 60, 30, "p1", 150, 0.1)
    evs += _llm_events(rng, t0 + 60, 60, 30, "p2", 300, 0.3)
    evs.sort(key=lambda e: e["ts"])

    async def run() -> EmbeddedRunner:
        r = EmbeddedRunner(cfg, {"bot": prof}, partitions=2, max_future_s=float("inf"))
        await r.start()
        t = t0
        i = 0
        while i < len(evs):
            t += 2.0
            batch = []
            while i < len(evs) and evs[i]["ts"] < t:
                batch.append(evs[i])
                i += 1
            r.produce(r.topics.predictions, batch)
            await r.drain(now=t)
        await r.finish(t + 10)
        return r

    r = asyncio.run(run())
    alerts = r.result.alerts
    assert alerts and all(a["detected_at"] >= t0 + 60 for a in alerts)
    assert {a["slice"] for a in alerts} == {"prompt_version=p2"}
    got = {(a["kind"], a["detector"], a["feature"]) for a in alerts}
    assert ("prediction_drift", "psi", "llm.output_tokens") in got
    assert ("prediction_drift", "bernoulli_cusum", "llm.flags.refusal") in got
    mon = r.detect[0].models.get("bot") or r.detect[1].models["bot"]
    assert sorted(mon.versions["v1"].prompts) == ["p1", "p2"]
    np_opt = orjson.OPT_SERIALIZE_NUMPY  # count windows save their ring arrays as they are
    state = orjson.dumps(mon.to_state(), option=np_opt)
    mon.load(orjson.loads(state))
    assert orjson.dumps(mon.to_state(), option=np_opt) == state


def test_stories_timeline_constants() -> None:
    assert all(0 < s.at < STORIES_END for s in STORIES)
    assert len({s.model for s in STORIES}) == len(STORIES) == 4
