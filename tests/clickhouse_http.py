"""A small server that answers ClickHouse's HTTP interface by running the real engine (chdb).

Tests use it to drive TRAIL's store code over real HTTP with the production client
(clickhouse-connect `get_client(host=..., port=...)`), compression on and off, and to
simulate an outage: it runs in a child process (`ClickHouseHTTPProcess`) that a test can
kill and start again on the same port and data directory. A child process is also what
chdb needs: it serves one data directory per process, and the test process may already
hold another one through the embedded store.

What it implements of https://clickhouse.com/docs/interfaces/http, as clickhouse-connect
1.12 uses it:

* `GET /ping` -> `Ok.`;  `GET|POST /?query=...` and `POST /` with the SQL in the body, or the
  statement in `query` and the data in the body (ClickHouse joins them);
* `INSERT INTO t (cols) FORMAT <fmt>` followed by the data, streamed into chdb's
  `send_insert` (any input format, e.g. Native or Arrow);
* request bodies with `Content-Length` or `Transfer-Encoding: chunked`, and
  `Content-Encoding: lz4` (a concatenation of LZ4 frames, one per insert block: every frame
  is decompressed), `gzip`, `deflate`;
* response compression when `enable_http_compression` is on (the request's parameter, else
  the engine's default) and `Accept-Encoding` names a method it knows (lz4, gzip, deflate);
* `database`, `default_format`, `param_<name>` (server-side bind parameters), other URL
  parameters applied as settings (`SET name = value`), `session_id` (a chdb connection kept
  per session), `query_id`;
* the response headers the client reads: `X-ClickHouse-Format`, `X-ClickHouse-Summary`,
  `X-ClickHouse-Query-Id`, `X-ClickHouse-Timezone`, `X-ClickHouse-Exception-Code` with the
  engine's `Code: N. DB::Exception: ...` body and an HTTP status from the error code;
* optional Basic / X-ClickHouse-User authentication (`--user/--password`);
* `GET /_traffic` (not ClickHouse): counters of what it received (requests, chunked bodies,
  lz4 frames, encodings), so tests can assert that compression really happened.

Run by hand: `python tests/clickhouse_http.py --path /tmp/ch --port 8123`.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

# URL parameters that steer the HTTP layer rather than the query (not applied with SET).
TRANSPORT_PARAMS = {
    "query", "database", "default_format", "session_id", "session_timeout", "session_check",
    "query_id", "quota_key", "wait_end_of_query", "compress", "decompress", "buffer_size",
    "enable_http_compression", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "cancel_http_readonly_queries_on_client_close", "client_protocol_version", "user", "password",
    "role", "http_zlib_compression_level",
}
RESULT_STATEMENTS = ("SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXISTS", "EXPLAIN", "CHECK", "(")
_INSERT = re.compile(rb"^\s*INSERT\s+INTO\s+(?P<target>.+?)\s+FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)[ \t]*(?:\r?\n)?", re.I | re.S)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.I)
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")
_STATUS_BY_CODE = {60: 404, 81: 404, 62: 400, 47: 400, 46: 400, 27: 400, 516: 401, 497: 403, 241: 500}
_SESSIONS_MAX = 64


class EngineError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Traffic:
    """What the server saw, for tests to assert on (GET /_traffic returns it as JSON)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


def decompress_body(body: bytes, encoding: str | None, traffic: Traffic | None = None) -> bytes:
    """Undo Content-Encoding. lz4 bodies are concatenated frames: decode them all."""
    encoding = (encoding or "").strip().lower()
    if not encoding or encoding == "identity":
        return body
    if encoding == "lz4":
        import lz4.frame

        out = bytearray()
        rest = body
        frames = 0
        while rest:
            d = lz4.frame.LZ4FrameDecompressor()
            out += d.decompress(rest)
            if not d.eof:
                raise EngineError("Code: 432. DB::Exception: truncated lz4 frame in request body. (UNKNOWN_CODEC)", 432)
            rest = d.unused_data
            frames += 1
        if traffic is not None:
            traffic.add("lz4_frames", frames)
        return bytes(out)
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise EngineError(f"unsupported Content-Encoding {encoding!r}", 48)


def compress_body(body: bytes, accept: str) -> tuple[bytes, str | None]:
    for enc in (e.strip().split(";")[0].lower() for e in accept.split(",")):
        if enc == "lz4":
            import lz4.frame

            return lz4.frame.compress(body), "lz4"
        if enc == "gzip":
            return gzip.compress(body), "gzip"
        if enc == "deflate":
            return zlib.compress(body), "deflate"
    return body, None


def _setting_literal(value: str) -> str:
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    """chdb behind a lock; one connection per HTTP session, a fresh one per sessionless request."""

    def __init__(self, path: str):
        import chdb

        self._chdb = chdb
        self.path = str(Path(path).resolve())
        Path(self.path).mkdir(parents=True, exist_ok=True)
        self._base = chdb.connect(self.path)  # keeps the engine up between requests
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, object] = OrderedDict()
        self.timezone = self._base.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()
        # Like a server's users.xml profile: the engine's value applies when a request does not set it.
        self.http_compression_default = self._base.query(
            "SELECT value FROM system.settings WHERE name = 'enable_http_compression'", "TabSeparated"
        ).bytes().decode().strip() == "1"

    def _handle(self, session_id: str | None):
        if not session_id:
            return self._chdb.connect(self.path), True
        conn = self._sessions.get(session_id)
        if conn is None:
            conn = self._chdb.connect(self.path)
            self._sessions[session_id] = conn
            while len(self._sessions) > _SESSIONS_MAX:
                _, old = self._sessions.popitem(last=False)
                old.close()
        self._sessions.move_to_end(session_id)
        return conn, False

    def run(self, *, sql: str, data: bytes | None, insert: tuple[str, str] | None, database: str | None,
            settings: dict[str, str], bind: dict[str, str], fmt: str, session_id: str | None) -> tuple[bytes, dict]:
        with self._lock:
            conn, temporary = self._handle(session_id)
            try:
                if database:
                    self._query(conn, f"USE `{database}`", "TabSeparated", {})
                for name, value in settings.items():
                    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                        raise EngineError(f"Code: 115. DB::Exception: Unknown setting {name!r}. (UNKNOWN_SETTING)", 115)
                    self._query(conn, f"SET {name} = {_setting_literal(value)}", "TabSeparated", {})
                if insert is not None:
                    target, in_fmt = insert
                    try:
                        with conn.send_insert(f"INSERT INTO {target}", in_fmt) as inserter:
                            if data:
                                inserter.append(data)
                            res = inserter.finish()
                    except RuntimeError as ex:
                        raise self._error(ex) from None
                    return b"", {"written_rows": str(res.rows_written), "written_bytes": str(res.bytes_written)}
                res = self._query(conn, sql, fmt, bind)
                summary = {"read_rows": str(res.rows_read()), "read_bytes": str(res.bytes_read()),
                           "written_rows": str(getattr(res, "rows_written", lambda: 0)()),
                           "result_rows": "0"}
                return res.bytes() or b"", summary
            finally:
                if temporary:
                    conn.close()

    def _query(self, conn, sql: str, fmt: str, bind: dict[str, str]):
        try:
            return conn.query(sql, fmt, params=bind)
        except Exception as ex:
            raise self._error(ex) from None

    @staticmethod
    def _error(ex: Exception) -> EngineError:
        message = str(ex)
        m = _ERROR_CODE.search(message)
        return EngineError(message, int(m.group(1)) if m else 1002)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb-http-test"
    engine: Engine
    traffic: Traffic
    credentials: tuple[str, str] | None = None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        if os.environ.get("CLICKHOUSE_HTTP_LOG"):
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(b"")

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(200, b"", {"Content-Type": "text/plain"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            body = self._read_body()
        except (ValueError, ConnectionError) as ex:
            self._reply(400, f"bad request body: {ex}\n".encode(), {})
            return
        self._serve(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.traffic.add("chunked_requests")
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorised(self, params: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        user, password = params.get("user"), params.get("password")
        if "X-ClickHouse-User" in self.headers:
            user, password = self.headers["X-ClickHouse-User"], self.headers.get("X-ClickHouse-Key", "")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return (user, password or "") == self.credentials

    def _serve(self, body: bytes) -> None:
        url = urlparse(self.path)
        if url.path.rstrip("/") == "/ping":
            self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        if url.path == "/_traffic":
            self._reply(200, json.dumps(self.traffic.snapshot()).encode(), {"Content-Type": "application/json"})
            return
        if url.path not in ("/", ""):
            self._reply(404, b"There is no handle " + url.path.encode() + b"\n", {})
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": self.engine.timezone,
                   "X-ClickHouse-Server-Display-Name": "chdb-http-test"}
        if not self._authorised(params):
            headers["X-ClickHouse-Exception-Code"] = "516"
            self._reply(401, b"Code: 516. DB::Exception: default: Authentication failed. (AUTHENTICATION_FAILED)\n", headers)
            return
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            headers["X-ClickHouse-Exception-Code"] = "48"
            self._reply(501, b"Code: 48. DB::Exception: external data is not implemented by this test server. (NOT_IMPLEMENTED)\n", headers)
            return
        self.traffic.add("requests")
        if self.headers.get("Content-Encoding"):
            self.traffic.add(f"request_encoding_{self.headers['Content-Encoding']}")
        try:
            body = decompress_body(body, self.headers.get("Content-Encoding"), self.traffic)
            out, fmt, summary = self._execute(params, body)
        except EngineError as ex:
            headers["X-ClickHouse-Exception-Code"] = str(ex.code)
            self._reply(_STATUS_BY_CODE.get(ex.code, 500), str(ex).encode() + b"\n", headers)
            self.traffic.add("errors")
            return
        headers["X-ClickHouse-Summary"] = json.dumps(summary)
        if fmt:
            headers["X-ClickHouse-Format"] = fmt
        headers["Content-Type"] = "text/plain; charset=UTF-8" if fmt and fmt.startswith(("TabSeparated", "TSV", "CSV", "JSON")) else "application/octet-stream"
        compress = params.get("enable_http_compression", "1" if self.engine.http_compression_default else "0") == "1"
        if compress and out:
            out, encoding = compress_body(out, self.headers.get("Accept-Encoding", ""))
            if encoding:
                headers["Content-Encoding"] = encoding
                self.traffic.add(f"response_encoding_{encoding}")
        self._reply(200, out, headers)

    def _execute(self, params: dict[str, str], body: bytes) -> tuple[bytes, str | None, dict]:
        statement = params.get("query", "")
        settings = {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")}
        bind = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        common = {"database": params.get("database"), "settings": settings, "bind": bind,
                  "session_id": params.get("session_id")}
        default_fmt = params.get("default_format") or "TabSeparated"
        if statement:
            m = _INSERT.match(statement.encode())
            if m and m.end() >= len(statement.encode().rstrip()):
                insert = (m.group("target").decode(), m.group("fmt").decode())
                out, summary = self.engine.run(sql="", data=body, insert=insert, fmt=default_fmt, **common)
                return out, None, summary
            sql = statement + ("\n" + body.decode() if body else "")
        else:
            m = _INSERT.match(body)
            if m:
                insert = (m.group("target").decode(), m.group("fmt").decode())
                out, summary = self.engine.run(sql="", data=body[m.end():], insert=insert, fmt=default_fmt, **common)
                return out, None, summary
            sql = body.decode()
        if not sql.strip():
            raise EngineError("Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)", 62)
        trailing = _TRAILING_FORMAT.search(sql)
        fmt = trailing.group(1) if trailing else default_fmt
        out, summary = self.engine.run(sql=sql, data=None, insert=None, fmt=default_fmt, **common)
        produces_rows = trailing is not None or sql.lstrip().upper().startswith(RESULT_STATEMENTS)
        return out, fmt if produces_rows else None, summary

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def make_server(path: str, host: str = "127.0.0.1", port: int = 0,
                credentials: tuple[str, str] | None = None) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"engine": Engine(path), "traffic": Traffic(), "credentials": credentials})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class ClickHouseHTTPProcess:
    """The server in a child process: start, kill (an outage), start again on the same port."""

    def __init__(self, path: str | Path, port: int = 0, user: str | None = None, password: str | None = None):
        self.path = str(path)
        self.port = port
        self.user, self.password = user, password
        self.proc: subprocess.Popen | None = None
        self.log_path = f"{Path(self.path).resolve()}.server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ClickHouseHTTPProcess:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--path", self.path, "--port", str(self.port)]
        if self.user is not None:
            cmd += ["--user", self.user, "--password", self.password or ""]
        deadline = time.monotonic() + timeout
        while True:
            # stderr goes to a file: an unread pipe would fill up and stall the server
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
            line = self.proc.stdout.readline()
            if line.startswith("LISTENING "):
                self.port = int(line.split()[1])
                break
            self.proc.wait()
            err = Path(self.log_path).read_text(errors="replace")
            # a restarted server may find its port (or chdb its data dir) not yet released
            if time.monotonic() > deadline or "Address already in use" not in err and "EmbeddedServer" not in err:
                raise RuntimeError(f"clickhouse_http did not start: {err[-2000:]}")
            time.sleep(0.2)
        while not self.ping():
            if time.monotonic() > deadline:
                raise RuntimeError("clickhouse_http started but does not answer /ping")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                return r.read() == b"Ok.\n"
        except OSError:
            return False

    def traffic(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_traffic", timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        """SIGKILL: an abrupt outage (what a crashed server looks like to clients)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_pipes()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> ClickHouseHTTPProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Answer ClickHouse's HTTP interface with the chdb engine (for tests).")
    ap.add_argument("--path", required=True, help="chdb data directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as 'LISTENING <port>')")
    ap.add_argument("--user", help="require this user (Basic auth or X-ClickHouse-User)")
    ap.add_argument("--password", default="")
    args = ap.parse_args(argv)
    server = make_server(args.path, args.host, args.port, (args.user, args.password) if args.user else None)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
