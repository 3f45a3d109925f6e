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
from urllib.parse import urlsplit

from bench.bus import envelope

BATCH = 1000
_MARK = "@" * 12  # stands for the request id's counter in the template


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(parts.path)
    else:
        sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    if parts.password:
        sock.sendall(_command(b"AUTH", parts.password.encode()))
        if not sock.recv(64).startswith(b"+OK"):
            raise RuntimeError("AUTH refused")
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
            lines = 0
            while lines < 2 * BATCH:  # each answer: "$<n>\r\n<entry id>\r\n"
                data = sock.recv(1 << 20)
                if not data:
                    raise RuntimeError("Redis closed the connection")
                if data.startswith(b"-") or b"\r\n-" in data:
                    raise RuntimeError(f"Redis refused an XADD: {data[:200]!r}")
                lines += data.count(b"\r\n")
            sent += BATCH
    finally:
        sock.close()
    return sent, time.monotonic() - started


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
