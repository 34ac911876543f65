"""Monitor config: the example loads; every error names file, model and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import ConfigError, ServiceSettings, load_config, load_config_text

ROOT = Path(__file__).resolve().parents[3]


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "examples" / "monitors.yaml")
    m = cfg.models["fraud"]
    assert m.feature("seller_quality_score").range == (0.0, 1.0)
    assert m.slices[0].values == ("eu", "us", "apac")
    assert m.kill_switch[0].action == "rollback" and m.kill_switch[0].target_version == "v1"
    assert m.label_horizon_s == 3600.0 and m.budgets.cost_usd_per_1k == 0.5
    assert m.reference_path is not None and m.reference_path.endswith("profile-fraud.json")
    assert len(cfg.config_hash) == 16


def test_config_hash_changes_with_content() -> None:
    a = load_config_text("models: {m: {features: {x: {type: numeric}}}}")
    b = load_config_text("models: {m: {features: {x: {type: numeric, range: [0, 1]}}}}")
    a2 = load_config_text("models:\n  m:\n    features:\n      x: {type: numeric}\n")
    assert a.config_hash != b.config_hash and a.config_hash == a2.config_hash


def test_a_json_document_is_read_as_json_and_yaml_flow_style_still_works() -> None:
    yaml_text = "models:\n  m:\n    features:\n      x: {type: numeric, range: [0, 1]}\n"
    json_text = ' \n{"models": {"m": {"features": {"x": {"type": "numeric", "range": [0, 1]}}}}}'
    flow = "{models: {m: {features: {x: {type: numeric, range: [0, 1]}}}}}  # not JSON"
    hashes = {load_config_text(t).config_hash for t in (yaml_text, json_text, flow)}
    assert len(hashes) == 1
    # JSON's number grammar, not YAML 1.1's: 1e6 is a number here (YAML reads a string)
    arl = '{"models": {"m": {"features": {"x": {"type": "numeric"}}, "detectors": '
    cfg = load_config_text(arl + '{"cusum_arl0": 1e6}}}}')
    assert cfg.models["m"].detectors.cusum_arl0 == 1e6
    with pytest.raises(ConfigError, match="cusum_arl0"):
        load_config_text(
            "models: {m: {features: {x: {type: numeric}}, detectors: {cusum_arl0: 1e6}}}"
        )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_text('{"models": ')


M = "models: {fraud: {features: {a: {type: numeric}}, "  # a valid model, more keys follow
E = "monitors.yaml: models.fraud."
KS = M + "kill_switch: [{name: k, when: "

BAD = [
    (
        "models: {fraud: {features: {amount: {type: numeric, range: [5, 1]}}}}",
        E + "features.amount.range: lo (5) must be < hi (1)",
    ),
    (
        "models: {fraud: {features: {amount: {type: numerc}}}}",
        E + "features.amount.type: 'numerc' is not valid; valid values: numeric, categorical",
    ),
    (
        "models: {fraud: {features: {amount: {type: numeric, colour: red}}}}",
        E + "features.amount.colour: unknown key; valid keys: type, required, range, categories",
    ),
    (
        "models: {fraud: {featurs: {}}}",
        E + "featurs: unknown key; valid keys: features, slices, reference",
    ),
    (
        M + "detectors: {psi_windw_ticks: 3}}}",
        E + "detectors.psi_windw_ticks: unknown key; valid keys: psi_window_ticks",
    ),
    (
        M + "detectors: {psi_warn: 0.3, psi_critical: 0.2}}}",
        E + "detectors.psi_critical: 0.2 must be > psi_warn (0.3)",
    ),
    (M + "budgets: {cost_usd_per_1k: -1}}}", E + "budgets.cost_usd_per_1k: -1 must be >= 0"),
    (M + "label_horizon: soon}}", E + "label_horizon: 'soon' is not a duration"),
    (
        KS + "{kind: drift}}]}}",
        E + "kill_switch[0].when.kind: 'drift' is not valid; valid values: covariate_drift",
    ),
    (
        KS + "{kind: cost}, action: rollback}]}}",
        E + "kill_switch[0].target_version: required when action is rollback",
    ),
    (
        KS + "{kind: cost, feature: b}, action: throttle}]}}",
        E + "kill_switch.k.when.feature: 'b' is not a feature; valid values: a",
    ),
    (
        "models: {fraud: {features: {a: {type: categorical, range: [0, 1]}}}}",
        E + "features.a.range: only numeric features have a range",
    ),
    (
        M + "slices: {region: {max_values: 1, values: [eu, us]}}}}",
        E + "slices.region.values: 2 values is more than max_values (1)",
    ),
    (
        "models: {'bad id': {features: {a: {type: numeric}}}}",
        "monitors.yaml: models.bad id: model ids are 1-64 characters",
    ),
    (M + "policy: {sustain: 0}}}", E + "policy.sustain: 0 must be >= 1"),
    ("modles: {}", "monitors.yaml: modles: unknown key; valid keys: version, models"),
    ("models: [1, 2]", "monitors.yaml: models: expected a non-empty mapping"),
    (M + "}", "monitors.yaml: not valid YAML"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_errors_name_file_model_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_text(text, source="monitors.yaml")
    assert str(err.value).startswith(expected), str(err.value)


def test_load_config_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "mon.yaml"
    p.write_text("models: {m: {features: {a: {type: numeric, range: [2, 2]}}}}")
    with pytest.raises(ConfigError, match=r"^mon.yaml: models.m.features.a.range: lo \(2\)"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_service_settings_from_env(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    s = ServiceSettings.from_env(
        {
            "DRIFTLINE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "DRIFTLINE_REDIS_URL": "redis://r:6379/1",
            "DRIFTLINE_TOPIC_ALERTS": "ml.alerts",
            "DRIFTLINE_TICK_S": "2.5",
            "DRIFTLINE_BATCH_SIZE": "500",
            "DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "DRIFTLINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "DRIFTLINE_KAFKA_SASL_PASSWORD": "hunter2",
            "DRIFTLINE_API_TOKEN_FILE": str(token_file),
            "DRIFTLINE_WEB_BIND": "10.0.0.1:8080",
        }
    )
    assert s.kafka_bootstrap == "k1:9092,k2:9092" and s.redis_url == "redis://r:6379/1"
    assert s.topics.alerts == "ml.alerts" and s.topics.predictions == "driftline.predictions"
    assert s.tick_s == 2.5 and s.batch_size == 500 and s.web_bind == "10.0.0.1:8080"
    assert s.api_token == "s3cret-token" and s.sasl_password == "hunter2"
    # secrets never appear in repr or in the loggable form
    for text in (repr(s), str(s.redacted())):
        assert "s3cret-token" not in text and "hunter2" not in text
    assert s.redacted()["api_token"] == "***"


def test_service_settings_defaults_and_errors() -> None:
    s = ServiceSettings.from_env({})
    assert s.tick_s == 1.0 and s.topics.deadletter == "driftline.deadletter" and s.api_token is None
    with pytest.raises(ConfigError, match="DRIFTLINE_TICK_S: 'fast' is not a number"):
        ServiceSettings.from_env({"DRIFTLINE_TICK_S": "fast"})
    with pytest.raises(ConfigError, match="DRIFTLINE_KAFKA_SASL_MECHANISM: required"):
        ServiceSettings.from_env({"DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    with pytest.raises(ConfigError, match="valid values: PLAINTEXT, SSL"):
        ServiceSettings.from_env({"DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "TLS"})
