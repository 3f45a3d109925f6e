"""Long-poll benchmark: many waiters, each released by one decision.

    python -m bench.approvals [--waiters 1000] [--rate 200] [--json FILE]

A separate `jarvisd run` holds ``--waiters`` pending approval requests, each
with one `GET /approvals/{id}?wait=55` waiting on its own keep-alive
connection (opened by a reader process with a bare asyncio HTTP client, so
that the measuring side costs microseconds). The main process then approves
them one by one at ``--rate`` decisions a second, in shuffled order, and
notes when each `PUT /approvals/{id}/approve` was sent and answered. The
reader notes when each waiter's answer arrived (one monotonic clock for
every process on the host).

Prints, per decision: decision sent → waiter answered (the figure the
target is about: p99 < 100 ms), and the floor measured in the same run, the
decision's own round trip (sent → PUT answered: nothing can be released
before the decision is committed), and what the waiter costs on top of it.

Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from bench.bus import pct
from bench.daemon import bench_daemon, run_bench
from bench.report import Report


# -- the reader process ----------------------------------------------------------------------
async def hold_waiters(
    base: str, token: str, ids: list[int], clock: Callable[[], float] = time.perf_counter
) -> dict[int, float]:
    """One raw keep-alive connection per id with a long-poll in flight; the
    ``clock()`` at which each complete answer arrived, by id."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    answered: dict[int, float] = {}

    async def one(approval_id: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET /approvals/{approval_id}?wait=55 HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        answered[approval_id] = clock()
        if b'"approved"' not in body:
            raise RuntimeError(f"approval {approval_id}: {head[:40]!r} {body[:200]!r}")
        writer.close()

    tasks = [asyncio.create_task(one(i)) for i in ids]
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    return answered


# -- the main process ----------------------------------------------------------------------------
async def setup(base: str, admin: str, n: int) -> tuple[str, str, list[int]]:
    """A requester with ``n`` pending requests, an approver: (tokens, ids)."""
    headers = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession(base_url=base, headers=headers) as s:
        tokens = []
        for name, role in (("requester", "user"), ("approver", "approver")):
            async with s.post("/users", json={"username": name, "role": role}) as resp:
                user = await resp.json()
            async with s.post(f"/users/{user['id']}/tokens", json={"name": "bench"}) as resp:
                tokens.append((await resp.json())["token"])
    ids: list[int] = []
    headers = {"Authorization": f"Bearer {tokens[0]}"}
    async with aiohttp.ClientSession(base_url=base, headers=headers) as s:

        async def make(k: int) -> None:
            for _ in range(k):
                body = {"action": "transfer_money", "riskScore": 80, "expiresIn": 3600}
                async with s.post("/approvals", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                    ids.append((await resp.json())["id"])

        await asyncio.gather(*(make(n // 10 + (i < n % 10)) for i in range(10)))
    return tokens[0], tokens[1], ids


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    async with bench_daemon(pg, redis_url) as d:
        requester, approver, ids = await setup(d.base, d.token, args.waiters)
        reader = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.approvals",
            "--hold",
            d.base,
            "--token",
            requester,
            "--ids",
            ",".join(map(str, ids)),
            stdout=asyncio.subprocess.PIPE,
        )
        assert reader.stdout is not None
        assert (await reader.stdout.readline()).strip() == b"ready"
        headers = {"Authorization": f"Bearer {approver}"}
        connector = aiohttp.TCPConnector(limit=20)
        async with aiohttp.ClientSession(
            base_url=d.base, headers=headers, connector=connector
        ) as s:
            async with asyncio.timeout(60):
                while True:
                    async with s.get("/stats") as resp:
                        stats = await resp.json()
                    if stats["actors"]["approvals"]["approvals"]["waiting"] >= len(ids):
                        break
                    await asyncio.sleep(0.1)
            sent: dict[int, float] = {}
            done: dict[int, float] = {}

            async def decide(approval_id: int) -> None:
                sent[approval_id] = time.perf_counter()
                async with s.put(f"/approvals/{approval_id}/approve") as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                done[approval_id] = time.perf_counter()

            order = ids[:]
            random.Random(7).shuffle(order)  # noqa: S311 - an order, not a secret
            start = time.perf_counter()
            pending = []
            for k, approval_id in enumerate(order):
                delay = start + k / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(decide(approval_id)))
            await asyncio.gather(*pending)
        out, _ = await reader.communicate()
        answered = {int(k): v for k, v in json.loads(out.decode().splitlines()[-1]).items()}
    to_answer = [(answered[i] - sent[i]) * 1000 for i in ids]
    floor = [(done[i] - sent[i]) * 1000 for i in ids]
    extra = [(answered[i] - done[i]) * 1000 for i in ids]
    print(f"{len(ids)} long-poll waiters, {args.rate:g} decisions/s, one decision each")
    print("(floor: the decision's own round trip, PUT sent → PUT answered)")
    stats = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
    for what, q in stats:
        value = pct(to_answer, q)
        target = f"target p99 < 100 ms: {'met' if value < 100 else 'NOT met'}"
        report.add(
            f"decision sent→waiter answered {what}",
            value,
            "ms",
            floor=pct(floor, q),
            floor_name=f"decision round trip {what}",
            note=target if what == "p99" else None,
        )
    for what, q in stats:
        report.add(f"decision round trip {what}", pct(floor, q), "ms")
    for what, q in stats:
        report.add(f"waiter answered after PUT answered {what}", pct(extra, q), "ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="decisions a second")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--hold", help=argparse.SUPPRESS)  # the reader process
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        ids = [int(i) for i in args.ids.split(",")]
        answered = asyncio.run(hold_waiters(args.hold, args.token, ids))
        print(json.dumps(answered))
        return
    run_bench(
        "approvals",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
