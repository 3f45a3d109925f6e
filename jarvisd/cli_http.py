"""One HTTP/1.1 request from the command line to the running daemon, over
its Unix socket or TCP, with the standard library's sockets alone: a CLI
call need not load an HTTP client library (aiohttp takes a quarter of a
second to import) nor an event loop, for a request and an answer of a few
kilobytes.

The request says ``Connection: close``; the answer is read until the
daemon closes the connection (``Content-Length`` or chunked framing then
says where the body ends), at most ``MAX_ANSWER`` bytes.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MAX_ANSWER", "Answer", "request"]

MAX_ANSWER = 64 * 1024 * 1024


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def request(
    socket_path: str | None,
    base: str,
    method: str,
    path: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> Answer:
    """``method path`` to the daemon at ``socket_path`` (a Unix socket) or
    ``base`` (``http://host:port``), blocking, within ``timeout`` seconds in
    all. Connection errors are raised as they come (OSError): the caller says
    where it tried."""
    url = urlsplit(base)
    deadline = time.monotonic() + timeout
    if socket_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((url.hostname, url.port or 80), timeout=timeout)
    with sock:
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {url.netloc or 'localhost'}",
            "Connection: close",
            "Accept: application/json",
            f"Content-Length: {len(payload)}",
        ]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        data = bytearray()
        while True:  # Connection: close — the answer ends with the connection
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_ANSWER:
                raise ValueError(f"an answer over {MAX_ANSWER} bytes")
    head, sep, rest = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError("the daemon closed the connection before answering")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    found = {
        k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)
    }
    if found.get("transfer-encoding", "").lower() == "chunked":
        rest = _unchunk(rest)
    elif "content-length" in found:
        rest = rest[: int(found["content-length"])]
    return Answer(status, found, rest)


def _unchunk(raw: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[:size]
        raw = raw[size + 2 :]
