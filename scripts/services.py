"""Local Kafka (KRaft), Redis and Prometheus for tests and development — stdlib only.

Each service runs as a child process of the caller, on free 127.0.0.1 ports, with its data
under ``.cache/run/<service>-<pid>-<n>/`` (git-ignored). Children get
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` and their own process group, so they die with the
process that started them even when it is SIGKILLed.

Data directories are removed by :meth:`stop` and kept after :meth:`kill` (so that
:meth:`restart` can recover from them) and after a failed start (for debugging; the error
names the directory). Directories left behind by processes that no longer exist are
removed the next time any service starts.

Use as a module::

    with RedisService() as redis_svc:
        print(redis_svc.url)

or from a shell (foreground; Ctrl-C or SIGTERM stops the service)::

    python scripts/services.py kafka
    python scripts/services.py kafka --scram-user admin=a-pw --scram-user driftline=d-pw --acls
    python scripts/services.py redis
    python scripts/services.py prometheus --target 127.0.0.1:8000

The Kafka jars come from ``scripts/install-system-deps.sh`` (``.cache/kafka-4.3.1/libs``);
``redis-server`` and ``prometheus`` from Debian packages, or from ``DRIFTLINE_REDIS_SERVER_BIN``
and ``DRIFTLINE_PROMETHEUS_BIN``.
"""

from __future__ import annotations

import abc
import argparse
import atexit
import base64
import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
RUN_DIR = CACHE_DIR / "run"
KAFKA_VERSION = "4.3.1"
DEFAULT_KAFKA_LIBS = CACHE_DIR / f"kafka-{KAFKA_VERSION}" / "libs"
LOOPBACK = "127.0.0.1"

__all__ = [
    "KAFKA_VERSION",
    "KafkaService",
    "PrometheusClient",
    "PrometheusService",
    "RedisAclUser",
    "RedisService",
    "ScramClient",
    "ServiceError",
    "ServiceStartError",
    "find_promtool",
    "free_port",
    "free_ports",
    "kafka_api_versions",
    "kafka_broker_count",
    "kafka_cluster_id",
    "kafka_sasl_authenticate",
    "kafka_version_hint",
    "make_test_certificates",
    "render_kafka_properties",
    "render_kafka_sasl_properties",
    "render_prometheus_config",
    "render_redis_acl_file",
    "render_redis_args",
]


class ServiceError(RuntimeError):
    """A local service could not be found, started or controlled."""


class ServiceStartError(ServiceError):
    """A local service did not become ready; the message ends with the tail of its log."""

    def __init__(self, message: str, *, port_in_use: bool = False) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is chosen, so the ports are distinct; ports
    already handed out by this process are not handed out again. Another process can still
    take a port before the service binds it, so callers retry on "address in use".
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with _ports_lock:
        sockets: list[socket.socket] = []
        ports: list[int] = []
        try:
            for _ in range(count * 20):
                if len(ports) == count:
                    break
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
                if port not in _handed_out:
                    ports.append(port)
        finally:
            for sock in sockets:
                sock.close()
        if len(ports) < count:
            raise ServiceError(f"could not find {count} free ports on {host}")
        _handed_out.update(ports)
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """Return one port that was free on ``host`` a moment ago (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


# --------------------------------------------------------------------------- processes


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies (Linux).

    The libc lookup happens here, in the parent, so the child only makes the call.
    Note: the kernel signals the child when the *thread* that forked it exits; start
    services from a long-lived thread (the main thread in pytest and the CLI).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        if prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _spawn(cmd: Sequence[str], *, cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509 - prctl only, resolved in parent
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _run_checked(cmd: Sequence[str], *, cwd: Path, log_path: Path, timeout: float) -> None:
    """Run a short-lived helper (e.g. Kafka's storage format) with the same hygiene."""
    proc = _spawn(cmd, cwd=cwd, log_path=log_path)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        raise ServiceStartError(
            f"command did not finish within {timeout:.0f}s: {' '.join(cmd)}\n" + _tail(log_path)
        ) from None
    finally:
        _kill_group(proc.pid)
    if code != 0:
        raise ServiceStartError(
            f"command failed with exit code {code} (data kept in {cwd}): {' '.join(cmd)}\n"
            + _tail(log_path)
        )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"--- {path}: (no log)\n"
    body = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {path}:\n{body}\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_run_dir_counter = 0


def _new_run_dir(service: str, root: Path) -> Path:
    global _run_dir_counter  # noqa: PLW0603 - a per-process sequence number
    root.mkdir(parents=True, exist_ok=True)
    _reap_stale_run_dirs(root)
    while True:
        _run_dir_counter += 1
        path = root / f"{service}-{os.getpid()}-{_run_dir_counter}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


_RUN_DIR_RE = re.compile(r"^[a-z]+-(\d+)-\d+$")


def _reap_stale_run_dirs(root: Path) -> None:
    """Remove data directories of processes that no longer exist."""
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = _RUN_DIR_RE.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


_live_services: weakref.WeakSet[_Service] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for service in list(_live_services):
        with contextlib.suppress(Exception):
            service.stop()


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- base class


class _Service(abc.ABC):
    """One child process with a data directory, fixed ports and a readiness probe."""

    name: ClassVar[str]

    def __init__(
        self,
        *,
        run_root: Path | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        verbose: bool = False,
    ) -> None:
        self.run_root = run_root or RUN_DIR
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.verbose = verbose
        self._proc: subprocess.Popen[bytes] | None = None
        self._data_dir: Path | None = None
        self._ports: list[int] = []
        self.start_seconds: float | None = None

    # -- what subclasses provide

    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """Where clients connect (host:port or URL)."""

    @abc.abstractmethod
    def _port_count(self) -> int: ...

    @abc.abstractmethod
    def _prepare(self, *, fresh: bool) -> None:
        """Write config files into the data dir; ``fresh`` on the first start only."""

    @abc.abstractmethod
    def _command(self) -> list[str]: ...

    @abc.abstractmethod
    def _probe(self) -> bool:
        """True once the service answers requests."""

    def _log_files(self) -> list[Path]:
        return [self.output_path]

    def _preflight(self) -> None:
        """Raise ServiceError if the service cannot start (missing binaries, jars)."""
        return None

    # -- common properties

    @property
    def data_dir(self) -> Path:
        """The service's data directory (exists from the first start until :meth:`stop`)."""
        if self._data_dir is None:
            raise ServiceError(f"{self.name}: not started")
        return self._data_dir

    @property
    def output_path(self) -> Path:
        """The file that receives the child's stdout and stderr."""
        return self.data_dir / f"{self.name}.out"

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (not whether it is ready)."""
        return self.pid is not None

    @property
    def ports(self) -> tuple[int, ...]:
        """The ports chosen at the first start (kept across restarts)."""
        if not self._ports:
            raise ServiceError(f"{self.name}: not started")
        return tuple(self._ports)

    # -- lifecycle

    def start(self) -> Self:
        """Start the service and wait until it answers; reuse the data dir after kill/restart."""
        if self.running:
            raise ServiceError(f"{self.name}: already running (pid {self.pid})")
        self._preflight()
        fresh = self._data_dir is None
        attempts = 3 if fresh else 1
        began = time.monotonic()
        for attempt in range(1, attempts + 1):
            if fresh:
                self._data_dir = _new_run_dir(self.name, self.run_root)
                self._ports = free_ports(self._port_count())
            try:
                self._prepare(fresh=fresh)
                self._launch()
                self._wait_ready()
            except ServiceStartError as exc:
                if fresh and exc.port_in_use and attempt < attempts:
                    print(f"{self.name}: port taken, retrying on new ports", file=sys.stderr)
                    if self._data_dir is not None:
                        shutil.rmtree(self._data_dir, ignore_errors=True)
                    self._data_dir = None
                    continue
                print(f"{self.name}: start failed: {exc}", file=sys.stderr)
                raise
            break
        self.start_seconds = time.monotonic() - began
        _live_services.add(self)
        if self.verbose:
            print(
                f"{self.name}: ready at {self.endpoint} in {self.start_seconds:.1f}s "
                f"(pid {self.pid}, data {self._data_dir})",
                file=sys.stderr,
            )
        return self

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL to the group) and delete the data dir."""
        self._terminate(graceful=True)
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
        _live_services.discard(self)

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash); the data dir stays for restart()."""
        self._terminate(graceful=False)

    def restart(self, *, graceful: bool = True) -> Self:
        """Stop (gracefully, or SIGKILL) if running, then start on the same ports and data."""
        if self._data_dir is None:
            raise ServiceError(f"{self.name}: restart() before start()")
        self._terminate(graceful=graceful)
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals

    def _launch(self) -> None:
        self._proc = _spawn(self._command(), cwd=self.data_dir, log_path=self.output_path)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.05
        while True:
            code = self._proc.poll()
            if code is not None:
                self._fail_start(f"exited with code {code} before it was ready")
            try:
                if self._probe():
                    return
            except (OSError, ValueError, struct.error):
                pass  # not listening yet, or a half-started server's odd answer
            if time.monotonic() > deadline:
                self._fail_start(f"not ready after {self.startup_timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _fail_start(self, why: str) -> None:
        self._terminate(graceful=False)
        tails = "".join(_tail(path) for path in self._log_files())
        in_use = "address already in use" in tails.lower()
        message = (
            f"{self.name} on ports {self._ports} {why}; data kept in {self._data_dir}\n{tails}"
        )
        raise ServiceStartError(message, port_in_use=in_use)

    def _terminate(self, *, graceful: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if graceful and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"{self.name}: no exit {self.stop_timeout:.0f}s after SIGTERM; SIGKILL",
                    file=sys.stderr,
                )
        _kill_group(proc.pid)
        proc.wait()
        self._proc = None


# --------------------------------------------------------------------------- Kafka


def kafka_cluster_id() -> str:
    """A random Kafka cluster id: a UUID in URL-safe base64 without padding (22 chars)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):  # Kafka's Uuid.randomUuid() avoids these too
            return cid


def render_kafka_properties(
    *,
    data_dir: Path,
    broker_port: int,
    controller_port: int,
    node_id: int = 1,
    overrides: Mapping[str, object] | None = None,
) -> str:
    """server.properties for a single-node KRaft broker+controller on 127.0.0.1."""
    props: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": node_id,
        "controller.quorum.voters": f"{node_id}@{LOOPBACK}:{controller_port}",
        "listeners": (
            f"PLAINTEXT://{LOOPBACK}:{broker_port},CONTROLLER://{LOOPBACK}:{controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{broker_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "data"),
        "num.partitions": 1,
        "default.replication.factor": 1,
        "min.insync.replicas": 1,
        "offsets.topic.replication.factor": 1,
        "offsets.topic.num.partitions": 10,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "transaction.state.log.num.partitions": 4,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        "group.initial.rebalance.delay.ms": 0,
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "num.network.threads": 2,
        "num.io.threads": 4,
        "num.recovery.threads.per.data.dir": 1,
        "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
        "log.cleaner.backoff.ms": 1000,
    }
    props.update(overrides or {})
    lines = ["# generated by scripts/services.py"]
    for key, value in props.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"{key}={text}")
    return "\n".join(lines) + "\n"


SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_VALUE_RE = re.compile(r"[A-Za-z0-9_.@+\-]{1,64}")
STANDARD_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_scram_users(users: Mapping[str, str], admin_user: str) -> None:
    if not users:
        raise ValueError("sasl_scram_users: at least one user is needed (the admin user)")
    for name, password in users.items():
        for what, value in (("name", name), ("password", password)):
            if not _SCRAM_VALUE_RE.fullmatch(value):
                raise ValueError(
                    f"sasl_scram_users: {what} {value!r} is not valid; valid: 1-64 characters "
                    "of A-Z a-z 0-9 _ . @ + -"
                )
    if admin_user not in users:
        raise ValueError(
            f"admin_user: {admin_user!r} is not in sasl_scram_users; valid values: "
            + ", ".join(sorted(users))
        )


def render_kafka_sasl_properties(
    *,
    broker_port: int,
    controller_port: int,
    admin_user: str,
    admin_password: str,
    mechanism: str = "SCRAM-SHA-512",
    acls: bool = False,
    super_users: Sequence[str] = (),
    tls_port: int | None = None,
    tls_keystore: Path | None = None,
) -> dict[str, str]:
    """server.properties overrides: SASL/SCRAM on the client listener, optional ACLs.

    * ``CLIENT`` (the bootstrap listener, also the inter-broker one): ``SASL_PLAINTEXT``
      with ``mechanism`` (SCRAM-SHA-256/512); the credentials live in the KRaft metadata
      log (created at format time, ``--add-scram``); the broker authenticates to itself as
      ``admin_user``.
    * ``CONTROLLER``: ``SASL_PLAINTEXT`` with PLAIN and one user, ``admin_user`` (SCRAM
      credentials live in the metadata log, which the controller listener cannot depend
      on). So no listener accepts an unauthenticated connection.
    * ``acls``: the StandardAuthorizer, ``super.users`` = the admin plus ``super_users``,
      and ``allow.everyone.if.no.acl.found=false`` (deny unless an ACL allows).
    * ``tls_port`` + ``tls_keystore`` (a PEM file: unencrypted PKCS#8 key, then the
      certificate chain): a third listener, ``TLS``, speaking ``SASL_SSL`` with the same
      SCRAM users.
    """
    if mechanism not in SCRAM_MECHANISMS:
        raise ValueError(
            f"mechanism: {mechanism!r} is not valid; valid values: {', '.join(SCRAM_MECHANISMS)}"
        )
    scram = mechanism.lower()
    user, password = _jaas_quote(admin_user), _jaas_quote(admin_password)
    props = {
        "listeners": f"CLIENT://{LOOPBACK}:{broker_port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"CLIENT://{LOOPBACK}:{broker_port}",
        "listener.security.protocol.map": "CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": "CLIENT",
        "sasl.enabled.mechanisms": mechanism,
        "sasl.mechanism.inter.broker.protocol": mechanism,
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.client.sasl.enabled.mechanisms": mechanism,
        f"listener.name.client.{scram}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f"username={user} password={password};"
        ),
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f"username={user} password={password} user_{admin_user}={password};"
        ),
    }
    if tls_port is not None:
        if tls_keystore is None:
            raise ValueError("tls_keystore: needed with tls_port (a PEM key + certificate chain)")
        props["listeners"] += f",TLS://{LOOPBACK}:{tls_port}"
        props["advertised.listeners"] += f",TLS://{LOOPBACK}:{tls_port}"
        props["listener.security.protocol.map"] += ",TLS:SASL_SSL"
        props["listener.name.tls.sasl.enabled.mechanisms"] = mechanism
        props[f"listener.name.tls.{scram}.sasl.jaas.config"] = props[
            f"listener.name.client.{scram}.sasl.jaas.config"
        ]
        props["listener.name.tls.ssl.keystore.type"] = "PEM"
        props["listener.name.tls.ssl.keystore.location"] = str(tls_keystore)
        props["listener.name.tls.ssl.client.auth"] = "none"
    if acls:
        principals = [f"User:{admin_user}", *(f"User:{u}" for u in super_users)]
        props.update(
            {
                "authorizer.class.name": STANDARD_AUTHORIZER,
                "super.users": ";".join(dict.fromkeys(principals)),
                "allow.everyone.if.no.acl.found": "false",
            }
        )
    return props


_LOG4J2_TEMPLATE = """\
status = error
name = driftline-local-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.coordinator.name = org.apache.kafka.coordinator
logger.coordinator.level = WARN
"""


def make_test_certificates(
    directory: Path,
    *,
    hosts: Sequence[str] = (LOOPBACK, "localhost"),
    days: int = 7,
    log_path: Path | None = None,
) -> dict[str, Path]:
    """A throw-away CA and a server certificate for ``hosts``, made with ``openssl``.

    Writes ``ca.pem``/``ca.key``, ``server.crt``/``server.key`` and ``broker.pem`` (the
    unencrypted PKCS#8 key followed by the certificate chain: Kafka's PEM keystore) into
    ``directory`` (mode 0700). For tests only: the keys are not encrypted.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServiceError("openssl not found (apt-get install openssl)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    sans = ",".join(
        f"IP:{h}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+:[0-9a-fA-F:]*", h) else f"DNS:{h}"
        for h in hosts
    )
    (directory / "server.ext").write_text(
        f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    log = log_path or directory / "openssl.out"
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", str(days), "-subj", "/CN=driftline-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", f"/CN={hosts[0]}"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", str(days), "-extfile", "server.ext"],
    ]  # fmt: skip
    for step in steps:
        _run_checked([openssl, *step], cwd=directory, log_path=log, timeout=60)
    keystore = directory / "broker.pem"
    keystore.touch(mode=0o600)
    keystore.write_text(
        (directory / "server.key").read_text()
        + (directory / "server.crt").read_text()
        + (directory / "ca.pem").read_text()
    )
    return {
        "ca": directory / "ca.pem",
        "cert": directory / "server.crt",
        "key": directory / "server.key",
        "keystore": keystore,
    }


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise ServiceError(
            "java not found (set JAVA_HOME or install openjdk-17-jre-headless); "
            "run scripts/install-system-deps.sh"
        )
    return java


class KafkaService(_Service):
    """A single-node KRaft Kafka (broker and controller in one JVM) on 127.0.0.1.

    Jars come from ``libs_dir``, else ``$DRIFTLINE_KAFKA_LIBS``, else
    ``.cache/kafka-4.3.1/libs``. ``broker_config`` overrides or adds server.properties
    entries. The storage is
    formatted with a random cluster id on the first start; restarts reuse it.

    Security (for security tests): ``sasl_scram_users={"admin": "pw", "driftline": "pw"}``
    makes every listener require SASL (see :func:`render_kafka_sasl_properties`): clients
    use ``sasl_mechanism`` (SCRAM-SHA-512 by default) on :attr:`bootstrap_servers`, the
    credentials are created when the storage is formatted, and ``admin_user`` (in the
    mapping) is the broker's own identity. ``acls=True`` adds the StandardAuthorizer with
    ``super.users`` = the admin (plus ``super_users``) and deny-by-default. ``tls=True``
    adds a ``SASL_SSL`` listener (:attr:`tls_bootstrap_servers`) whose certificate (for
    127.0.0.1 and localhost) is signed by a throw-away CA made with ``openssl`` in the data
    dir (:attr:`ca_file`). :meth:`client_config` gives a confluent-kafka config for one of
    the users.
    """

    name = "kafka"

    def __init__(
        self,
        *,
        libs_dir: Path | None = None,
        java: str | None = None,
        heap: str = "512m",
        broker_config: Mapping[str, object] | None = None,
        log_level: str = "INFO",
        sasl_scram_users: Mapping[str, str] | None = None,
        sasl_mechanism: str = "SCRAM-SHA-512",
        admin_user: str = "admin",
        acls: bool = False,
        super_users: Sequence[str] = (),
        tls: bool = False,
        startup_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        run_root: Path | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            run_root=run_root,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            verbose=verbose,
        )
        self.sasl_scram_users = dict(sasl_scram_users or {})
        if self.sasl_scram_users:
            _check_scram_users(self.sasl_scram_users, admin_user)
            if sasl_mechanism not in SCRAM_MECHANISMS:
                raise ValueError(
                    f"sasl_mechanism: {sasl_mechanism!r} is not valid; valid values: "
                    + ", ".join(SCRAM_MECHANISMS)
                )
        elif acls or tls:
            raise ValueError(
                f"{'acls' if acls else 'tls'}: needs sasl_scram_users (an authenticated admin user)"
            )
        self.tls = tls
        self.sasl_mechanism = sasl_mechanism
        self.admin_user = admin_user
        self.acls = acls
        self.super_users = tuple(super_users)
        self.libs_dir = Path(
            libs_dir or os.environ.get("DRIFTLINE_KAFKA_LIBS") or DEFAULT_KAFKA_LIBS
        ).resolve()
        self.java = java
        self.heap = heap
        self.broker_config = dict(broker_config or {})
        self.log_level = log_level
        self.cluster_id = kafka_cluster_id()

    @property
    def version(self) -> str:
        """Kafka version of the jars in ``libs_dir`` (e.g. "4.3.1")."""
        jars = sorted(self.libs_dir.glob("kafka_2.13-*.jar"))
        if not jars:
            raise ServiceError(
                f"no kafka_2.13-*.jar in {self.libs_dir}: run scripts/install-system-deps.sh"
            )
        return jars[-1].name.removeprefix("kafka_2.13-").removesuffix(".jar")

    @property
    def broker_port(self) -> int:
        """The client listener's port (PLAINTEXT, or SASL_PLAINTEXT with SCRAM users)."""
        return self.ports[0]

    @property
    def tls_port(self) -> int:
        """The SASL_SSL listener's port (``tls=True`` only)."""
        if not self.tls:
            raise ServiceError("kafka: started without tls=True")
        return self.ports[2]

    @property
    def tls_bootstrap_servers(self) -> str:
        """``127.0.0.1:PORT`` of the SASL_SSL listener (``tls=True`` only)."""
        return f"{LOOPBACK}:{self.tls_port}"

    @property
    def ca_file(self) -> Path:
        """The PEM file of the CA that signed the broker's certificate (``tls=True``)."""
        return self.data_dir / "tls" / "ca.pem"

    @property
    def security_protocol(self) -> str:
        """``PLAINTEXT``, or ``SASL_PLAINTEXT`` when started with ``sasl_scram_users``."""
        return "SASL_PLAINTEXT" if self.sasl_scram_users else "PLAINTEXT"

    def client_config(
        self, user: str | None = None, password: str | None = None, *, tls: bool = False
    ) -> dict[str, Any]:
        """confluent-kafka settings for ``user`` (default: the admin user).

        ``password`` overrides the user's configured one (e.g. to test a wrong password).
        ``tls=True``: the SASL_SSL listener, trusting :attr:`ca_file`. On a broker without
        SASL, only ``bootstrap.servers``.
        """
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if not self.sasl_scram_users:
            return conf
        name = user or self.admin_user
        if password is None:
            if name not in self.sasl_scram_users:
                raise ValueError(
                    f"user: {name!r} is not a SCRAM user of this broker; valid values: "
                    + ", ".join(sorted(self.sasl_scram_users))
                )
            password = self.sasl_scram_users[name]
        conf.update(
            {
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": name,
                "sasl.password": password,
            }
        )
        if tls:
            conf["bootstrap.servers"] = self.tls_bootstrap_servers
            conf["security.protocol"] = "SASL_SSL"
            conf["ssl.ca.location"] = str(self.ca_file)
        return conf

    @property
    def controller_port(self) -> int:
        """The KRaft controller listener's port."""
        return self.ports[1]

    @property
    def endpoint(self) -> str:
        """The bootstrap servers string, ``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.broker_port}"

    @property
    def bootstrap_servers(self) -> str:
        """Same as :attr:`endpoint`."""
        return self.endpoint

    @property
    def server_log(self) -> Path:
        """The broker's log4j log file."""
        return self.data_dir / "logs" / "server.log"

    def _port_count(self) -> int:
        return 3 if self.tls else 2

    def _log_files(self) -> list[Path]:
        return [self.output_path, self.server_log]

    def _java_cmd(self, main_class: str, *args: str, heap: str) -> list[str]:
        java = self.java or _find_java()
        return [
            java,
            f"-Xmx{heap}",
            "-Xms64m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:+PerfDisableSharedMem",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            str(self.libs_dir / "*"),
            main_class,
            *args,
        ]

    def _preflight(self) -> None:
        self.version  # noqa: B018 - raises with a clear message when the jars are missing
        if self.java is None:
            self.java = _find_java()

    def _overrides(self) -> dict[str, object]:
        overrides: dict[str, object] = {}
        if self.sasl_scram_users:
            overrides.update(
                render_kafka_sasl_properties(
                    broker_port=self.broker_port,
                    controller_port=self.controller_port,
                    admin_user=self.admin_user,
                    admin_password=self.sasl_scram_users[self.admin_user],
                    mechanism=self.sasl_mechanism,
                    acls=self.acls,
                    super_users=self.super_users,
                    tls_port=self.tls_port if self.tls else None,
                    tls_keystore=self.data_dir / "tls" / "broker.pem" if self.tls else None,
                )
            )
        overrides.update(self.broker_config)
        return overrides

    def _format_args(self, props: Path) -> list[str]:
        args = ["format", "--cluster-id", self.cluster_id, "--config", str(props)]
        for name, password in self.sasl_scram_users.items():
            args += ["--add-scram", f"{self.sasl_mechanism}=[name={name},password={password}]"]
        return args

    def _prepare(self, *, fresh: bool) -> None:
        props = self.data_dir / "server.properties"
        props.touch(mode=0o600)  # it may hold SASL passwords
        props.write_text(
            render_kafka_properties(
                data_dir=self.data_dir,
                broker_port=self.broker_port,
                controller_port=self.controller_port,
                overrides=self._overrides(),
            )
        )
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.tls and fresh:
            make_test_certificates(self.data_dir / "tls", log_path=self.data_dir / "openssl.out")
        (self.data_dir / "log4j2.properties").write_text(
            _LOG4J2_TEMPLATE.format(log_file=self.server_log, level=self.log_level)
        )
        if fresh:
            _run_checked(
                self._java_cmd("kafka.tools.StorageTool", *self._format_args(props), heap="256m"),
                cwd=self.data_dir,
                log_path=self.data_dir / "format.out",
                timeout=self.startup_timeout,
            )

    def _command(self) -> list[str]:
        return self._java_cmd(
            "kafka.Kafka", str(self.data_dir / "server.properties"), heap=self.heap
        )

    def _probe(self) -> bool:
        sasl = None
        if self.sasl_scram_users:
            admin = self.admin_user
            sasl = (self.sasl_mechanism, admin, self.sasl_scram_users[admin])
        return kafka_broker_count(LOOPBACK, self.broker_port, timeout=2.0, sasl=sasl) >= 1


# Kafka wire protocol, just enough for a readiness probe: ApiVersions v0, then Metadata
# (a non-flexible version, v4..v8) asking for no topics; the broker lists only unfenced
# brokers, so a non-empty list means it accepts produce/consume.

_API_METADATA = 3
_API_VERSIONS = 18


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _kafka_call(
    sock: socket.socket, api_key: int, api_version: int, correlation_id: int, body: bytes
) -> bytes:
    client_id = b"driftline-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id))
    payload = header + client_id + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack(">i", response[:4])
    if got != correlation_id:
        raise ConnectionError(f"correlation id {got} != {correlation_id}")
    return response[4:]


def kafka_api_versions(host: str, port: int, timeout: float = 2.0) -> dict[int, tuple[int, int]]:
    """The broker's supported (min, max) version per API key (ApiVersions v0)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return _parse_api_versions(_kafka_call(sock, _API_VERSIONS, 0, 1, b""))


def _parse_api_versions(body: bytes) -> dict[int, tuple[int, int]]:
    error, count = struct.unpack_from(">hi", body, 0)
    if error not in (0, 35):  # 35 = UNSUPPORTED_VERSION still lists the versions
        raise ConnectionError(f"ApiVersions error code {error}")
    versions: dict[int, tuple[int, int]] = {}
    for i in range(count):
        key, low, high = struct.unpack_from(">hhh", body, 6 + 6 * i)
        versions[key] = (low, high)
    return versions


_API_SASL_HANDSHAKE = 17
_API_SASL_AUTHENTICATE = 36


class ScramClient:
    """The client side of SCRAM (RFC 5802) for SHA-256/SHA-512, as Kafka speaks it.

    >>> c = ScramClient("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    >>> c.first()
    b'n,,n=user,r=rOprNGfwEbeRWgbNEkqO'
    """

    def __init__(self, mechanism: str, username: str, password: str, *, nonce: str = "") -> None:
        if mechanism not in SCRAM_MECHANISMS:
            valid = ", ".join(SCRAM_MECHANISMS)
            raise ValueError(f"mechanism: {mechanism!r} is not valid; valid values: {valid}")
        self.hash = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
        self.username = username.replace("=", "=3D").replace(",", "=2C")
        self.password = password.encode()
        self.nonce = nonce or base64.b64encode(os.urandom(24)).decode()
        self._bare = f"n={self.username},r={self.nonce}"
        self._server_signature = b""

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.hash).digest()

    def first(self) -> bytes:
        """The client-first message."""
        return f"n,,{self._bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        """The client-final message (with the proof) for the server-first message."""
        text = server_first.decode()
        attrs = dict(part.split("=", 1) for part in text.split(","))
        nonce = attrs.get("r", "")
        if not nonce.startswith(self.nonce) or "s" not in attrs or "i" not in attrs:
            raise ConnectionError(f"SCRAM: bad server-first message {text!r}")
        salted = hashlib.pbkdf2_hmac(
            self.hash, self.password, base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self.hash, client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._bare},{text},{without_proof}".encode()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server's signature (raises ConnectionError on a mismatch or error)."""
        text = server_final.decode()
        if text.startswith("e="):
            raise ConnectionError(f"SCRAM: server error {text[2:]!r}")
        if (
            not self._server_signature
            or text != "v=" + base64.b64encode(self._server_signature).decode()
        ):
            raise ConnectionError("SCRAM: the server signature does not match")


def _kafka_sasl_round(sock: socket.socket, correlation_id: int, token: bytes) -> bytes:
    body = _kafka_call(
        sock, _API_SASL_AUTHENTICATE, 0, correlation_id, struct.pack(">i", len(token)) + token
    )
    error, msg_len = struct.unpack_from(">hh", body, 0)
    off = 4 + max(msg_len, 0)
    message = body[4:off].decode(errors="replace") if msg_len > 0 else ""
    if error:
        raise ConnectionError(f"SaslAuthenticate error code {error}: {message}")
    (size,) = struct.unpack_from(">i", body, off)
    return body[off + 4 : off + 4 + max(size, 0)]


def kafka_sasl_authenticate(
    sock: socket.socket, mechanism: str, username: str, password: str
) -> None:
    """SASL on a fresh Kafka connection: SaslHandshake v1, then SaslAuthenticate v0 rounds.

    Supports PLAIN and SCRAM-SHA-256/512; raises ConnectionError when the broker refuses.
    """
    name = mechanism.encode()
    body = _kafka_call(sock, _API_SASL_HANDSHAKE, 1, 11, struct.pack(">h", len(name)) + name)
    (error,) = struct.unpack_from(">h", body, 0)
    if error:
        raise ConnectionError(f"SaslHandshake error code {error} for {mechanism}")
    if mechanism == "PLAIN":
        _kafka_sasl_round(sock, 12, b"\0" + username.encode() + b"\0" + password.encode())
        return
    client = ScramClient(mechanism, username, password)
    server_first = _kafka_sasl_round(sock, 12, client.first())
    client.verify(_kafka_sasl_round(sock, 13, client.final(server_first)))


def kafka_version_hint(bootstrap: str, timeout: float = 5.0) -> str:
    """A coarse broker version from ApiVersions: Kafka 4.0 dropped Fetch v0-v3 (KIP-896)."""
    host, _, port = bootstrap.split(",", maxsplit=1)[0].strip().rpartition(":")
    fetch_min = kafka_api_versions(host.strip("[]"), int(port), timeout)[1][0]
    return "4.0+" if fetch_min >= 4 else "before 4.0"


def kafka_broker_count(
    host: str, port: int, timeout: float = 2.0, *, sasl: tuple[str, str, str] | None = None
) -> int:
    """How many unfenced brokers a Metadata request to ``host:port`` reports.

    ``sasl=(mechanism, username, password)`` authenticates first (PLAIN, SCRAM-SHA-256 or
    SCRAM-SHA-512); a refused login raises :class:`ConnectionError`.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        versions = _parse_api_versions(_kafka_call(sock, _API_VERSIONS, 0, 1, b""))
        if sasl is not None:
            kafka_sasl_authenticate(sock, *sasl)
        low, high = versions.get(_API_METADATA, (0, -1))
        version = min(high, 8)
        if version < max(low, 4):
            raise ConnectionError(f"no Metadata version in 4..8 (broker has {low}..{high})")
        body = struct.pack(">i?", 0, False)  # no topics, no auto-creation
        if version >= 8:
            body += struct.pack(">??", False, False)  # no authorized operations
        response = _kafka_call(sock, _API_METADATA, version, 2, body)
        _throttle, brokers = struct.unpack_from(">ii", response, 0)
        return int(brokers)


# --------------------------------------------------------------------------- Redis


def _find_binary(env_var: str, name: str, package: str) -> str:
    configured = os.environ.get(env_var)
    if configured:
        if not Path(configured).is_file():
            raise ServiceError(f"{env_var}={configured} is not a file")
        return configured
    found = shutil.which(name)
    if found is None:
        raise ServiceError(
            f"{name} not found: apt-get install {package} (scripts/install-system-deps.sh), "
            f"or set {env_var}"
        )
    return found


def render_redis_args(
    *,
    port: int,
    data_dir: Path,
    appendfsync: str = "everysec",
    maxmemory: str | None = None,
    password: str | None = None,
    acl_file: Path | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """redis-server arguments: 127.0.0.1 only, AOF on, no RDB snapshots, noeviction."""
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync={appendfsync!r}; valid: always, everysec, no")
    args = [
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--daemonize",
        "no",
        "--dir",
        str(data_dir),
        "--logfile",
        str(data_dir / "redis.log"),
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
        "--maxmemory-policy",
        "noeviction",
    ]
    if maxmemory is not None:
        args += ["--maxmemory", maxmemory]
    if password is not None:
        args += ["--requirepass", password]
    if acl_file is not None:
        args += ["--aclfile", str(acl_file)]
    return args + list(extra_args)


_REDIS_ACL_NAME_RE = re.compile(r"[A-Za-z0-9_.@\-]{1,64}")


@dataclass(frozen=True)
class RedisAclUser:
    """One Redis ACL user for :class:`RedisService` (``acl_users=[...]``).

    ``rules`` are ACL SETUSER rules after ``on`` and the password, e.g.
    ``("~dl:*", "resetchannels", "-@all", "+get", "+evalsha")``. The ACL file stores the
    password's SHA-256 only (``#<hex>``), never the password.
    """

    name: str
    password: str
    rules: tuple[str, ...] = ("~*", "&*", "+@all")

    def __post_init__(self) -> None:
        if not _REDIS_ACL_NAME_RE.fullmatch(self.name) or self.name == "default":
            raise ValueError(
                f"name: {self.name!r} is not valid; valid: 1-64 characters of A-Z a-z 0-9 _ . @ -"
                " other than 'default' (set the default user with password=)"
            )
        if not self.password:
            raise ValueError(f"password: user {self.name!r} needs a non-empty password")
        for rule in self.rules:
            if not rule or any(c.isspace() for c in rule) or rule.startswith((">", "#", "nopass")):
                raise ValueError(
                    f"rules: {rule!r} of user {self.name!r} is not valid (no spaces, no "
                    "passwords: the password field sets it)"
                )

    def line(self) -> str:
        """The user's ACL file line (``user NAME reset on #SHA256 RULES...``)."""
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        return " ".join(["user", self.name, "reset", "on", f"#{digest}", *self.rules])


def render_redis_acl_file(users: Sequence[RedisAclUser], default_password: str | None) -> str:
    """An ACL file: ``users`` plus the default user, turned off unless it has a password
    (then it is the unrestricted admin)."""
    if default_password:
        default = (
            RedisAclUser("admin", default_password)
            .line()
            .replace("user admin ", "user default ", 1)
        )
    else:
        default = "user default reset off resetchannels -@all"
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"acl_users: user names must be unique, got {names}")
    return "\n".join([default, *(u.line() for u in users)]) + "\n"


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _resp_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("connection closed by redis")
        data += chunk
    return data[:-2].decode(errors="replace")


class RedisService(_Service):
    """``redis-server`` on 127.0.0.1 with AOF (``everysec``) and ``noeviction``.

    ``restart()`` keeps the data dir, so keys written before it survive (AOF replay).
    ``password`` sets ``requirepass`` (and goes into :attr:`url`); ``acl_file``,
    ``maxmemory`` and ``extra_args`` are passed through for reliability/security tests.

    ``acl_users`` (instead of ``acl_file``) writes an ACL file into the data dir with
    those users; the default user is turned off, or, with ``password``, is the
    unrestricted admin (``+@all``). :meth:`url_for` gives a user's URL.

    ``tls=True``: TLS only (no plaintext port), with a certificate for 127.0.0.1 signed by
    a throw-away CA (:attr:`ca_file`); the URLs become ``rediss://...?ssl_ca_certs=<CA>``,
    which redis-py's ``from_url`` (and so RedisStore) accepts as is.
    """

    name = "redis"

    def __init__(
        self,
        *,
        binary: str | None = None,
        maxmemory: str | None = None,
        password: str | None = None,
        username: str | None = None,
        acl_file: Path | None = None,
        acl_users: Sequence[RedisAclUser] = (),
        tls: bool = False,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        config_file: Path | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        run_root: Path | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            run_root=run_root,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            verbose=verbose,
        )
        self.binary = binary or _find_binary("DRIFTLINE_REDIS_SERVER_BIN", "redis-server", "redis")
        self.maxmemory = maxmemory
        self.password = password
        self.username = username
        if acl_users and acl_file is not None:
            raise ValueError("acl_users and acl_file: give one of them, not both")
        if acl_users and username is not None:
            raise ValueError(
                "username: not used with acl_users (password= sets the default user's password)"
            )
        self.acl_users = tuple(acl_users)
        self.tls = tls
        render_redis_acl_file(self.acl_users, password)  # validates now, not at start
        self.acl_file = acl_file
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.config_file = config_file

    @property
    def version(self) -> str:
        """The redis-server version (from ``redis-server --version``)."""
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"v=(\S+)", out)
        return match.group(1) if match else out.strip()

    @property
    def port(self) -> int:
        """The TCP port."""
        return self.ports[0]

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://[user:password@]127.0.0.1:PORT/0``."""
        auth = ""
        if self.password is not None:
            user = urllib.parse.quote(self.username or "", safe="")
            auth = f"{user}:{urllib.parse.quote(self.password, safe='')}@"
        return self._url(auth)

    def _url(self, auth: str) -> str:
        if not self.tls:
            return f"redis://{auth}{self.endpoint}/0"
        ca = urllib.parse.quote(str(self.ca_file), safe="/")
        return f"rediss://{auth}{self.endpoint}/0?ssl_ca_certs={ca}"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the server certificate (``tls=True``)."""
        if not self.tls:
            raise ServiceError("redis: started without tls=True")
        return self.data_dir / "tls" / "ca.pem"

    def url_for(self, user: str | None, password: str | None = None) -> str:
        """The URL of ACL user ``user`` (its configured password unless ``password`` is
        given); ``user=None`` gives a URL without credentials."""
        if user is None:
            return self._url("")
        if password is None:
            known = {u.name: u.password for u in self.acl_users}
            if user not in known:
                raise ValueError(
                    f"user: {user!r} is not an ACL user; valid values: {', '.join(known)}"
                )
            password = known[user]
        quote = urllib.parse.quote
        return self._url(f"{quote(user, safe='')}:{quote(password, safe='')}@")

    @property
    def _effective_acl_file(self) -> Path | None:
        if self.acl_users:
            return self.data_dir / "users.acl"
        return self.acl_file

    def _port_count(self) -> int:
        return 1

    def _log_files(self) -> list[Path]:
        return [self.output_path, self.data_dir / "redis.log"]

    def _prepare(self, *, fresh: bool) -> None:
        if self.tls and fresh:
            make_test_certificates(self.data_dir / "tls", log_path=self.data_dir / "openssl.out")
        if self.acl_users:
            path = self.data_dir / "users.acl"
            path.touch(mode=0o600)
            path.write_text(render_redis_acl_file(self.acl_users, self.password))

    def _command(self) -> list[str]:
        head = [self.binary] + ([str(self.config_file)] if self.config_file else [])
        args = render_redis_args(
            port=self.port,
            data_dir=self.data_dir,
            appendfsync=self.appendfsync,
            maxmemory=self.maxmemory,
            password=None if self.acl_users else self.password,
            acl_file=self._effective_acl_file,
        )
        if self.tls:
            tls_dir = self.data_dir / "tls"
            args[args.index("--port") + 1] = "0"  # no plaintext port at all
            args += [
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(tls_dir / "server.crt"),
                "--tls-key-file",
                str(tls_dir / "server.key"),
                "--tls-ca-cert-file",
                str(tls_dir / "ca.pem"),
                "--tls-auth-clients",
                "no",
            ]
        return head + args + self.extra_args

    def _probe(self) -> bool:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((LOOPBACK, self.port), timeout=2.0))
            if self.tls:
                context = ssl.create_default_context(cafile=str(self.ca_file))
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname=LOOPBACK))
            if self.password is not None:
                auth = [self.username, self.password] if self.username else [self.password]
                sock.sendall(_resp("AUTH", *auth))
                if not _resp_line(sock).startswith("+OK"):
                    return False
            sock.sendall(_resp("PING"))
            reply = _resp_line(sock)
        # -LOADING: still replaying the AOF. -NOAUTH: up, but needs credentials we lack.
        return reply == "+PONG" or reply.startswith("-NOAUTH")


# --------------------------------------------------------------------------- Prometheus


def _duration(value: str | float) -> str:
    if isinstance(value, str):
        if not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", value):
            raise ValueError(f"duration {value!r}: use e.g. '500ms', '1s', '1m' or seconds")
        return value
    if value <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {value}")
    return f"{round(value * 1000)}ms"


def _duration_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", value))


def render_prometheus_config(
    targets: Sequence[str],
    *,
    scrape_interval: str | float = "1s",
    evaluation_interval: str | float | None = None,
    rule_files: Sequence[Path | str] = (),
    job_name: str = "driftline",
) -> str:
    """A prometheus.yml (written as JSON, which is YAML) scraping ``targets``.

    A target is ``host:port`` (scraped at ``/metrics``) or a URL such as
    ``http://127.0.0.1:8000/custom``; targets with another scheme or path get their own job
    (``<job_name>-<n>``).
    """
    interval = _duration(scrape_interval)
    groups: dict[tuple[str, str], list[str]] = {}
    for target in targets:
        if "://" in target:
            parsed = urllib.parse.urlsplit(target)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"target {target!r}: use host:port or http(s)://host:port/path")
            key = (parsed.scheme, parsed.path or "/metrics")
            groups.setdefault(key, []).append(parsed.netloc)
        else:
            if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", target):
                raise ValueError(f"target {target!r}: use host:port or http(s)://host:port/path")
            groups.setdefault(("http", "/metrics"), []).append(target)
    scrape_configs: list[dict[str, Any]] = []
    for index, ((scheme, path), hosts) in enumerate(sorted(groups.items())):
        scrape_configs.append(
            {
                "job_name": job_name if index == 0 else f"{job_name}-{index}",
                "scheme": scheme,
                "metrics_path": path,
                "static_configs": [{"targets": hosts}],
            }
        )
    timeout_s = min(_duration_seconds(interval), 10.0)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": f"{round(timeout_s * 1000)}ms",
            "evaluation_interval": _duration(evaluation_interval or scrape_interval),
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": scrape_configs,
    }
    return json.dumps(config, indent=2) + "\n"


def find_promtool(prometheus_binary: str | None = None) -> str:
    """Path of ``promtool``: next to the prometheus binary, else on PATH."""
    if prometheus_binary:
        sibling = Path(prometheus_binary).with_name("promtool")
        if sibling.is_file():
            return str(sibling)
    found = shutil.which("promtool")
    if found is None:
        raise ServiceError("promtool not found (it ships in Debian's prometheus package)")
    return found


class PrometheusClient:
    """Minimal HTTP API client (stdlib, no proxies) for a Prometheus at ``url``."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _http(
        self, path: str, *, method: str = "GET", timeout: float | None = None
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with _no_proxy_opener().open(request, timeout=timeout or self.timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def ready(self) -> bool:
        """Whether ``GET /-/ready`` answers 200."""
        status, _ = self._http("/-/ready", timeout=2.0)
        return status == 200

    def reload(self) -> None:
        """``POST /-/reload`` (needs ``--web.enable-lifecycle``)."""
        status, body = self._http("/-/reload", method="POST")
        if status != 200:
            raise ServiceError(f"prometheus reload failed ({status}): {body.decode()[:500]}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant PromQL query; return ``data.result``."""
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = self._http(path)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        if status != 200 or payload.get("status") != "success":
            raise ServiceError(f"query {expr!r} failed ({status}): {body.decode()[:500]}")
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result; raise after ``timeout`` s.

        Prometheus applies new scrape targets in 5 s steps, so the first sample of a
        fresh server or of a new target takes about 5-6 s.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise ServiceError(f"query {expr!r} returned nothing within {timeout:.0f}s")
            time.sleep(0.25)


class PrometheusService(_Service):
    """A Prometheus server on 127.0.0.1 scraping the given targets (default every 1 s).

    ``set_targets()`` rewrites the config and reloads it (``--web.enable-lifecycle``).
    ``config_file`` replaces the generated config entirely. ``query``/``wait_for`` go
    through :class:`PrometheusClient`.
    """

    name = "prometheus"

    def __init__(
        self,
        targets: Sequence[str] = (),
        *,
        scrape_interval: str | float = "1s",
        evaluation_interval: str | float | None = None,
        rule_files: Sequence[Path | str] = (),
        job_name: str = "driftline",
        config_file: Path | None = None,
        binary: str | None = None,
        retention: str = "1d",
        startup_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        run_root: Path | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            run_root=run_root,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            verbose=verbose,
        )
        self.binary = binary or _find_binary("DRIFTLINE_PROMETHEUS_BIN", "prometheus", "prometheus")
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [Path(p) for p in rule_files]
        self.job_name = job_name
        self.config_file = config_file
        self.retention = retention

    @property
    def promtool(self) -> str:
        """Path of ``promtool`` (next to the prometheus binary, else on PATH)."""
        return find_promtool(self.binary)

    @property
    def version(self) -> str:
        """The Prometheus version (from ``prometheus --version``)."""
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        )
        match = re.search(r"version (\S+)", out.stdout + out.stderr)
        return match.group(1) if match else "unknown"

    @property
    def port(self) -> int:
        """The HTTP port."""
        return self.ports[0]

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """Same as :attr:`endpoint`."""
        return self.endpoint

    @property
    def client(self) -> PrometheusClient:
        """An HTTP API client for this server."""
        return PrometheusClient(self.endpoint)

    @property
    def config_path(self) -> Path:
        """The config file the server reads."""
        return self.config_file or self.data_dir / "prometheus.yml"

    def render_config(self) -> str:
        """The generated config for the current targets and rule files."""
        return render_prometheus_config(
            self.targets,
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
            rule_files=self.rule_files,
            job_name=self.job_name,
        )

    def _port_count(self) -> int:
        return 1

    def _prepare(self, *, fresh: bool) -> None:
        if self.config_file is None:
            (self.data_dir / "prometheus.yml").write_text(self.render_config())

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=info",
        ]

    def _probe(self) -> bool:
        return self.client.ready()

    def set_targets(self, targets: Sequence[str]) -> None:
        """Replace the scrape targets and reload the running server."""
        self.targets = list(targets)
        self.reload()

    def reload(self) -> None:
        """Rewrite the generated config and ask the server to reload it."""
        self._prepare(fresh=False)
        self.client.reload()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant PromQL query; return ``data.result``."""
        return self.client.query(expr)

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result (see PrometheusClient)."""
        return self.client.wait_for(expr, timeout)


# --------------------------------------------------------------------------- CLI


def _read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/services.py {kafka,redis,prometheus}``: run one in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("service", choices=["kafka", "redis", "prometheus"])
    parser.add_argument(
        "--config",
        type=Path,
        help="kafka: server.properties overrides; redis: a redis.conf loaded first; "
        "prometheus: a prometheus.yml used instead of the generated one",
    )
    parser.add_argument(
        "--target", action="append", default=[], help="prometheus scrape target (repeatable)"
    )
    parser.add_argument("--scrape-interval", default="1s", help="prometheus (default 1s)")
    parser.add_argument("--rule-file", action="append", default=[], type=Path)
    parser.add_argument("--heap", default="512m", help="kafka JVM -Xmx (default 512m)")
    parser.add_argument(
        "--scram-user",
        action="append",
        default=[],
        metavar="NAME=PASSWORD",
        help="kafka: require SASL/SCRAM-SHA-512 with this user (repeatable; 'admin' is the "
        "broker's own identity and must be one of them)",
    )
    parser.add_argument(
        "--acls", action="store_true", help="kafka: StandardAuthorizer, deny by default"
    )
    parser.add_argument("--tls", action="store_true", help="kafka: add a SASL_SSL listener")
    args = parser.parse_args(argv)
    users: dict[str, str] = {}
    for spec in args.scram_user:
        name, sep, password = spec.partition("=")
        if not sep:
            parser.error(f"--scram-user: {spec!r} is not NAME=PASSWORD")
        users[name] = password

    service: _Service
    if args.service == "kafka":
        overrides = _read_properties(args.config) if args.config else {}
        try:
            service = KafkaService(
                broker_config=overrides,
                heap=args.heap,
                sasl_scram_users=users,
                acls=args.acls,
                tls=args.tls,
                verbose=True,
            )
        except ValueError as exc:
            parser.error(str(exc))
        env_line = "DRIFTLINE_KAFKA_BOOTSTRAP={}"
    elif args.service == "redis":
        service = RedisService(config_file=args.config, verbose=True)
        env_line = "DRIFTLINE_REDIS_URL={}"
    else:
        service = PrometheusService(
            args.target,
            scrape_interval=args.scrape_interval,
            rule_files=args.rule_file,
            config_file=args.config,
            verbose=True,
        )
        env_line = "DRIFTLINE_PROMETHEUS_URL={}"

    with _stop_signals() as stop:
        try:
            service.start()
        except ServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            endpoint = service.url if isinstance(service, RedisService) else service.endpoint
            print(endpoint, flush=True)
            print(f"export {env_line.format(endpoint)}", file=sys.stderr, flush=True)
            if isinstance(service, KafkaService) and service.sasl_scram_users:
                print(
                    "export DRIFTLINE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
                    f"DRIFTLINE_KAFKA_SASL_MECHANISM={service.sasl_mechanism}",
                    file=sys.stderr,
                )
                if service.tls:
                    print(
                        f"TLS (SASL_SSL): {service.tls_bootstrap_servers}, "
                        f"CA file {service.ca_file}",
                        file=sys.stderr,
                    )
            print("Ctrl-C or SIGTERM stops it.", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                if not service.running:
                    print(f"{service.name} exited on its own", file=sys.stderr)
                    for path in service._log_files():
                        print(_tail(path), file=sys.stderr)
                    return 1
        finally:
            service.stop()
            print(f"{service.name} stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
