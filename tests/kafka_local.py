#!/usr/bin/env python3
"""Run a real single-node Apache Kafka broker (KRaft, broker+controller) on 127.0.0.1.

No Docker needed: the broker jars come from Maven Central through ``tests/kafka/pom.xml`` and
run on the machine's Java 17+. Standard library only, so it works before the venv exists.

    python tests/kafka_local.py start [--port P] [--fresh] [--no-wait]
    python tests/kafka_local.py wait [--timeout S]
    python tests/kafka_local.py status
    python tests/kafka_local.py stop [--keep-data] [--kill]
    python tests/kafka_local.py run [--port P] -- CMD ARGS...   # start, wait, run, always stop

``run`` exports ``KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:P`` to CMD and exits with CMD's exit code.
The default port is 19092 (controller 19093); ``--port`` or ``KAFKA_LOCAL_PORT`` overrides it.
Keep ports below the kernel's ephemeral range (32768-60999 on Linux): while the broker is down,
a client reconnecting to a port inside that range can end up connected to itself (TCP
self-connect) and hold the port, so the restarted broker cannot bind it.

State lives in ``REPO/.kafka/`` (``KAFKA_LOCAL_HOME`` overrides it): ``kafka.pid``,
``kafka.log``, ``server.properties`` and the data dir ``data/``. ``stop`` deletes the data dir;
``stop --keep-data`` keeps it and the next ``start`` reuses it on the same port (a broker
restart that keeps every topic, offset and transaction), unless ``start --fresh``.

Importable too (tests restart the broker mid-stream with it)::

    from kafka_local import LocalKafka
    kafka = LocalKafka()            # same state dir as the CLI, so it controls a CLI-started broker
    kafka.start()                   # -> True if this call started it; waits until ready
    kafka.stop(keep_data=True)      # or kill=True for a SIGKILL crash
    kafka.start()                   # same port, same data
    kafka.stop()

A second, separate broker with a SASL_SSL listener (SCRAM-SHA-512, certificates made with
openssl, StandardAuthorizer; see :class:`SaslSsl` and :func:`create_acls`)::

    tls = SaslSsl(home / "tls", {"admin": "pw", "router": "pw2"}); tls.make_certs()
    secure = LocalKafka(home, port=19492, secure=tls)   # its own home, data dir and ports
    secure.start()
    create_acls(secure.probe_port, [Acl("topic", "orders", "User:router", "read")])
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KAFKA_DIR = REPO / "tests" / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"
LIB_DIR = KAFKA_DIR / "lib"
LIB_MARKER = LIB_DIR / ".complete"  # written only after a successful download
DEFAULT_PORT = 19092
HOST = "127.0.0.1"
JVM_OPTS = [
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


# Brokers started here run on after the LocalKafka that started them is gone (by design: the
# pid file is how they are found again). Holding their Popen objects until exit keeps
# Popen.__del__ from reporting them as leaked subprocesses (a ResourceWarning).
_DETACHED: list[subprocess.Popen[bytes]] = []


class KafkaLocalError(RuntimeError):
    """The local broker could not be set up, started, reached or stopped."""


def _say(msg: str) -> None:
    print(f"kafka_local: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Java and the broker jars


def find_java() -> str:
    """Path of a Java 17+ ``java``; raises KafkaLocalError with a fix if there is none."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise KafkaLocalError(
            "java not found: Kafka 4.x needs a Java 17+ runtime on PATH or in JAVA_HOME "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if m:
        major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)
        if major < 17:
            raise KafkaLocalError(f"{java} is Java {major}; Kafka 4.x needs Java 17 or newer")
    return java


def _lib_stamp() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def jars_ready() -> bool:
    try:
        return LIB_MARKER.read_text().strip() == _lib_stamp()
    except OSError:
        return False


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_jars() -> None:
    """Copy the broker's runtime class path into tests/kafka/lib with Maven, once.

    A lib dir without a marker matching the current pom.xml (an interrupted or outdated
    download) is deleted and fetched again.
    """
    if jars_ready():
        return
    with _flock(REPO / ".kafka" / "lib.lock"):  # .kafka/ is gitignored
        if jars_ready():
            return
        mvn = shutil.which("mvn")
        if not mvn:
            raise KafkaLocalError(
                "mvn not found: Maven 3.x is needed once to fetch the Kafka broker jars from "
                "Maven Central (Debian: apt-get install maven)"
            )
        shutil.rmtree(LIB_DIR, ignore_errors=True)
        _say("fetching the Kafka broker jars with Maven (first run only)...")
        t0 = time.monotonic()
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={LIB_DIR}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, cwd=KAFKA_DIR, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(LIB_DIR, ignore_errors=True)
            raise KafkaLocalError(
                f"Maven could not fetch the broker jars (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr)[-4000:]
            )
        if not any(LIB_DIR.glob("kafka_2.13-*.jar")):
            raise KafkaLocalError(f"Maven succeeded but {LIB_DIR} has no kafka_2.13 jar")
        LIB_MARKER.write_text(_lib_stamp() + "\n")
        _say(f"jars ready in {LIB_DIR} ({time.monotonic() - t0:.1f}s)")


# --------------------------------------------------------------------------------------------
# A readiness probe that speaks the Kafka protocol (ApiVersions v0, then Metadata v1..v8)


def _kstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(v)

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return s


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    header = struct.pack(">hhi", api_key, version, corr) + _kstr("kafka-local-probe")
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    resp = _recv_exact(sock, size)
    if struct.unpack_from(">i", resp)[0] != corr:
        raise KafkaLocalError("probe: correlation id mismatch")
    return resp[4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def probe_metadata(host: str, port: int, timeout: float = 3.0) -> dict[str, object]:
    """One real Metadata request; returns ``{"brokers": [(id, host, port)], "cluster_id",
    "controller_id", "metadata_version"}``. Raises OSError/KafkaLocalError if not ready."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        r = _Reader(_request(sock, 18, 0, 1, b""))  # ApiVersions v0
        err = r.take(">h")
        if err:
            raise KafkaLocalError(f"ApiVersions error code {err}")
        ranges = {}
        for _ in range(r.take(">i")):
            key, lo, hi = r.take(">h"), r.take(">h"), r.take(">h")
            ranges[key] = (lo, hi)
        lo, hi = ranges.get(3, (0, -1))  # Metadata
        usable = [v for v in range(1, 9) if lo <= v <= hi]
        if not usable:
            raise KafkaLocalError(f"broker offers Metadata v{lo}..v{hi}, probe speaks v1..v8")
        ver = max(usable)
        body = struct.pack(">i", 0)  # no topics: brokers and controller only
        if ver >= 4:
            body += b"\x00"  # allow_auto_topic_creation
        if ver >= 8:
            body += b"\x00\x00"  # include cluster/topic authorized operations
        r = _Reader(_request(sock, 3, ver, 2, body))
        if ver >= 3:
            r.take(">i")  # throttle_time_ms
        brokers = []
        for _ in range(r.take(">i")):
            node_id = r.take(">i")
            bhost = r.string()
            bport = r.take(">i")
            r.string()  # rack
            brokers.append((node_id, bhost, bport))
        cluster_id = r.string() if ver >= 2 else None
        controller_id = r.take(">i")
        return {
            "brokers": brokers,
            "cluster_id": cluster_id,
            "controller_id": controller_id,
            "metadata_version": ver,
        }


# --------------------------------------------------------------------------------------------
# A SASL_SSL broker: certificates made here with openssl, SCRAM users, ACLs (CreateAcls v2)


@dataclasses.dataclass
class SaslSsl:
    """A broker whose client listener is SASL_SSL (SCRAM-SHA-512) with ACLs.

    ``users`` (name → password) get SCRAM-SHA-512 credentials at format time; ``admin`` is a
    super user. The certificates (``ca.pem``, and the broker's PKCS12 keystore with
    ``IP:127.0.0.1`` and ``DNS:localhost``) are made in ``tls_dir`` by :meth:`make_certs`.
    Controller and inter-broker traffic use PLAINTEXT listeners on loopback (ports +1 and +2);
    their principal, ``User:ANONYMOUS``, is a super user too, so :func:`create_acls` talks to
    the +2 port. ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found=false``: a user
    may do only what an ACL allows.
    """

    tls_dir: Path
    users: dict[str, str]
    admin: str = "admin"
    store_password: str = "broker-store-pass"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def keystore(self) -> Path:
        return self.tls_dir / "broker.p12"

    def make_certs(self) -> None:
        """A CA and a broker certificate it signs (openssl; a few hundred ms)."""
        openssl = shutil.which("openssl")
        if not openssl:
            raise KafkaLocalError("openssl not found: the SASL_SSL broker needs it for its certs")
        d = self.tls_dir
        d.mkdir(parents=True, exist_ok=True)
        ext = d / "broker.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        steps = [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=semroute-test-ca", "-keyout", "ca.key", "-out", "ca.pem"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "broker.key", "-out", "broker.csr"],
            ["x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "broker.ext", "-out", "broker.pem"],
            ["pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile",
             "ca.pem", "-name", "broker", "-out", "broker.p12", "-passout",
             f"pass:{self.store_password}"],
        ]  # fmt: skip
        for args in steps:
            proc = subprocess.run([openssl, *args], cwd=d, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KafkaLocalError(f"openssl {args[0]} failed: {proc.stderr[-2000:]}")

    def properties(self, port: int, controller_port: int) -> dict[str, str]:
        internal = port + 2
        return {
            "listeners": f"SASL_SSL://{HOST}:{port},INTERNAL://{HOST}:{internal},"
            f"CONTROLLER://{HOST}:{controller_port}",
            "advertised.listeners": f"SASL_SSL://{HOST}:{port},INTERNAL://{HOST}:{internal},"
            f"CONTROLLER://{HOST}:{controller_port}",
            "inter.broker.listener.name": "INTERNAL",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,"
            "SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.keystore),
            "ssl.keystore.password": self.store_password,
            "ssl.key.password": self.store_password,
            "ssl.client.auth": "none",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{self.admin};User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments that create every user's SCRAM credentials."""
        args = []
        for name, password in self.users.items():
            args += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
        return args


#: CreateAcls enums (org.apache.kafka.common.acl / resource).
ACL_RESOURCE = {"topic": 2, "group": 3, "cluster": 4, "transactional_id": 5}
ACL_OPERATION = {
    "all": 2, "read": 3, "write": 4, "create": 5, "delete": 6, "alter": 7, "describe": 8,
    "cluster_action": 9, "describe_configs": 10, "alter_configs": 11, "idempotent_write": 12,
}  # fmt: skip
ACL_PERMISSION = {"deny": 2, "allow": 3}
ACL_PATTERN = {"literal": 3, "prefixed": 4}


@dataclasses.dataclass(frozen=True)
class Acl:
    """One ACL binding, e.g. ``Acl("topic", "orders", "User:router", "write", "deny")``."""

    resource: str
    name: str
    principal: str
    operation: str
    permission: str = "allow"
    pattern: str = "literal"


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _compact_str(s: str) -> bytes:
    b = s.encode()
    return _uvarint(len(b) + 1) + b


def create_acls(port: int, acls: Sequence[Acl], host: str = HOST, timeout: float = 10.0) -> None:
    """Create ``acls`` with one CreateAcls v2 request (flexible versions, request header v2)
    over a PLAINTEXT connection whose principal may (a super user). Raises on any error."""
    body = _uvarint(len(acls) + 1)
    for a in acls:
        body += struct.pack(">b", ACL_RESOURCE[a.resource]) + _compact_str(a.name)
        body += struct.pack(">b", ACL_PATTERN[a.pattern]) + _compact_str(a.principal)
        body += _compact_str("*")
        body += struct.pack(">bb", ACL_OPERATION[a.operation], ACL_PERMISSION[a.permission])
        body += b"\x00"  # tagged fields of the creation
    body += b"\x00"  # tagged fields of the request
    header = struct.pack(">hhi", 30, 2, 7) + _kstr("kafka-local-acls") + b"\x00"
    msg = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(msg)) + msg)
        size = struct.unpack(">i", _recv_exact(sock, 4))[0]
        resp = _recv_exact(sock, size)
    r = _Reader(resp)
    if r.take(">i") != 7:
        raise KafkaLocalError("CreateAcls: correlation id mismatch")
    r.take(">b")  # response header v1: no tagged fields
    r.take(">i")  # throttle_time_ms
    count = r.take(">B") - 1  # compact array length (< 127 entries)
    for acl in acls[:count]:
        code = r.take(">h")
        n = r.take(">B") - 1
        message = r.data[r.pos : r.pos + max(n, 0)].decode()
        r.pos += max(n, 0)
        r.take(">b")  # tagged fields
        if code:
            raise KafkaLocalError(f"CreateAcls {acl}: error code {code} {message}")


# --------------------------------------------------------------------------------------------
# The broker


def _random_cluster_id() -> str:
    """A Kafka Uuid string (base64url of 16 random bytes, no padding, not starting with '-')."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not s.startswith("-"):
            return s


def _thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


class LocalKafka:
    """A single-node KRaft broker on 127.0.0.1 whose state lives in ``home`` (REPO/.kafka)."""

    def __init__(
        self,
        home: str | Path | None = None,
        port: int | None = None,
        *,
        secure: SaslSsl | None = None,
    ) -> None:
        self.home = Path(home or os.environ.get("KAFKA_LOCAL_HOME") or REPO / ".kafka")
        #: A SASL_SSL broker (SCRAM, ACLs) instead of the PLAINTEXT one; see :class:`SaslSsl`.
        self.secure = secure
        self.pid_file = self.home / "kafka.pid"
        self.port_file = self.home / "kafka.port"
        self.log_file = self.home / "kafka.log"
        self.config_file = self.home / "server.properties"
        self.data_dir = self.home / "data"
        self.kept_marker = self.home / "data.kept"
        self._explicit_port = port
        self._child: subprocess.Popen[bytes] | None = None
        self.why_not_running = ""

    # -- where -----------------------------------------------------------------------------

    def _recorded_port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def port(self) -> int:
        env = os.environ.get("KAFKA_LOCAL_PORT")
        return (
            self._explicit_port
            or self._recorded_port()
            or (int(env) if env else None)
            or DEFAULT_PORT
        )

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    # -- process ---------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The broker's pid if it is running (and is this home's broker), else None.

        ``self.why_not_running`` tells why None was returned."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            self.why_not_running = f"no pid file {self.pid_file}"
            return None
        if self._child is not None and self._child.pid == pid:
            # our own child: its exit status is the truth
            if self._child.poll() is None:
                return pid
            self.why_not_running = f"pid {pid} exited with {self._child.returncode}"
            return None
        state = _proc_state(pid)
        if state is None:
            self.why_not_running = f"pid {pid} does not exist"
            return None
        if state in ("Z", "X") and _thread_count(pid) <= 1:
            # a JVM's main thread can be a zombie while its other threads still hold the
            # sockets; dead means: no thread left
            self.why_not_running = f"pid {pid} is a zombie (exited)"
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if cmdline == [b""] or not cmdline:
            return pid  # exiting: its memory is gone but it still exists
        if b"kafka.Kafka" not in cmdline or str(self.config_file).encode() not in cmdline:
            self.why_not_running = f"pid {pid} is another program (a recycled pid)"
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def _server_properties(self, port: int, controller_port: int) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            # After a SIGKILL the restarted broker cannot register until the controller has
            # fenced its previous incarnation: keep that wait short (defaults 9 s / 2 s).
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "500",
        }
        if self.secure is not None:
            props.update(self.secure.properties(port, controller_port))
        lines = ["# Written by tests/kafka_local.py; rewritten on every start."]
        lines += [f"{k}={v}" for k, v in props.items()]
        return "\n".join(lines) + "\n"

    def start(self, *, wait: bool = True, timeout: float = 120.0, fresh: bool = False) -> bool:
        """Start the broker unless it already runs; returns True if this call started it.

        Reuses the data dir when the last stop was ``stop(keep_data=True)`` (same port as
        then), unless ``fresh``. Waits until a Metadata request succeeds unless ``wait=False``.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with _flock(self.home / "lock"):
            if self.is_running():
                if self._explicit_port and self._explicit_port != self._recorded_port():
                    raise KafkaLocalError(
                        f"a local broker already runs on port {self._recorded_port()} "
                        f"(pid {self.pid()}); stop it first"
                    )
                _say(f"already running on {self.bootstrap} (pid {self.pid()})")
                if wait:
                    self.wait(timeout)
                return False
            java = find_java()
            ensure_jars()
            reuse = self.kept_marker.exists() and self.data_dir.exists() and not fresh
            if reuse:
                kept_port = self._recorded_port()
                if self._explicit_port and kept_port and self._explicit_port != kept_port:
                    raise KafkaLocalError(
                        f"the kept data dir belongs to a broker on port {kept_port}; start it "
                        f"on that port or with --fresh"
                    )
                port = kept_port or self.port
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                env = os.environ.get("KAFKA_LOCAL_PORT")
                port = self._explicit_port or (int(env) if env else DEFAULT_PORT)
            self.kept_marker.unlink(missing_ok=True)
            controller_port = port + 1
            for p in self._ports(port):
                self._check_port_free(p)
            self.config_file.write_text(self._server_properties(port, controller_port))
            self.port_file.write_text(f"{port}\n")
            self._explicit_port = port
            base = [java, *JVM_OPTS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}"]
            base += [f"-Dkafka.logs.dir={self.home / 'logs'}", "-cp", str(LIB_DIR / "*")]
            log = open(self.log_file, "ab" if reuse else "wb")  # noqa: SIM115
            try:
                if not (self.data_dir / "meta.properties").exists():
                    fmt = [
                        *base[:1],
                        "-XX:TieredStopAtLevel=1",  # a short-lived JVM: C1 starts faster
                        *base[1:],
                        "kafka.tools.StorageTool",
                        "format",
                        "-t",
                        _random_cluster_id(),
                        "-c",
                        str(self.config_file),
                        "--standalone",
                        "--ignore-formatted",
                        *(self.secure.format_args() if self.secure is not None else []),
                    ]
                    proc = subprocess.run(fmt, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                    log.write(proc.stdout)
                    if proc.returncode != 0:
                        raise KafkaLocalError(
                            "kafka-storage format failed:\n" + proc.stdout.decode()[-3000:]
                        )
                log.write(f"\n===== kafka_local start {time.ctime()} =====\n".encode())
                log.flush()
                self._child = subprocess.Popen(
                    [*base, "kafka.Kafka", str(self.config_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.home,
                    start_new_session=True,  # survives this process; not hit by its Ctrl-C
                )
            finally:
                log.close()
            self.pid_file.write_text(f"{self._child.pid}\n")
            _DETACHED.append(self._child)  # outlives this handle on purpose: never a leak
        if wait:
            try:
                self.wait(timeout)
            except BaseException:
                self.stop(keep_data=reuse)  # do not leave a half-started broker behind
                raise
        return True

    def _ports(self, port: int) -> list[int]:
        """Client port, controller port (+1) and, for a secure broker, its internal one (+2)."""
        return [port, port + 1] + ([port + 2] if self.secure is not None else [])

    @property
    def probe_port(self) -> int:
        """The PLAINTEXT port the readiness probe (and :func:`create_acls`) talk to."""
        return self.port + 2 if self.secure is not None else self.port

    @staticmethod
    def _check_port_free(port: int, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace  # a broker that just died may still hold it
        while _port_open(port):
            if time.monotonic() > deadline:
                raise KafkaLocalError(
                    f"port {port} on {HOST} is already in use by another process; "
                    f"pick another with --port or KAFKA_LOCAL_PORT"
                )
            time.sleep(0.1)

    def wait(self, timeout: float = 120.0) -> dict[str, object]:
        """Block until a Metadata request to the broker succeeds; returns the probe result."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if not self.is_running():
                raise KafkaLocalError(
                    f"the broker is not running: {self.why_not_running} "
                    f"(see {self.log_file}):\n{self.log_tail()}"
                )
            try:
                meta = probe_metadata(HOST, self.probe_port)
                brokers = meta["brokers"]
                if isinstance(brokers, list) and any(b[2] == self.probe_port for b in brokers):
                    return meta
                last = KafkaLocalError(f"metadata lists no broker on port {self.port}: {meta}")
            except (OSError, KafkaLocalError, struct.error) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise KafkaLocalError(
                    f"broker not ready after {timeout:.0f}s ({last}); log:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, *, keep_data: bool = False, kill: bool = False, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``; ``kill`` = SIGKILL at
        once, like a crash). Deletes the data dir unless ``keep_data``. Returns True if a
        broker was running."""
        with _flock(self.home / "lock"):
            pid = self.pid()
            if pid is None and self.pid_file.exists():
                _say(f"not stopping: {self.why_not_running}")
            if pid is not None:
                os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while self.pid() is not None:
                    if time.monotonic() > deadline:
                        _say(f"broker (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
                        os.kill(pid, signal.SIGKILL)
                        deadline = time.monotonic() + 10
                    time.sleep(0.05)
                port = self._recorded_port() or self.port
                deadline = time.monotonic() + 10
                while any(map(_port_open, self._ports(port))) and time.monotonic() < deadline:
                    time.sleep(0.05)  # let the kernel close the dead broker's sockets
            if self._child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._child.wait(timeout=5)
                self._child = None
            self.pid_file.unlink(missing_ok=True)
            if keep_data:
                self.kept_marker.write_text("kept by stop --keep-data\n")
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                shutil.rmtree(self.home / "logs", ignore_errors=True)
                for f in (self.kept_marker, self.port_file, self.config_file):
                    f.unlink(missing_ok=True)
            return pid is not None

    def restart(self, *, kill: bool = False, timeout: float = 120.0) -> None:
        """Stop (keeping the data) and start again on the same port."""
        self.stop(keep_data=True, kill=kill)
        self.start(timeout=timeout)


# --------------------------------------------------------------------------------------------
# CLI


def _run(kafka: LocalKafka, cmd: Sequence[str], timeout: float) -> int:
    if not cmd:
        raise KafkaLocalError("run needs a command after --")
    t0 = time.monotonic()
    owned = not kafka.is_running()  # stop it at the end only if this run started it
    try:
        kafka.start(wait=False)
        kafka.wait(timeout)
        _say(f"broker ready on {kafka.bootstrap} in {time.monotonic() - t0:.1f}s")
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap}
        child = subprocess.Popen(list(cmd), env=env)

        def forward(signum: int, _frame: object) -> None:
            child.send_signal(signum)

        # Ctrl-C reaches CMD directly (same process group); wait for it to finish, then stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        return child.wait()
    finally:
        if owned:
            t1 = time.monotonic()
            kafka.stop()
            _say(f"broker stopped in {time.monotonic() - t1:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kafka_local.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start the broker in the background and wait")
    p_start.add_argument("--port", type=int, help=f"client port (default {DEFAULT_PORT})")
    p_start.add_argument("--fresh", action="store_true", help="ignore a kept data dir")
    p_start.add_argument("--no-wait", action="store_true", help="do not wait for readiness")
    p_start.add_argument("--timeout", type=float, default=120.0)
    p_stop = sub.add_parser("stop", help="stop the broker and delete its data")
    p_stop.add_argument("--keep-data", action="store_true", help="keep data for a restart")
    p_stop.add_argument("--kill", action="store_true", help="SIGKILL at once (a crash)")
    p_stop.add_argument("--timeout", type=float, default=30.0)
    sub.add_parser("status", help="exit 0 and print the bootstrap address if running")
    p_wait = sub.add_parser("wait", help="wait until a Metadata request succeeds")
    p_wait.add_argument("--timeout", type=float, default=120.0)
    p_run = sub.add_parser("run", help="start, wait, run CMD, always stop; CMD's exit code")
    p_run.add_argument("--port", type=int, help=f"client port (default {DEFAULT_PORT})")
    p_run.add_argument("--timeout", type=float, default=120.0)
    p_run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    sub.add_parser("jars", help="only fetch the broker jars (tests/kafka/lib)")
    args = parser.parse_args(argv)

    kafka = LocalKafka(port=getattr(args, "port", None))
    try:
        if args.command == "start":
            t0 = time.monotonic()
            kafka.start(wait=not args.no_wait, timeout=args.timeout, fresh=args.fresh)
            _say(f"ready in {time.monotonic() - t0:.1f}s (pid {kafka.pid()})")
            print(kafka.bootstrap)
        elif args.command == "stop":
            t0 = time.monotonic()
            was = kafka.stop(keep_data=args.keep_data, kill=args.kill, timeout=args.timeout)
            _say(f"stopped in {time.monotonic() - t0:.1f}s" if was else "was not running")
        elif args.command == "status":
            pid = kafka.pid()
            if pid is None:
                print("not running")
                return 1
            try:
                meta = probe_metadata(HOST, kafka.port)
                print(f"running pid={pid} bootstrap={kafka.bootstrap} metadata={meta}")
            except (OSError, KafkaLocalError, struct.error) as exc:
                print(f"starting pid={pid} bootstrap={kafka.bootstrap} (not answering: {exc})")
                return 2
        elif args.command == "wait":
            meta = kafka.wait(args.timeout)
            print(f"ready bootstrap={kafka.bootstrap} cluster_id={meta['cluster_id']}")
        elif args.command == "run":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return _run(kafka, cmd, args.timeout)
        elif args.command == "jars":
            find_java()
            ensure_jars()
    except KafkaLocalError as exc:
        _say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
