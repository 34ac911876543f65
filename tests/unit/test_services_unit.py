"""scripts/services.py without Kafka, Redis or Prometheus: config rendering, ports, probes,
and the launcher's start/stop bookkeeping on stand-in processes (sh, sleep)."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from pathlib import Path

import pytest

from scripts import services
from scripts.services import (
    KafkaService,
    RedisAclUser,
    ScramClient,
    ServiceStartError,
    free_port,
    free_ports,
    kafka_cluster_id,
    make_test_certificates,
    render_kafka_properties,
    render_kafka_sasl_properties,
    render_prometheus_config,
    render_redis_acl_file,
    render_redis_args,
)

# --------------------------------------------------------------------------- ports


def test_free_ports_are_distinct_bindable_loopback_ports() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if it were taken
    assert free_port() not in ports  # never handed out twice by this process


def test_free_ports_rejects_nonpositive_count() -> None:
    with pytest.raises(ValueError, match="count must be >= 1"):
        free_ports(0)


# --------------------------------------------------------------------------- Kafka


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))


def test_kafka_properties_single_node_kraft_on_loopback(tmp_path: Path) -> None:
    props = _props(
        render_kafka_properties(data_dir=tmp_path, broker_port=19092, controller_port=19093)
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == str(tmp_path / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert props[key] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    # Every listener is on loopback.
    hosts = re.findall(r"//([^:,]+):", props["listeners"] + "," + props["advertised.listeners"])
    assert set(hosts) == {"127.0.0.1"}


def test_kafka_properties_overrides_win_and_bools_are_lowercase(tmp_path: Path) -> None:
    props = _props(
        render_kafka_properties(
            data_dir=tmp_path,
            broker_port=1,
            controller_port=2,
            overrides={"num.partitions": 6, "auto.create.topics.enable": False, "x.y": "z"},
        )
    )
    assert props["num.partitions"] == "6"
    assert props["auto.create.topics.enable"] == "false"
    assert props["x.y"] == "z"


def test_kafka_cluster_id_is_22_char_urlsafe_base64() -> None:
    ids = {kafka_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_\-]{22}", cid)
        assert not cid.startswith("-")


def test_kafka_version_comes_from_the_jar_names(tmp_path: Path) -> None:
    (tmp_path / "kafka_2.13-9.8.7.jar").touch()
    assert KafkaService(libs_dir=tmp_path).version == "9.8.7"
    with pytest.raises(services.ServiceError, match="install-system-deps"):
        _ = KafkaService(libs_dir=tmp_path / "missing").version


def test_parse_api_versions_reads_each_api_range() -> None:
    body = struct.pack(">hi", 0, 2) + struct.pack(">hhh", 3, 0, 13) + struct.pack(">hhh", 18, 0, 4)
    assert services._parse_api_versions(body) == {3: (0, 13), 18: (0, 4)}
    with pytest.raises(ConnectionError, match="error code 2"):
        services._parse_api_versions(struct.pack(">hi", 2, 0))


# --------------------------------------------------------------------------- Kafka security


def test_kafka_sasl_properties_leave_no_unauthenticated_listener(tmp_path: Path) -> None:
    overrides = render_kafka_sasl_properties(
        broker_port=19092,
        controller_port=19093,
        admin_user="admin",
        admin_password="pw",
        acls=True,
        super_users=["ops", "admin"],
    )
    props = _props(
        render_kafka_properties(
            data_dir=tmp_path, broker_port=19092, controller_port=19093, overrides=overrides
        )
    )
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    listeners = [entry.split(":")[0] for entry in props["listeners"].split(",")]
    assert listeners == ["CLIENT", "CONTROLLER"]
    assert {protocols[name] for name in listeners} == {"SASL_PLAINTEXT"}
    assert props["advertised.listeners"] == "CLIENT://127.0.0.1:19092"
    assert props["listener.name.client.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert props["listener.name.controller.sasl.enabled.mechanisms"] == "PLAIN"
    assert 'user_admin="pw"' in props["listener.name.controller.plain.sasl.jaas.config"]
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["super.users"] == "User:admin;User:ops"
    assert props["allow.everyone.if.no.acl.found"] == "false"


def test_kafka_sasl_properties_without_acls_have_no_authorizer() -> None:
    props = render_kafka_sasl_properties(
        broker_port=1,
        controller_port=2,
        admin_user="a",
        admin_password="b",
        mechanism="SCRAM-SHA-256",
    )
    assert "authorizer.class.name" not in props and "super.users" not in props
    assert "listener.name.client.scram-sha-256.sasl.jaas.config" in props
    with pytest.raises(ValueError, match="valid values: SCRAM-SHA-256, SCRAM-SHA-512"):
        render_kafka_sasl_properties(
            broker_port=1, controller_port=2, admin_user="a", admin_password="b", mechanism="PLAIN"
        )


def test_kafka_service_sasl_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="admin_user: 'admin' is not in sasl_scram_users"):
        KafkaService(libs_dir=tmp_path, sasl_scram_users={"driftline": "pw"})
    with pytest.raises(ValueError, match=r"password 'p w' is not valid"):
        KafkaService(libs_dir=tmp_path, sasl_scram_users={"admin": "p w"})
    with pytest.raises(ValueError, match="acls: needs sasl_scram_users"):
        KafkaService(libs_dir=tmp_path, acls=True)
    with pytest.raises(ValueError, match="sasl_mechanism: 'PLAIN' is not valid"):
        KafkaService(libs_dir=tmp_path, sasl_scram_users={"admin": "pw"}, sasl_mechanism="PLAIN")


def test_kafka_service_formats_scram_users_and_gives_client_configs(tmp_path: Path) -> None:
    svc = KafkaService(libs_dir=tmp_path, sasl_scram_users={"admin": "a-pw", "dl": "d-pw"})
    svc._ports = [19092, 19093]
    args = svc._format_args(tmp_path / "server.properties")
    assert args[args.index("--add-scram") + 1] == "SCRAM-SHA-512=[name=admin,password=a-pw]"
    assert "SCRAM-SHA-512=[name=dl,password=d-pw]" in args
    assert svc.security_protocol == "SASL_PLAINTEXT"
    assert svc.client_config("dl") == {
        "bootstrap.servers": "127.0.0.1:19092",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "dl",
        "sasl.password": "d-pw",
    }
    assert svc.client_config()["sasl.username"] == "admin"
    assert svc.client_config("dl", "wrong")["sasl.password"] == "wrong"
    with pytest.raises(ValueError, match="valid values: admin, dl"):
        svc.client_config("nobody")
    plain = KafkaService(libs_dir=tmp_path)
    plain._ports = [1, 2]
    assert plain.client_config() == {"bootstrap.servers": "127.0.0.1:1"}
    assert plain._format_args(tmp_path / "p").count("--add-scram") == 0


def test_kafka_sasl_properties_tls_listener(tmp_path: Path) -> None:
    props = render_kafka_sasl_properties(
        broker_port=1,
        controller_port=2,
        admin_user="admin",
        admin_password="pw",
        tls_port=3,
        tls_keystore=tmp_path / "broker.pem",
    )
    assert props["listeners"].endswith(",TLS://127.0.0.1:3")
    assert props["advertised.listeners"] == "CLIENT://127.0.0.1:1,TLS://127.0.0.1:3"
    assert props["listener.security.protocol.map"].endswith(",TLS:SASL_SSL")
    assert props["listener.name.tls.ssl.keystore.type"] == "PEM"
    assert props["listener.name.tls.ssl.keystore.location"] == str(tmp_path / "broker.pem")
    with pytest.raises(ValueError, match="tls_keystore: needed"):
        render_kafka_sasl_properties(
            broker_port=1, controller_port=2, admin_user="a", admin_password="b", tls_port=3
        )
    with pytest.raises(ValueError, match="tls: needs sasl_scram_users"):
        KafkaService(libs_dir=tmp_path, tls=True)


def test_test_certificates_verify_for_loopback_only(tmp_path: Path) -> None:
    import ssl

    files = make_test_certificates(tmp_path / "tls")
    keystore = files["keystore"].read_text()
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, as Kafka wants
    assert keystore.count("BEGIN CERTIFICATE") == 2
    assert files["keystore"].stat().st_mode & 0o077 == 0
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files["cert"], files["key"])
    client = ssl.create_default_context(cafile=str(files["ca"]))
    for host, ok in (("127.0.0.1", True), ("localhost", True), ("example.com", False)):
        a, b = socket.socketpair()
        with a, b:
            srv = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
            cli = client.wrap_socket(b, server_hostname=host, do_handshake_on_connect=False)
            srv.setblocking(False)
            cli.setblocking(False)
            error: Exception | None = None
            for _ in range(200):
                done = 0
                for side in (cli, srv):
                    try:
                        side.do_handshake()
                        done += 1
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                    except (ssl.SSLError, OSError) as exc:
                        error = exc
                if done == 2 or error is not None:
                    break
                time.sleep(0.005)
            assert (error is None) == ok, (host, error)


def test_scram_client_matches_rfc7677_test_vector() -> None:
    client = ScramClient("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert client.final(server_first) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ConnectionError, match="signature does not match"):
        client.verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(ConnectionError, match="server error 'invalid-proof'"):
        client.verify(b"e=invalid-proof")


def test_scram_client_rejects_a_server_nonce_it_did_not_start() -> None:
    client = ScramClient("SCRAM-SHA-512", "a=b,c", "pw", nonce="abc")
    assert client.first() == b"n,,n=a=3Db=2Cc,r=abc"  # RFC 5802 saslname escaping
    with pytest.raises(ConnectionError, match="bad server-first"):
        client.final(b"r=xyz123,s=c2FsdA==,i=4096")


# --------------------------------------------------------------------------- Redis ACL


def test_redis_acl_file_hashes_passwords_and_disables_default(tmp_path: Path) -> None:
    user = RedisAclUser("driftline", "s3cret", ("~dl:*", "-@all", "+get"))
    text = render_redis_acl_file([user], None)
    lines = text.splitlines()
    assert lines[0] == "user default reset off resetchannels -@all"
    digest = __import__("hashlib").sha256(b"s3cret").hexdigest()
    assert lines[1] == f"user driftline reset on #{digest} ~dl:* -@all +get"
    assert "s3cret" not in text
    with_admin = render_redis_acl_file([user], "adm").splitlines()[0]
    assert with_admin.startswith("user default reset on #") and with_admin.endswith("+@all")
    with pytest.raises(ValueError, match="must be unique"):
        render_redis_acl_file([user, user], None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "default", "password": "x"}, "other than 'default'"),
        ({"name": "a b", "password": "x"}, "is not valid"),
        ({"name": "u", "password": ""}, "non-empty password"),
        ({"name": "u", "password": "x", "rules": (">other",)}, "no passwords"),
        ({"name": "u", "password": "x", "rules": ("~a *",)}, "no spaces"),
    ],
)
def test_redis_acl_user_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisAclUser(**kwargs)  # type: ignore[arg-type]


def test_redis_service_acl_users_write_the_acl_file(tmp_path: Path) -> None:
    user = RedisAclUser("dl", "p@ss")
    svc = services.RedisService(binary="/bin/true", acl_users=[user], password="adm")
    svc._ports = [6399]
    svc._data_dir = tmp_path
    svc._prepare(fresh=True)
    acl = tmp_path / "users.acl"
    assert acl.stat().st_mode & 0o777 == 0o600
    assert acl.read_text().startswith("user default reset on #")
    cmd = svc._command()
    assert cmd[cmd.index("--aclfile") + 1] == str(acl)
    assert "--requirepass" not in cmd  # the ACL file sets the default user's password
    assert svc.url_for("dl") == "redis://dl:p%40ss@127.0.0.1:6399/0"
    assert svc.url_for(None) == "redis://127.0.0.1:6399/0"
    assert svc.url == "redis://:adm@127.0.0.1:6399/0"
    with pytest.raises(ValueError, match="valid values: dl"):
        svc.url_for("other")
    with pytest.raises(ValueError, match="give one of them"):
        services.RedisService(binary="/bin/true", acl_users=[user], acl_file=acl)


# --------------------------------------------------------------------------- Redis


def test_redis_args_durable_loopback_defaults(tmp_path: Path) -> None:
    args = render_redis_args(port=6390, data_dir=tmp_path)
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--port"] == "6390"
    assert pairs["--bind"] == "127.0.0.1"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert pairs["--save"] == ""
    assert pairs["--dir"] == str(tmp_path)
    assert "--requirepass" not in pairs


def test_redis_args_optional_security_and_memory(tmp_path: Path) -> None:
    args = render_redis_args(
        port=1,
        data_dir=tmp_path,
        maxmemory="64mb",
        password="s3cret",
        acl_file=tmp_path / "users.acl",
        extra_args=["--hz", "50"],
    )
    assert args[args.index("--maxmemory") + 1] == "64mb"
    assert args[args.index("--requirepass") + 1] == "s3cret"
    assert args[args.index("--aclfile") + 1] == str(tmp_path / "users.acl")
    assert args[-2:] == ["--hz", "50"]


def test_redis_args_reject_unknown_appendfsync(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: always, everysec, no"):
        render_redis_args(port=1, data_dir=tmp_path, appendfsync="sometimes")


def test_redis_url_quotes_credentials() -> None:
    svc = services.RedisService(binary="/bin/true", password="p@ss word", username="app")
    svc._ports = [6399]
    assert svc.url == "redis://app:p%40ss%20word@127.0.0.1:6399/0"


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_groups_targets_by_scheme_and_path(tmp_path: Path) -> None:
    rule = tmp_path / "rules.yml"
    config = json.loads(
        render_prometheus_config(
            ["127.0.0.1:8000", "127.0.0.1:8001", "http://127.0.0.1:9000/custom"],
            scrape_interval=0.5,
            rule_files=[rule],
        )
    )
    assert config["global"] == {
        "scrape_interval": "500ms",
        "scrape_timeout": "500ms",
        "evaluation_interval": "500ms",
    }
    assert config["rule_files"] == [str(rule.resolve())]
    jobs = {job["metrics_path"]: job for job in config["scrape_configs"]}
    assert jobs["/metrics"]["static_configs"] == [{"targets": ["127.0.0.1:8000", "127.0.0.1:8001"]}]
    assert jobs["/custom"]["static_configs"] == [{"targets": ["127.0.0.1:9000"]}]
    assert len({job["job_name"] for job in config["scrape_configs"]}) == 2


def test_prometheus_config_timeout_capped_at_10s() -> None:
    config = json.loads(render_prometheus_config([], scrape_interval="1m"))
    assert config["global"]["scrape_interval"] == "1m"
    assert config["global"]["scrape_timeout"] == "10000ms"
    assert config["scrape_configs"] == []


@pytest.mark.parametrize("bad", ["localhost", "ftp://h:1/x", "http://", "a b:1"])
def test_prometheus_config_rejects_bad_targets(bad: str) -> None:
    with pytest.raises(ValueError, match="use host:port or http"):
        render_prometheus_config([bad])


@pytest.mark.parametrize("bad", ["1 second", "", 0, -1.0])
def test_prometheus_config_rejects_bad_intervals(bad: str | float) -> None:
    with pytest.raises(ValueError, match="duration"):
        render_prometheus_config([], scrape_interval=bad)


# --------------------------------------------------------------------------- lifecycle


class _StandIn(services._Service):
    """A 'service' that is just a shell command; ready when ``ready_file`` exists."""

    name = "standin"

    def __init__(self, script: str, tmp_path: Path, *, timeout: float = 5.0) -> None:
        super().__init__(run_root=tmp_path / "run", startup_timeout=timeout, stop_timeout=5.0)
        self.script = script
        self.launches = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    def _port_count(self) -> int:
        return 1

    def _prepare(self, *, fresh: bool) -> None:
        self.launches += 1
        (self.data_dir / "ready").unlink(missing_ok=True)

    def _command(self) -> list[str]:
        return ["sh", "-c", self.script.format(launch=self.launches, dir=self.data_dir)]

    def _probe(self) -> bool:
        return (self.data_dir / "ready").exists()


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_start_stop_cleans_process_and_data_dir(tmp_path: Path) -> None:
    svc = _StandIn("touch {dir}/ready; exec sleep 60", tmp_path)
    with svc:
        pid = svc.pid
        data_dir = svc.data_dir
        assert pid is not None and not _gone(pid)
        assert data_dir.name.startswith(f"standin-{os.getpid()}-")
    assert _gone(pid)
    assert not data_dir.exists()


def test_early_exit_raises_with_log_tail_and_keeps_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = _StandIn("echo 'boom: bad config line 3'; exit 3", tmp_path)
    with pytest.raises(ServiceStartError, match="exited with code 3") as info:
        svc.start()
    assert "boom: bad config line 3" in str(info.value)
    assert "boom: bad config line 3" in capsys.readouterr().err
    assert svc.pid is None
    assert svc.data_dir.is_dir()  # kept for debugging
    svc.stop()
    assert svc._data_dir is None


def test_start_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    svc = _StandIn("sleep 60 & echo $! > {dir}/child; exec sleep 60", tmp_path, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="not ready after"):
        svc.start()
    assert time.monotonic() - started < 5
    child = int((svc.data_dir / "child").read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), "the background child of the service survived"
    svc.stop()


def test_port_in_use_start_is_retried_on_new_ports(tmp_path: Path) -> None:
    svc = _StandIn(
        "if [ {launch} -lt 2 ]; then echo 'bind: Address already in use'; exit 1; fi; "
        "touch {dir}/ready; exec sleep 60",
        tmp_path,
    )
    with svc:
        assert svc.launches == 2
        assert svc.running


def test_kill_then_restart_reuses_data_dir_and_ports(tmp_path: Path) -> None:
    svc = _StandIn("echo {launch} >> {dir}/launches; touch {dir}/ready; exec sleep 60", tmp_path)
    with svc:
        data_dir, ports, pid = svc.data_dir, svc.ports, svc.pid
        assert pid is not None
        svc.kill()
        assert _gone(pid) and svc.pid is None
        assert data_dir.is_dir()
        svc.restart()
        assert svc.data_dir == data_dir and svc.ports == ports
        assert (data_dir / "launches").read_text().split() == ["1", "2"]


def test_stale_run_dirs_of_dead_processes_are_reaped(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    dead = root / "redis-999999999-1"  # no such pid
    alive = root / f"redis-{os.getpid()}-77"
    other = root / "notes"
    for path in (dead, alive, other):
        path.mkdir()
    services._reap_stale_run_dirs(root)
    assert not dead.exists()
    assert alive.exists() and other.exists()


def test_redis_service_tls_has_no_plaintext_port_and_rediss_urls(tmp_path: Path) -> None:
    svc = services.RedisService(
        binary="/bin/true", tls=True, acl_users=[RedisAclUser("dl", "pw")], extra_args=["--hz", "5"]
    )
    svc._ports = [6399]
    svc._data_dir = tmp_path
    cmd = svc._command()
    assert cmd[cmd.index("--port") + 1] == "0"
    assert cmd[cmd.index("--tls-port") + 1] == "6399"
    assert cmd[cmd.index("--tls-cert-file") + 1] == str(tmp_path / "tls" / "server.crt")
    assert cmd[-2:] == ["--hz", "5"]  # extra args still come last (and win)
    ca = tmp_path / "tls" / "ca.pem"
    assert svc.url_for("dl") == f"rediss://dl:pw@127.0.0.1:6399/0?ssl_ca_certs={ca}"
    assert svc.url_for(None) == f"rediss://127.0.0.1:6399/0?ssl_ca_certs={ca}"
    plain = services.RedisService(binary="/bin/true")
    plain._ports = [6399]
    plain._data_dir = tmp_path
    assert "--tls-port" not in plain._command()
    with pytest.raises(services.ServiceError, match="without tls=True"):
        _ = plain.ca_file
