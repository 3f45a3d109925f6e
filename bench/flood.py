"""A publish flood from several processes: each XADDs envelopes onto the
inbox as fast as Redis takes them, over its own connection, with the
commands pre-encoded in RESP (the client library would be the bottleneck:
one redis-py producer reaches about a third of what Redis takes).

Every envelope has a unique request id ``flood-{process}-{n}``; each process
returns how many Redis acknowledged, and how fast.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from urllib.parse import parse_qsl, unquote, urlsplit

from bench.bus import envelope

BATCH = 1000
_MARK = "@" * 12  # stands for the request id's counter in the template


def _connect(url: str) -> socket.socket:
    """A plain connection as the URL says (unix:// or redis://, user,
    password, database); TLS is not for a local benchmark."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(parts.path)
        database = dict(parse_qsl(parts.query)).get("db", "0")
    elif parts.scheme == "redis":
        sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
        database = parts.path.strip("/") or "0"
    else:
        raise ValueError(f"the flood speaks redis:// and unix:// only, not {parts.scheme}://")
    setup: list[tuple[bytes, ...]] = []
    if parts.password:
        user = [unquote(parts.username).encode()] if parts.username else []
        setup.append((b"AUTH", *user, unquote(parts.password).encode()))
    if database != "0":
        setup.append((b"SELECT", database.encode()))
    for args in setup:
        sock.sendall(_command(*args))
        if not sock.recv(256).startswith(b"+OK"):
            raise RuntimeError(f"Redis refused {args[0].decode()}")
    return sock


def _command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _produce(url: str, stream: str, tag: str, seconds: float, rate: float) -> tuple[int, float]:
    """XADD at up to ``rate`` a second until ``seconds`` have passed; return
    how many were acknowledged, and in how many seconds."""
    sock = _connect(url)
    value = envelope(f"flood-{tag}-{_MARK}")
    encoded = _command(b"XADD", stream.encode(), b"*", b"envelope", value)
    head, tail = encoded.split(_MARK.encode())
    sent = 0
    started = time.monotonic()
    deadline = started + seconds
    try:
        while (now := time.monotonic()) < deadline:
            ahead = started + sent / rate - now
            if ahead > 0:
                time.sleep(ahead)
            batch = b"".join([head + b"%012d" % n + tail for n in range(sent, sent + BATCH)])
            sock.sendall(batch)
            _answers(sock, BATCH)
            sent += BATCH
    finally:
        sock.close()
    return sent, time.monotonic() - started


def _answers(sock: socket.socket, n: int) -> None:
    """Read the answers to ``n`` XADDs: each "$<len>\r\n<entry id>\r\n" (an
    entry id never starts with "-"; an error line does)."""
    answers = bytearray()
    while answers.count(b"\r\n") < 2 * n:
        data = sock.recv(1 << 20)
        if not data:
            raise RuntimeError("Redis closed the connection")
        answers += data
    if answers.startswith(b"-") or b"\r\n-" in answers:
        raise RuntimeError(f"Redis refused an XADD: {bytes(answers[:200])!r}")


def flood(url: str, stream: str, processes: int, seconds: float, rate: float) -> tuple[int, float]:
    """XADD from ``processes`` processes for ``seconds``, ``rate`` a second in
    all at most; the total acknowledged, and the rate they achieved."""
    ctx = multiprocessing.get_context("spawn")
    share = rate / processes
    with ctx.Pool(processes) as pool:
        counts = pool.starmap(
            _produce, [(url, stream, str(p), seconds, share) for p in range(processes)]
        )
    return sum(n for n, _s in counts), sum(n / s for n, s in counts)
