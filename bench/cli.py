"""How long a command of the CLI takes, start to exit, as a person waits.

    python -m bench.cli [--runs 20] [--json FILE]

Each command is run ``--runs`` times as a new process (`python -m jarvisd …`):
`version`, `--help`, and `approvals list` against a separate `jarvisd run`
(over TCP with the admin's token, with 50 pending requests). The
floor, measured in the same run, is the interpreter itself starting and
exiting (`python -c pass`). Targets: `version` and `--help` ≤ 0.1 s, a call
to the daemon ≤ 0.2 s (wall).

Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import aiohttp

from bench.bus import pct
from bench.daemon import BenchDaemon, bench_daemon, run_bench
from bench.report import Report

STATS = (("p50", 0.5), ("p90", 0.9), ("max", 1.0))


def timed(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall seconds of ``runs`` runs of ``argv``, each checked to succeed."""
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, check=False)
        out.append(time.perf_counter() - started)
        assert proc.returncode == 0, (argv, proc.stderr[-500:])
    return out


def daemon_env(d: BenchDaemon, redis_url: str) -> dict[str, str]:
    """The environment the bench daemon runs with: the CLI finds it by the
    same settings (its state directory records where it listens)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    env.update(
        JARVISD_POSTGRES__DSN=d.dsn,
        JARVISD_REDIS__URL=redis_url,
        JARVISD_REDIS__PREFIX=d.prefix,
        JARVISD_DAEMON__STATE_DIR=d.folder,
        JARVISD_HTTP__PORT=str(d.port),
        JARVISD_TOKEN=d.token,  # the admin's, over TCP (the bench daemon has no Unix socket)
    )
    return env


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    py = sys.executable
    bare = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    floor = timed([py, "-c", "pass"], args.runs, bare)
    figures = {
        "jarvisd version": timed([py, "-m", "jarvisd", "version"], args.runs, bare),
        "jarvisd --help": timed([py, "-m", "jarvisd", "--help"], args.runs, bare),
    }
    async with bench_daemon(pg, redis_url) as d:
        headers = {"Authorization": f"Bearer {d.token}"}
        async with aiohttp.ClientSession(base_url=d.base, headers=headers) as s:
            async with s.post("/users", json={"username": "asker", "role": "user"}) as resp:
                user = await resp.json()
            async with s.post(f"/users/{user['id']}/tokens", json={"name": "b"}) as resp:
                token = (await resp.json())["token"]
            for n in range(50):
                body = {"action": f"pay_{n}", "riskScore": 80}
                async with s.post(
                    "/approvals", json=body, headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    assert resp.status == 201, await resp.text()
        env = daemon_env(d, redis_url)
        figures["jarvisd approvals list (50 pending)"] = timed(
            [py, "-m", "jarvisd", "approvals", "list"], args.runs, env
        )
    targets = {"jarvisd version": 0.1, "jarvisd --help": 0.1}
    for name, values in figures.items():
        target = targets.get(name, 0.2)
        for what, q in STATS:
            value = pct(values, q) * 1000
            report.add(
                f"{name} {what}",
                value,
                "ms",
                floor=pct(floor, q) * 1000,
                floor_name=f"python -c pass {what}",
                note=f"target ≤ {target * 1000:.0f} ms: {'met' if value <= target * 1000 else 'NOT met'}"
                if what == "p50"
                else None,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    run_bench(
        "cli",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
