"""stream/security.py without services: settings → client configs, ACL roles, Redis rules."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stream.config import ConfigError, ServiceSettings, Topics, redact_url
from stream.security import (
    REDIS_STORE_COMMANDS,
    AclGrant,
    driftline_acls,
    faust_app_acls,
    kafka_client_config,
    redis_acl_rules,
)

SASL = {
    "DRIFTLINE_KAFKA_BOOTSTRAP": "k1:9093,k2:9093",
    "DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "DRIFTLINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    "DRIFTLINE_KAFKA_SASL_USERNAME": "dl",
    "DRIFTLINE_KAFKA_SASL_PASSWORD": "pw",
}


def _settings(**env: str) -> ServiceSettings:
    return ServiceSettings.from_env(env)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed CA and a client cert/key signed by it (openssl)."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=driftline-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
        "-subj", "/CN=driftline")  # fmt: skip
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "client.pem", "-days", "2")  # fmt: skip
    return {k: str(Path(d) / f) for k, f in (("ca", "ca.pem"), ("cert", "client.pem"),
                                              ("key", "client.key"))}  # fmt: skip


# --------------------------------------------------------------------------- client configs


def test_plaintext_maps_to_every_client_without_security() -> None:
    s = _settings(DRIFTLINE_KAFKA_BOOTSTRAP="k:9092")
    assert kafka_client_config(s) == {
        "bootstrap.servers": "k:9092",
        "security.protocol": "PLAINTEXT",
    }
    assert kafka_client_config(s, "aiokafka") == {
        "bootstrap_servers": "k:9092",
        "security_protocol": "PLAINTEXT",
    }
    assert kafka_client_config(s, "faust") == {"broker": ["kafka://k:9092"]}
    assert kafka_client_config(s, bootstrap="other:1")["bootstrap.servers"] == "other:1"


def test_sasl_plaintext_reaches_confluent_aiokafka_and_faust() -> None:
    import faust

    s = _settings(**SASL)
    assert kafka_client_config(s, "confluent") == {
        "bootstrap.servers": "k1:9093,k2:9093",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "dl",
        "sasl.password": "pw",
    }
    assert kafka_client_config(s, "aiokafka") == {
        "bootstrap_servers": "k1:9093,k2:9093",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "dl",
        "sasl_plain_password": "pw",
    }
    f = kafka_client_config(s, "faust")
    assert f["broker"] == ["kafka://k1:9093", "kafka://k2:9093"]
    creds = f["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == ("dl", "pw", "SCRAM-SHA-256")
    assert creds.protocol.value == "SASL_PLAINTEXT" and creds.ssl_context is None


def test_faust_credentials_become_aiokafka_settings() -> None:
    """What faust hands to aiokafka equals our own aiokafka mapping (same SASL fields)."""
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    s = _settings(**SASL)
    through_faust = credentials_to_aiokafka_auth(
        kafka_client_config(s, "faust")["broker_credentials"]
    )
    direct = kafka_client_config(s, "aiokafka")
    for key in (
        "security_protocol",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
    ):
        assert through_faust[key] == direct[key], key


def test_sasl_ssl_passes_ca_and_client_certificate(tls_files: dict[str, str]) -> None:
    import faust

    s = _settings(
        **{**SASL, "DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
        DRIFTLINE_KAFKA_SSL_CAFILE=tls_files["ca"],
        DRIFTLINE_KAFKA_SSL_CERTFILE=tls_files["cert"],
        DRIFTLINE_KAFKA_SSL_KEYFILE=tls_files["key"],
    )
    conf = kafka_client_config(s)
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["ssl.ca.location"] == tls_files["ca"]
    assert conf["ssl.certificate.location"] == tls_files["cert"]
    assert conf["ssl.key.location"] == tls_files["key"]
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    kw = kafka_client_config(s, "aiokafka")
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    cas: list[Any] = ctx.get_ca_certs()
    subjects = [dict(x[0] for x in c["subject"]) for c in cas]
    assert {"commonName": "driftline-test-ca"} in subjects  # our CA, not only the system's
    creds = kafka_client_config(s, "faust")["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL" and isinstance(creds.ssl_context, ssl.SSLContext)


def test_ssl_without_sasl_uses_faust_ssl_credentials(tls_files: dict[str, str]) -> None:
    import faust

    s = _settings(
        DRIFTLINE_KAFKA_SECURITY_PROTOCOL="SSL", DRIFTLINE_KAFKA_SSL_CAFILE=tls_files["ca"]
    )
    assert "sasl.username" not in kafka_client_config(s)
    assert "sasl_mechanism" not in kafka_client_config(s, "aiokafka")
    creds = kafka_client_config(s, "faust")["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials) and creds.protocol.value == "SSL"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {**SASL, "DRIFTLINE_KAFKA_SASL_PASSWORD": ""},
            "DRIFTLINE_KAFKA_SASL_PASSWORD: required when DRIFTLINE_KAFKA_SECURITY_PROTOCOL is "
            "SASL_PLAINTEXT",
        ),
        (
            {**SASL, "DRIFTLINE_KAFKA_SASL_USERNAME": ""},
            "DRIFTLINE_KAFKA_SASL_USERNAME: required",
        ),
        (
            {"DRIFTLINE_KAFKA_SASL_USERNAME": "dl"},
            "DRIFTLINE_KAFKA_SASL_USERNAME: set, but DRIFTLINE_KAFKA_SECURITY_PROTOCOL is "
            "PLAINTEXT.*valid protocols for SASL: SASL_PLAINTEXT, SASL_SSL",
        ),
        (
            {**SASL, "DRIFTLINE_KAFKA_SSL_CAFILE": "/ca.pem"},
            "DRIFTLINE_KAFKA_SSL_CAFILE: set, but .* SASL_PLAINTEXT, which does not use TLS; "
            "valid protocols for TLS: SSL, SASL_SSL",
        ),
        (
            {
                "DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SSL",
                "DRIFTLINE_KAFKA_SSL_KEYFILE": "/k.pem",
            },
            "DRIFTLINE_KAFKA_SSL_KEYFILE: set without DRIFTLINE_KAFKA_SSL_CERTFILE",
        ),
    ],
)
def test_incomplete_or_contradictory_settings_name_the_variable(
    env: dict[str, str], message: str
) -> None:
    s = ServiceSettings.from_env(env)
    for client in ("confluent", "aiokafka", "faust"):
        with pytest.raises(ConfigError, match=message):
            kafka_client_config(s, client)


def test_unknown_client_lists_valid_values() -> None:
    with pytest.raises(ValueError, match="valid values: confluent, aiokafka, faust"):
        kafka_client_config(ServiceSettings(), "kafka-python")  # type: ignore[arg-type]


def test_password_never_in_settings_repr_or_redacted() -> None:
    s = _settings(**SASL)
    assert "pw" not in repr(s).replace("kafka_bootstrap", "")
    assert s.redacted()["sasl_password"] == "***"
    assert "'pw'" not in repr(kafka_client_config(s, "faust")["broker_credentials"])


# --------------------------------------------------------------------------- ACL roles


def _ops(grants: tuple[AclGrant, ...]) -> set[tuple[str, str, str]]:
    return {(g.resource_type, g.resource_name, g.operation) for g in grants}


def test_worker_acls_read_inputs_write_outputs_only() -> None:
    t = Topics(predictions="p", labels="l", summaries="s", alerts="a", control="c", deadletter="d")
    grants = driftline_acls("worker", "User:dl", t, group_prefix="grp")
    ops = _ops(grants)
    assert {n for k, n, o in ops if k == "topic" and o == "read"} == {"p", "l", "s"}
    assert {n for k, n, o in ops if k == "topic" and o == "write"} == {"s", "a", "c", "d"}
    assert {n for k, n, o in ops if k == "group"} == {"grp-ingest", "grp-detect"}
    assert {o for _, _, o in ops} == {"read", "write", "describe"}  # no create/alter/delete
    assert all(g.principal == "User:dl" and g.pattern_type == "literal" for g in grants)
    assert len(grants) == len(set(grants))


def test_other_roles_are_narrow() -> None:
    t = Topics()
    assert _ops(driftline_acls("producer", "User:s", t)) == {
        ("topic", t.predictions, "write"),
        ("topic", t.predictions, "describe"),
        ("topic", t.labels, "write"),
        ("topic", t.labels, "describe"),
    }
    assert _ops(driftline_acls("watcher", "User:w", t)) == {("topic", t.control, "read")}
    assert ("topic", t.control, "write") not in _ops(driftline_acls("operator", "User:o", t))
    assert _ops(faust_app_acls("User:f", "app", ["in"], ["out"])) == {
        ("topic", "in", "read"),
        ("topic", "out", "write"),
        ("topic", "out", "describe"),
        ("group", "app", "read"),
    }
    with pytest.raises(ValueError, match="valid values: worker, producer, watcher, operator"):
        driftline_acls("admin", "User:x")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"principal": "dl"}, "must look like 'User:<name>'"),
        ({"resource_type": "queue"}, "valid values: topic, group, transactional_id, cluster"),
        ({"operation": "own"}, "valid values: read, write"),
        ({"pattern_type": "glob"}, "valid values: literal, prefixed"),
        ({"resource_name": ""}, "must not be empty"),
    ],
)
def test_acl_grant_validation(kwargs: dict[str, str], message: str) -> None:
    base = {"principal": "User:a", "resource_type": "topic", "resource_name": "t",
            "operation": "read"}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        AclGrant(**{**base, **kwargs})


# --------------------------------------------------------------------------- Redis rules


def test_redis_rules_limit_keys_to_the_prefix_and_commands_to_the_store() -> None:
    rules = redis_acl_rules("dlx")
    assert rules[:4] == ("resetkeys", "~dlx:*", "resetchannels", "-@all")
    assert {r[1:] for r in rules[4:]} == set(REDIS_STORE_COMMANDS)
    assert not {"flushall", "config", "keys", "del", "@all", "acl"} & set(REDIS_STORE_COMMANDS)
    for bad in ("", "dl*", "a b"):
        with pytest.raises(ValueError, match="prefix"):
            redis_acl_rules(bad)


def test_redis_store_commands_cover_what_the_store_sends() -> None:
    """Every redis.call in RedisStore's scripts is allowed (ACLs apply inside scripts)."""
    import re

    from stream import redis_store

    called = {
        c.lower()
        for script in (redis_store._COMMIT_LUA, redis_store._ACK_LUA)
        for c in re.findall(r"redis\.call\('([A-Z]+)'", script)
    }
    assert called and called <= set(REDIS_STORE_COMMANDS)


def test_redis_reader_role_is_read_only_on_the_mirror() -> None:
    assert redis_acl_rules("p", "killswitch_reader") == (
        "resetkeys",
        "%R~p:ks:*",
        "resetchannels",
        "-@all",
        "+ping",
        "+get",
    )
    with pytest.raises(ValueError, match="valid values: store, killswitch_reader"):
        redis_acl_rules("p", "admin")


# --------------------------------------------------------------------------- secrets in logs


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://dl:p%40ss@r:6380/0", "rediss://dl:***@r:6380/0"),
        ("redis://:pw@r:6379/0", "redis://:***@r:6379/0"),
        ("redis://r:6379/0", "redis://r:6379/0"),
        ("redis://dl@r:6379/0", "redis://dl@r:6379/0"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redacted_and_repr_hide_every_secret() -> None:
    s = _settings(
        **SASL,
        DRIFTLINE_REDIS_URL="rediss://dl:RedisSecret@r:6380/0",
        DRIFTLINE_API_TOKEN="ApiSecret",
    )
    shown = str(s.redacted()) + repr(s)
    for secret in ("RedisSecret", "ApiSecret", "'pw'"):
        assert secret not in shown, secret
    assert "rediss://dl:***@r:6380/0" in shown
