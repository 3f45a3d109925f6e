"""HTTP benchmark: jarvisd's routes against a bare aiohttp JSON handler, in
the same run, measured with wrk (another process).

    python -m bench.http [--seconds 8] [--connections 50] [--many 1000] [--json FILE]

Prints req/s, p50 and p99 per route and its ratio to the bare handler
(GET /commands twice: served by the list cache, and on a daemon of its own
with the list cache off, every page read from the database), then
1,000 concurrent keep-alive connections on GET /cache/get/{key}. Needs wrk
(``apt-get install wrk``); says so and stops without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass

import aiohttp

from bench.daemon import BenchDaemon, bench_daemon, run_bench
from bench.light import keepalive_load
from bench.report import Report

BARE_PORT = 18500 + os.getpid() % 400


@dataclass
class Result:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+", "", text))
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000  # seconds


def wrk(url: str, seconds: float, connections: int, headers: dict[str, str]) -> Result:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    for key, value in headers.items():
        cmd += ["-H", f"{key}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(rate, p50, p99, errors, int(bad.group(1)) if bad else 0)


async def _users(base: str, token: str, args: argparse.Namespace) -> tuple[list[float], int]:
    """The keep-alive users, spread over two client processes."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.http",
            "--users-client",
            base,
            "--token",
            token,
            "--many",
            str(args.many // 2 + (i < args.many % 2)),
            "--user-rate",
            str(args.user_rate),
            "--seconds",
            str(args.seconds),
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(2)
    ]
    lat: list[float] = []
    errors = 0
    for proc in procs:
        out, _err = await proc.communicate()
        got = json.loads(out)
        lat += got["lat"]
        errors += got["errors"]
    return lat, errors


def bare_server(port: int) -> None:
    """The floor: aiohttp answering a small JSON document, nothing else."""
    from aiohttp import web

    body = b'{"status":"pass","n":1}'

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def _prepare(d: BenchDaemon) -> str:
    """A cached key, an agent and its token, and 60 of its commands; the token."""
    headers = {"Authorization": f"Bearer {d.token}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(
            f"{d.base}/cache/set", json={"key": "hot", "value": {"user": 7}, "ttl": 3600}
        ) as r:
            assert r.status == 200, await r.text()
        async with s.post(
            f"{d.base}/users", json={"username": "bench-agent", "role": "agent"}
        ) as r:
            agent = await r.json()
        async with s.post(f"{d.base}/users/{agent['id']}/tokens", json={"name": "bench"}) as r:
            agent_token: str = (await r.json())["token"]
        for i in range(60):
            async with s.post(
                f"{d.base}/commands",
                json={"action": f"act_{i % 4}", "description": "a benchmark command"},
                headers={"Authorization": f"Bearer {agent_token}"},
            ) as r:
                assert r.status == 201, await r.text()
    return agent_token


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.many * 4)), hard))
    bare = subprocess.Popen(  # noqa: ASYNC220 - once, at bench start
        [sys.executable, "-m", "bench.http", "--bare", str(BARE_PORT)]
    )
    try:
        async with bench_daemon(pg, redis_url) as d:
            agent_token = await _prepare(d)
            auth = {"Authorization": f"Bearer {agent_token}"}
            routes = [
                ("bare aiohttp JSON handler", f"http://127.0.0.1:{BARE_PORT}/", {}),
                ("GET /health/live", f"{d.base}/health/live", {}),
                ("GET /health/ready", f"{d.base}/health/ready", {}),
                ("GET /cache/get/{key} (API token)", f"{d.base}/cache/get/hot", auth),
                ("GET /commands?limit=50 (API token)", f"{d.base}/commands?limit=50", auth),
            ]
            results = []
            for name, url, hdrs in routes:
                wrk(url, 1, args.connections, hdrs)  # warm up
                results.append((name, wrk(url, args.seconds, args.connections, hdrs)))
            many = wrk(f"{d.base}/cache/get/hot", args.seconds, args.many, auth)
            users = await _users(d.base, agent_token, args)
        # Every list read from the database: a daemon with the list cache off.
        async with bench_daemon(pg, redis_url, HTTP__LIST_CACHE_TTL="0") as d:
            auth = {"Authorization": f"Bearer {await _prepare(d)}"}
            url = f"{d.base}/commands?limit=50"
            wrk(url, 1, args.connections, auth)  # warm up
            name = "GET /commands?limit=50 (API token), list cache off"
            results.append((name, wrk(url, args.seconds, args.connections, auth)))
    finally:
        bare.terminate()
        bare.wait(10)
    print(f"wrk -t1 -c{args.connections}, {args.seconds:g} s each, same run:")
    floor_name, floor = results[0]  # the bare handler
    for name, res in results:
        note = f"{res.errors} errors, {res.non_2xx} non-2xx" if res.errors or res.non_2xx else None
        for what, unit, value, floor_value in (
            ("rate", "req/s", res.rate, floor.rate),
            ("p50", "ms", res.p50_ms, floor.p50_ms),
            ("p99", "ms", res.p99_ms, floor.p99_ms),
        ):
            report.add(
                f"{name} {what}",
                value,
                unit,
                floor=None if res is floor else floor_value,
                floor_name=None if res is floor else floor_name,
                note=note if what == "rate" else None,
            )
    lat, errors = users
    lat.sort()
    print(
        f"{args.many} concurrent keep-alive connections on GET /cache/get/{{key}}, "
        f"each asking {args.user_rate:g} times a second ({args.many * args.user_rate:,.0f} req/s):"
    )
    label = f"{args.many} keep-alive users, GET /cache/get/{{key}}"
    report.add(f"{label} answers", len(lat), "answers", note=f"{errors} errors")
    report.add(f"{label} p50", lat[len(lat) // 2], "ms")
    report.add(f"{label} p99", lat[int(len(lat) * 0.99)], "ms")
    report.add(f"{label} max", lat[-1], "ms")
    print(f"{args.many} connections asking as fast as they can (wrk -c{args.many}):")
    label = f"wrk -c{args.many} GET /cache/get/{{key}}"
    note = f"{many.errors} socket errors, {many.non_2xx} non-2xx"
    report.add(f"{label} rate", many.rate, "req/s", note=note)
    report.add(f"{label} p50", many.p50_ms, "ms")
    report.add(f"{label} p99", many.p99_ms, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--many", type=int, default=1000)
    parser.add_argument("--user-rate", type=float, default=5.0)
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--users-client", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_server(args.bare)
        return
    if args.users_client:
        lat, errors = asyncio.run(
            keepalive_load(
                args.users_client,
                "/cache/get/hot",
                args.token,
                args.many,
                args.user_rate,
                args.seconds,
            )
        )
        print(json.dumps({"lat": lat, "errors": errors}))
        return
    if shutil.which("wrk") is None:
        print("bench.http: wrk is not installed (apt-get install wrk); skipped")
        return
    run_bench(
        "http",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
